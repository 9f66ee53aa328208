"""Captures of real lab VMs over the lab's sshd, checked byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from isal import igzip

from memdump import chunkedgz
from memdump.capture import capture
from memdump.elfcore import parse_core
from memdump.errors import DumpFailedError, VMNotFoundError
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.manifest import manifest_path
from memdump.records.model import DumpRecord
from memdump.settings import Settings
from memdump.targets import find, list_all
from tests.helpers.contract import RECORD_FIELDS
from tests.helpers.lab import URI, assert_markers, layout, remote_temp_dirs, virsh

pytestmark = pytest.mark.lab

VM = "vm-web-01"


def test_lists_and_resolves_by_name_id_and_uuid(driver: Driver) -> None:
    names = {r.name for r in driver.list_vms()}
    assert {"vm-web-01", "vm-db-01"} <= names
    dom_id = virsh("domid", VM).strip()
    uuid = virsh("domuuid", VM).strip()
    refs = {driver.resolve(x) for x in (VM, dom_id, uuid)}
    assert refs == {VMRef("lab", VM, VM)}


def test_dump_is_byte_exact_with_markers(
    driver: Driver, settings: Settings, lab_dir: Path, tmp_path: Path
) -> None:
    # Paused, the VM's memory cannot change between our dump and the reference dump.
    virsh("suspend", VM)
    try:
        ref = driver.resolve(VM)
        info = driver.snapshot(ref)
        # Paused whatever the inventory's capture_mode: compared with virsh's own dump.
        result = capture(driver, ref, settings, mode="paused")
        local = tmp_path / "reference.elf"
        virsh("dump", "--memory-only", "--format", "elf", VM, str(local))
    finally:
        virsh("resume", VM)

    rec = result.record
    raw = igzip.decompress(Path(rec.dump_path).read_bytes())
    expected = local.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == hashlib.sha256(expected).hexdigest() == rec.sha256
    assert raw == expected
    assert rec.raw_size_bytes == len(expected)
    assert rec.gz_sha256 == hashlib.sha256(Path(rec.dump_path).read_bytes()).hexdigest()
    assert rec.gzip_size_bytes == os.path.getsize(rec.dump_path) < len(expected)

    assert_markers(raw, lab_dir, VM)
    # Every chunk's hash in the file's index is that of virsh's own dump at that offset.
    with open(rec.dump_path, "rb") as f:
        index = chunkedgz.read_index(f)
    assert index is not None and len(index.chunks) == -(-len(expected) // index.chunk_size)
    for chunk in index.chunks:
        piece = expected[chunk.raw_offset : chunk.raw_offset + chunk.raw_size]
        assert chunk.sha256 == hashlib.sha256(piece).digest()
    vm_layout = layout(lab_dir, VM)

    # contract record fields and file hygiene
    d = rec.contract_dict()
    assert list(d) == RECORD_FIELDS
    assert d["dom"] == VM and d["vmid"] == VM and len(d["sha256"]) == 64
    stamp = rec.timestamp.strftime("%Y%m%dT%H%M%S.%fZ")  # hypervisor, vmid, time, random
    assert re.fullmatch(rf"lab_{VM}_{stamp}_[0-9a-f]{{6}}\.mem\.gz", Path(d["dump_path"]).name)
    assert stat.S_IMODE(os.stat(rec.dump_path).st_mode) == 0o600
    mpath = manifest_path(Path(rec.dump_path))
    assert sorted(p.name for p in settings.dump_dir.iterdir()) == sorted(
        [Path(rec.dump_path).name, mpath.name, mpath.name + ".sig"]  # signed (issue 15)
    )
    check_manifest(mpath, rec, lab_dir)
    assert info.memory_bytes == vm_layout["memory_bytes"]
    assert info.uuid and info.versions.get("libvirt") and "QEMU" in info.versions["hypervisor"]
    assert remote_temp_dirs() == []


def check_manifest(mpath: Path, rec: DumpRecord, lab_dir: Path) -> dict[str, Any]:
    """The manifest of a real lab capture: every field there and every hash right."""
    data = mpath.read_bytes()
    assert hashlib.sha256(data).hexdigest() == rec.manifest_sha256
    assert stat.S_IMODE(os.stat(mpath).st_mode) == 0o600
    m = json.loads(data)
    assert set(m) == {
        "manifest_version", "memdump_version", "vm", "hypervisor", "capture", "output", "analysis"
    }  # fmt: skip
    assert m["manifest_version"] == 3 and m["memdump_version"]
    vm = rec.dom
    xml = subprocess.run(
        ["virsh", "-c", URI, "dumpxml", vm], capture_output=True, check=True
    ).stdout
    assert m["vm"] == {
        "name": vm,
        "vmid": rec.vmid,
        "uuid": virsh("domuuid", vm).strip(),
        "domain_id": virsh("domid", vm).strip(),
        "state_before": m["vm"]["state_before"],
        "memory_bytes": layout(lab_dir, vm)["memory_bytes"],
        "domain_xml_sha256": hashlib.sha256(xml).hexdigest(),
    }
    assert m["vm"]["state_before"] in ("running", "paused")
    hv = m["hypervisor"]
    fp = subprocess.run(
        ["ssh-keygen", "-lf", str(lab_dir / "ssh" / "ssh_host_ed25519_key.pub")],
        capture_output=True, text=True, check=True,
    ).stdout.split()[1]  # fmt: skip
    assert hv["ssh_host_key"] == f"ssh-ed25519 {fp}"
    assert hv["name"] == "lab" and hv["driver"] == "libvirt" and hv["host"]
    assert hv["versions"]["libvirt"] and "QEMU" in hv["versions"]["hypervisor"]
    cap = m["capture"]
    assert cap["format"].startswith("ELF64 core") and cap["staging"] == "fifo"
    # Manifest version 2 (issue 12): this capture was asked to be paused.
    assert (cap["mode_requested"], cap["mode"], cap["fallback_reason"], cap["live"]) == (
        rec.capture_mode, rec.capture_mode, None, None
    ) == ("paused", "paused", None, None)  # fmt: skip
    t = {k: datetime.fromisoformat(cap[k]) for k in cap if k.endswith("_at")}
    # The pause window sits inside start..end (one clock here; 50 ms of slack).
    slack = timedelta(milliseconds=50)
    assert t["started_at"] - slack <= t["guest_paused_at"] <= t["guest_resumed_at"]
    assert t["guest_resumed_at"] <= t["ended_at"] + slack
    assert 0 < cap["pause_window_sec"] <= cap["duration_sec"] + 0.05
    assert datetime.fromisoformat(cap["started_at"]) == rec.timestamp
    assert m["output"] == {
        "file": Path(rec.dump_path).name,
        "raw_sha256": rec.sha256,
        "raw_bytes": rec.raw_size_bytes,
        "gz_sha256": rec.gz_sha256,
        "gz_bytes": rec.gzip_size_bytes,
        "compression": "gzip (ISA-L level 1), 65536-byte chunks, one member each",
        "chunks": m["output"]["chunks"],
    }
    # The chunked .mem.gz (issue 14): the file's own index is the manifest's.
    with open(rec.dump_path, "rb") as f:
        index = chunkedgz.read_index(f)
    assert index is not None and m["output"]["chunks"] == index.summary()
    assert index.raw_size == rec.raw_size_bytes
    assert m["analysis"]["status"] == rec.analysis
    return dict(m)


def test_unknown_vm_is_a_clear_error_and_writes_nothing(driver: Driver, settings: Settings) -> None:
    with pytest.raises(VMNotFoundError) as ei:
        find([driver], "vm-does-not-exist")
    assert "vm-does-not-exist" in str(ei.value) and not ei.value.retryable
    assert not settings.dump_dir.exists()


def test_virsh_failure_does_not_hang(driver: Driver, settings: Settings) -> None:
    # Bypass resolve(): virsh itself fails before anything opens the FIFO.
    t0 = time.monotonic()
    with pytest.raises(DumpFailedError) as ei:
        capture_src = driver.open_dump(VMRef("lab", "vm-gone-01", "vm-gone-01"))
        from memdump.pipeline import write_dump

        write_dump(capture_src, settings.dump_dir, "x.mem.gz")
    assert time.monotonic() - t0 < 30
    assert "vm-gone-01" in ei.value.fields["stderr"]
    assert list(settings.dump_dir.iterdir()) == []
    assert remote_temp_dirs() == []


def test_local_transport_on_the_hypervisor(settings: Settings) -> None:
    hv = settings.inventory[0].model_copy(update={"transport": "local"})
    d = open_driver(hv, settings.ssh)
    ref = d.resolve("vm-db-01")
    result = capture(d, ref, settings)
    layout_ok = parse_core(igzip.decompress(Path(result.record.dump_path).read_bytes()))
    assert layout_ok is not None and layout_ok.file_size == result.record.raw_size_bytes


def test_all_lists_every_running_vm(settings: Settings) -> None:
    drivers = [open_driver(hv, settings.ssh) for hv in settings.inventory]
    running = set(virsh("list", "--name").split())
    assert {r.name for r in list_all(drivers)} == running


def test_cli_capture(settings: Settings, lab_dir: Path, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        MEMDUMP_DATA_DIR=str(tmp_path / "data"),
        MEMDUMP_DUMP_DIR=str(tmp_path / "cli"),
        MEMDUMP_INVENTORY_FILE=str(lab_dir / "inventory.yaml"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "memdump.cli", "capture", "vm-db-01", "nope-01"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1  # one VM failed
    rec = json.loads(proc.stdout.strip())
    assert rec["dom"] == "vm-db-01" and Path(rec["dump_path"]).is_file()
    assert manifest_path(Path(rec["dump_path"])).is_file()
    # Recorded like a trigger's capture (issue 13 item 2): the record store has it.
    from memdump.records.sqlite import SQLiteRecordStore

    (stored,) = SQLiteRecordStore(tmp_path / "data" / "records.db").list(10, 0)
    assert stored["dump_path"] == rec["dump_path"] and stored["sha256"] == rec["sha256"]
    err = json.loads(proc.stderr.strip())
    assert err["error"] == "VMNotFoundError" and err["vm_id"] == "nope-01"
