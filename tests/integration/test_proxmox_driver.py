"""The Proxmox driver against the lab's qm stand-in (lab/qm.py, NOT Proxmox: it serves
qm list/config/status/monitor over a real QEMU laid out as Proxmox does, lab/up
--proxmox), over the lab's sshd: byte-exact dumps, lookups, errors, and aborts that leave
the guest running."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from isal import igzip

from memdump.capture import capture
from memdump.errors import ConfigError, VMNotFoundError
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.manifest import manifest_path
from memdump.settings import Settings
from memdump.targets import find
from tests.helpers.hv_tempdirs import (
    TARGET_BYTES,
    TOKEN,
    make_target,
    plant,
    state,
    token_in_cmdlines,
    watched,
)
from tests.helpers.lab import assert_markers, layout, remote_temp_dirs
from tests.helpers.qemu_lab import (
    abort_mid_stream_resumes_the_guest,
    deadline_stops_the_dump,
    lab_qemu_vm,
    paused_capture_is_byte_exact,
    wait_clean,
)

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
VMID = "101"
VM = "vm-pve-01"
HV = "lab-pve"


@pytest.fixture(scope="module")
def pve_vm(lab_dir: Path) -> Iterator[Path]:
    """VM 101 (vm-pve-01) of the qm stand-in; yields its QMP socket."""
    run_dir = lab_dir / "run" / "qemu-server"
    with lab_qemu_vm(run_dir, VMID, VM, "--proxmox", f"{VMID}:{VM}:256") as sock:
        yield sock


@pytest.fixture
def psettings(lab_dir: Path, tmp_path: Path, pve_vm: Path) -> Settings:
    return Settings(inventory_file=lab_dir / "inventory-pve.yaml", dump_dir=tmp_path / "dumps")


@pytest.fixture
def pdriver(psettings: Settings) -> Iterator[Driver]:
    hv = psettings.hypervisor(HV)
    assert hv.driver == "proxmox" and hv.qm_command and hv.transport == "ssh"
    d = open_driver(hv, psettings.ssh)
    yield d
    d.close()


def qm(lab_dir: Path, *args: str) -> str:
    return subprocess.run(
        [str(lab_dir / "bin" / "qm"), *args], check=True, capture_output=True, text=True
    ).stdout


def test_the_stand_in_answers_as_qm(lab_dir: Path, pve_vm: Path) -> None:
    listing = qm(lab_dir, "list").splitlines()
    assert listing[0].split() == ["VMID", "NAME", "STATUS", "MEM(MB)", "BOOTDISK(GB)", "PID"]
    assert [VMID, VM, "running", "256"] == next(
        line.split()[:4] for line in listing[1:] if line.split()[0] == VMID
    )
    assert f"name: {VM}" in qm(lab_dir, "config", VMID).splitlines()
    assert qm(lab_dir, "status", VMID) == "status: running\n"
    missing = subprocess.run(
        [str(lab_dir / "bin" / "qm"), "config", "999"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "999.conf' does not exist" in missing.stderr


def test_lists_and_resolves_by_vmid_and_name(pdriver: Driver, pve_vm: Path) -> None:
    assert VMRef(HV, VMID, VM) in pdriver.list_vms()
    assert pdriver.resolve(VMID) == pdriver.resolve(VM) == VMRef(HV, VMID, VM)
    with pytest.raises(VMNotFoundError):
        find([pdriver], "998")


def test_dump_is_byte_exact_with_markers(
    pdriver: Driver, psettings: Settings, pve_vm: Path, lab_dir: Path, tmp_path: Path
) -> None:
    result, info, raw = paused_capture_is_byte_exact(pdriver, psettings, pve_vm, VMID, tmp_path)
    rec = result.record
    assert rec.hypervisor == HV and rec.vmid == VMID and rec.dom == VM
    assert Path(rec.dump_path).name.startswith(f"{HV}_{VMID}_")
    assert_markers(raw, lab_dir, VM)

    pid = int((lab_dir / "run" / "qemu-server" / f"{VMID}.pid").read_text())
    conf = qm(lab_dir, "config", VMID)
    assert info.memory_bytes == layout(lab_dir, VM)["memory_bytes"]
    assert info.domain_id == str(pid)
    assert info.domain_xml_sha256 == hashlib.sha256(conf.encode()).hexdigest()
    assert f"uuid={info.uuid}" in conf
    assert info.versions["hypervisor"].startswith("QEMU ") and info.hypervisor_host
    assert info.host_key.startswith("ssh-ed25519 SHA256:")
    mpath = manifest_path(Path(rec.dump_path))
    assert stat.S_IMODE(os.stat(rec.dump_path).st_mode) == 0o600
    m = json.loads(mpath.read_bytes())
    assert hashlib.sha256(mpath.read_bytes()).hexdigest() == rec.manifest_sha256
    assert m["hypervisor"]["name"] == HV and m["hypervisor"]["driver"] == "proxmox"
    assert m["vm"]["state_before"] == "paused" and m["vm"]["domain_id"] == str(pid)
    cap = m["capture"]
    assert cap["format"] == "ELF64 core: qm monitor, HMP dump-guest-memory -d"
    t = {k: datetime.fromisoformat(cap[k]) for k in cap if k.endswith("_at")}
    slack = timedelta(milliseconds=50)
    assert t["started_at"] - slack <= t["guest_paused_at"] <= t["guest_resumed_at"]
    assert t["guest_resumed_at"] <= t["ended_at"] + slack


def test_running_vm_dump_has_the_markers(
    pdriver: Driver, psettings: Settings, pve_vm: Path, lab_dir: Path
) -> None:
    before = remote_temp_dirs()
    result = capture(pdriver, pdriver.resolve(VM), psettings)
    assert result.info.state == "running"
    assert_markers(igzip.decompress(Path(result.record.dump_path).read_bytes()), lab_dir, VM)
    wait_clean(pve_vm, before)


def test_unknown_vm_and_file_staging(pdriver: Driver, psettings: Settings) -> None:
    with pytest.raises(VMNotFoundError) as ei:
        find([pdriver], "vm-does-not-exist")
    assert "vm-does-not-exist" in str(ei.value) and not ei.value.retryable
    with pytest.raises(ConfigError, match="staging"):
        pdriver.open_dump(VMRef(HV, VMID, VM), staging="file")


def test_abort_mid_stream_resumes_the_guest(pdriver: Driver, pve_vm: Path) -> None:
    abort_mid_stream_resumes_the_guest(pdriver, pve_vm, VMID)


def test_deadline_stops_the_dump_and_leaves_nothing(
    pdriver: Driver, psettings: Settings, pve_vm: Path
) -> None:
    deadline_stops_the_dump(pdriver, psettings, pve_vm, VMID)


# -- issue 11 item 4: planted directories, the token on no command line -----------------------


def test_abort_leaves_a_planted_dir_alone(
    psettings: Settings, pve_vm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local user read the token of a dump from /proc (old code) and planted
    # memdump.0000000000 with it, its mem a symlink to someone's FIFO, in the scripts'
    # shared TMPDIR (a sticky, world-writable dir like /tmp; over the local transport so
    # that it can be this test's own). Aborting the real dump opens only its own FIFO.
    monkeypatch.setattr(secrets, "token_hex", lambda n=32: TOKEN)
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(shared))
    target = make_target(tmp_path)
    hv = psettings.hypervisor(HV).model_copy(update={"transport": "local"})
    drv = open_driver(hv, psettings.ssh)
    with watched(tmp_path / "victim.fifo") as victim:
        planted = plant(shared, target, victim.path)
        kept = state(planted)
        before = remote_temp_dirs()  # (TMPDIR is shared: the planted one is among them)
        src = drv.open_dump(drv.resolve(VMID))
        assert src.readinto(memoryview(bytearray(1 << 20))) > 0  # streaming, guest paused
        src.abort()
        wait_clean(pve_vm, before)
        assert not victim.touched()
    assert target.read_bytes() == TARGET_BYTES and state(planted) == kept
    assert list(shared.iterdir()) == [planted]
    assert drv.snapshot(drv.resolve(VMID)).state == "running"


def test_the_token_is_on_no_command_line_during_a_dump(
    pdriver: Driver, pve_vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda n=32: TOKEN)
    before = remote_temp_dirs()
    src = pdriver.open_dump(pdriver.resolve(VMID))
    try:
        assert src.readinto(memoryview(bytearray(1 << 20))) > 0  # the script is running
        hits = token_in_cmdlines(TOKEN)  # this machine is the lab's hypervisor too
    finally:
        src.abort()
    wait_clean(pve_vm, before)
    assert hits == []
