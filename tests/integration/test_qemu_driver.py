"""The plain-QEMU driver against a lab QEMU process (lab/up --qemu), over the lab's sshd:
byte-exact dumps, lookups, errors, and aborts that leave the guest running."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memdump.capture import Capture, capture
from memdump.errors import (
    CaptureTimeoutError,
    ConfigError,
    DumpFailedError,
    VMNotFoundError,
)
from memdump.hypervisors import Driver, VMInfo, VMRef, open_driver
from memdump.manifest import manifest_path
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.targets import find
from tests.integration.conftest import assert_markers, layout, remote_temp_dirs

REPO = Path(__file__).resolve().parents[2]
VM = "vm-qemu-01"
HV = "lab-qemu"


def qmp(sock: Path, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One QMP command on its own connection (events skipped); the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(sock))
        f = s.makefile("rwb")

        def reply() -> dict[str, Any]:
            while True:
                line = f.readline()
                assert line, "QMP connection closed"
                doc: dict[str, Any] = json.loads(line)
                if "return" in doc or "error" in doc:
                    return doc

        assert "QMP" in json.loads(f.readline())
        f.write(b'{"execute":"qmp_capabilities"}\n')
        f.flush()
        reply()
        cmd: dict[str, Any] = {"execute": command, **({"arguments": args} if args else {})}
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        return reply()


def qemu_pid(lab_dir: Path) -> int:
    return int((lab_dir / "run" / "qemu" / f"{VM}.pid").read_text().strip())


@contextmanager
def lab_qemu_vm(run_dir: Path, stem: str, name: str, *up_args: str) -> Iterator[Path]:
    """A lab QEMU VM (``lab/up *up_args``; files ``run_dir/stem.*``) up, started here if it
    was not and then stopped again at the end. Yields its QMP socket."""
    pidfile = run_dir / f"{stem}.pid"
    was_up = pidfile.is_file() and Path(f"/proc/{pidfile.read_text().strip()}").exists()
    subprocess.run([str(REPO / "lab/up"), *up_args], check=True, capture_output=True, timeout=300)
    try:
        yield run_dir / f"{stem}.qmp"
    finally:
        if not was_up:
            subprocess.run(
                [str(REPO / "lab/down"), "--vm", name],
                check=False,
                capture_output=True,
                timeout=120,
            )


@pytest.fixture(scope="module")
def qemu_vm(lab_dir: Path) -> Iterator[Path]:
    with lab_qemu_vm(lab_dir / "run" / "qemu", VM, VM, "--qemu", f"{VM}:256") as sock:
        yield sock


@pytest.fixture
def qsettings(lab_dir: Path, tmp_path: Path, qemu_vm: Path) -> Settings:
    return Settings(inventory_file=lab_dir / "inventory-qemu.yaml", dump_dir=tmp_path / "dumps")


@pytest.fixture
def qhv(qsettings: Settings) -> HypervisorConfig:
    hv = qsettings.hypervisor(HV)
    assert hv.driver == "qemu" and hv.qmp_dir
    return hv


@pytest.fixture
def qdriver(qhv: HypervisorConfig, qsettings: Settings) -> Iterator[Driver]:
    d = open_driver(qhv, qsettings.ssh)
    yield d
    d.close()


def status(sock: Path) -> str:
    return str(qmp(sock, "query-status")["return"]["status"])


def wait_clean(sock: Path, before: list[str], timeout: float = 30.0) -> None:
    """Our dump's temp dir is gone (others' may come and go) and the guest runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        set(remote_temp_dirs()) - set(before) or status(sock) != "running"
    ):
        time.sleep(0.2)
    assert set(remote_temp_dirs()) - set(before) == set()
    assert status(sock) == "running"


def test_lists_and_resolves_by_name_and_uuid(qdriver: Driver, qemu_vm: Path) -> None:
    refs = qdriver.list_vms()
    assert VMRef(HV, VM, VM) in refs
    uuid = qmp(qemu_vm, "query-uuid")["return"]["UUID"]
    assert uuid.strip("0-")
    assert qdriver.resolve(VM) == qdriver.resolve(uuid) == qdriver.resolve(uuid.upper())
    assert qdriver.resolve(VM) == VMRef(HV, VM, VM)


def paused_capture_is_byte_exact(
    driver: Driver, settings: Settings, sock: Path, vm_id: str, tmp_path: Path
) -> tuple[Capture, VMInfo, bytes]:
    """Capture ``vm_id`` paused, then QEMU's own dump of it (QMP, same socket): both are the
    same bytes, the record's hashes and size say so, and the guest is running after."""
    # Paused, the VM's memory cannot change between our dump and the reference dump.
    assert "return" in qmp(sock, "stop")
    try:
        ref = driver.resolve(vm_id)
        info = driver.snapshot(ref)
        assert info.state == "paused"
        result = capture(driver, ref, settings)
        assert status(sock) == "paused"  # a dump leaves a paused guest paused
        local = tmp_path / "reference.elf"
        args = {"paging": False, "protocol": f"file:{local}", "format": "elf"}
        assert qmp(sock, "dump-guest-memory", args) == {"return": {}}
    finally:
        qmp(sock, "cont")
    assert status(sock) == "running"
    rec = result.record
    raw = gzip.decompress(Path(rec.dump_path).read_bytes())
    expected = local.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == hashlib.sha256(expected).hexdigest() == rec.sha256
    assert raw == expected
    assert rec.raw_size_bytes == len(expected)
    return result, info, raw


def test_dump_is_byte_exact_with_markers(
    qdriver: Driver, qsettings: Settings, qemu_vm: Path, lab_dir: Path, tmp_path: Path
) -> None:
    result, info, raw = paused_capture_is_byte_exact(qdriver, qsettings, qemu_vm, VM, tmp_path)
    rec = result.record
    assert rec.hypervisor == HV and rec.dom == VM and rec.vmid == VM

    assert_markers(raw, lab_dir, VM)
    vm_layout = layout(lab_dir, VM)

    # What the snapshot said, and the manifest.
    pid = qemu_pid(lab_dir)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert info.memory_bytes == vm_layout["memory_bytes"]
    assert info.domain_id == str(pid)
    assert info.domain_xml_sha256 == hashlib.sha256(cmdline).hexdigest()
    assert info.uuid == qmp(qemu_vm, "query-uuid")["return"]["UUID"]
    assert info.versions["hypervisor"].startswith("QEMU ") and info.hypervisor_host
    assert info.host_key.startswith("ssh-ed25519 SHA256:")
    mpath = manifest_path(Path(rec.dump_path))
    assert stat.S_IMODE(os.stat(rec.dump_path).st_mode) == 0o600
    m = json.loads(mpath.read_bytes())
    assert hashlib.sha256(mpath.read_bytes()).hexdigest() == rec.manifest_sha256
    assert m["hypervisor"]["name"] == HV and m["hypervisor"]["driver"] == "qemu"
    assert m["vm"]["state_before"] == "paused" and m["vm"]["domain_id"] == str(pid)
    cap = m["capture"]
    assert cap["format"] == "ELF64 core: QMP dump-guest-memory, format elf"
    assert cap["staging"] == "fifo"
    t = {k: datetime.fromisoformat(cap[k]) for k in cap if k.endswith("_at")}
    slack = timedelta(milliseconds=50)
    assert t["started_at"] - slack <= t["guest_paused_at"] <= t["guest_resumed_at"]
    assert t["guest_resumed_at"] <= t["ended_at"] + slack
    assert 0 < cap["pause_window_sec"] <= cap["duration_sec"] + 0.05


def test_running_vm_dump_matches_layout_over_local_transport(
    qhv: HypervisorConfig, qsettings: Settings, qemu_vm: Path, lab_dir: Path
) -> None:
    # The halt BIOS never writes RAM: a running guest dumps the same markers.
    before = remote_temp_dirs()
    d = open_driver(qhv.model_copy(update={"transport": "local"}), qsettings.ssh)
    result = capture(d, d.resolve(VM), qsettings)
    raw = gzip.decompress(Path(result.record.dump_path).read_bytes())
    assert_markers(raw, lab_dir, VM)
    assert result.info.state == "running"
    wait_clean(qemu_vm, before)


def test_unknown_vm_is_a_clear_error_and_writes_nothing(
    qdriver: Driver, qsettings: Settings
) -> None:
    with pytest.raises(VMNotFoundError) as ei:
        find([qdriver], "vm-does-not-exist")
    assert "vm-does-not-exist" in str(ei.value) and not ei.value.retryable
    before = remote_temp_dirs()
    t0 = time.monotonic()
    with pytest.raises(VMNotFoundError):
        write_dump(
            qdriver.open_dump(VMRef(HV, "vm-gone-01", "vm-gone-01")), qsettings.dump_dir, "x"
        )
    assert time.monotonic() - t0 < 30
    assert not qsettings.dump_dir.exists() or list(qsettings.dump_dir.iterdir()) == []
    assert set(remote_temp_dirs()) - set(before) == set()


def test_file_staging_is_refused_before_anything_runs(qdriver: Driver) -> None:
    with pytest.raises(ConfigError, match="staging"):
        qdriver.open_dump(VMRef(HV, VM, VM), staging="file")


def abort_mid_stream_resumes_the_guest(driver: Driver, sock: Path, vm_id: str) -> None:
    before = remote_temp_dirs()
    src = driver.open_dump(driver.resolve(vm_id))
    assert src.readinto(memoryview(bytearray(1 << 20))) > 0  # streaming, the guest paused
    src.abort()
    wait_clean(sock, before)
    # The monitor answers again (the dump failed in QEMU, which resumed the guest).
    assert driver.snapshot(driver.resolve(vm_id)).state == "running"


def deadline_stops_the_dump(driver: Driver, settings: Settings, sock: Path, vm_id: str) -> None:
    before = remote_temp_dirs()
    src = driver.open_dump(driver.resolve(vm_id))
    with pytest.raises(CaptureTimeoutError):
        write_dump(src, settings.dump_dir, "t.mem.gz", deadline=time.monotonic() + 0.05)
    assert list(settings.dump_dir.iterdir()) == []
    wait_clean(sock, before)


def test_abort_mid_stream_resumes_the_guest(qdriver: Driver, qemu_vm: Path) -> None:
    abort_mid_stream_resumes_the_guest(qdriver, qemu_vm, VM)


def test_deadline_stops_the_dump_and_leaves_nothing(
    qdriver: Driver, qsettings: Settings, qemu_vm: Path
) -> None:
    deadline_stops_the_dump(qdriver, qsettings, qemu_vm, VM)


def test_stale_socket_is_not_a_vm(qdriver: Driver, qemu_vm: Path, tmp_path: Path) -> None:
    # A socket file nobody listens on (its QEMU gone): not listed, not found, and a
    # dump of it fails at once, leaving no temp dir.
    stale = Path(str(qemu_vm).replace(VM, "vm-stale-01"))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(stale))
    srv.close()  # the socket file stays, nobody listens: connection refused
    try:
        before = remote_temp_dirs()
        assert "vm-stale-01" not in {r.name for r in qdriver.list_vms()}
        with pytest.raises(VMNotFoundError):
            qdriver.resolve("vm-stale-01")
        with pytest.raises(DumpFailedError) as ei:
            write_dump(qdriver.open_dump(VMRef(HV, "vm-stale-01", "vm-stale-01")), tmp_path, "s.gz")
        assert "refused" in ei.value.fields["stderr"].lower()
        assert set(remote_temp_dirs()) - set(before) == set()
    finally:
        stale.unlink()
