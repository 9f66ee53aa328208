"""The plain-QEMU driver against a lab QEMU process (lab/up --qemu, running as libvirt's
QEMU user, not root), over the lab's sshd: byte-exact dumps handed to QEMU as a file
descriptor, QEMU identified by its socket's peer (not a process named like it), lookups,
errors, and aborts that leave the guest running."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from isal import igzip

from memdump.capture import capture
from memdump.errors import (
    ConfigError,
    DumpFailedError,
    VMNotFoundError,
)
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.manifest import manifest_path
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.targets import find
from tests.helpers.lab import assert_markers, layout, remote_temp_dirs
from tests.helpers.qemu_lab import (
    abort_mid_stream_resumes_the_guest,
    deadline_stops_the_dump,
    lab_qemu_vm,
    paused_capture_is_byte_exact,
    status,
    wait_clean,
)
from tests.helpers.qmp_lab import qmp

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
VM = "vm-qemu-01"
HV = "lab-qemu"


def qemu_pid(lab_dir: Path) -> int:
    return int((lab_dir / "run" / "qemu" / f"{VM}.pid").read_text().strip())


def proc_uid(pid: int) -> int:
    """The effective uid of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise AssertionError(f"no Uid line for pid {pid}")


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


def test_lists_and_resolves_by_name_and_uuid(qdriver: Driver, qemu_vm: Path) -> None:
    refs = qdriver.list_vms()
    assert VMRef(HV, VM, VM) in refs
    uuid = qmp(qemu_vm, "query-uuid")["return"]["UUID"]
    assert uuid.strip("0-")
    assert qdriver.resolve(VM) == qdriver.resolve(uuid) == qdriver.resolve(uuid.upper())
    assert qdriver.resolve(VM) == VMRef(HV, VM, VM)


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
    # QEMU runs as another user (lab/up: -runas): it could not open the script's root-only
    # FIFO by path, so the dump reached it as a descriptor.
    assert proc_uid(pid) != 0
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
    raw = igzip.decompress(Path(result.record.dump_path).read_bytes())
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


def fifos_held_by(pid: int) -> list[Path]:
    """The FIFOs named "mem" that ``pid`` has open (what /proc/PID/fd/N names)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            st = os.stat(fd)  # what the descriptor is, whatever became of its name
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode) and target.endswith("/mem"):
            found.append(Path(target))
    return found


@pytest.fixture
def decoy(qemu_vm: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A local user's process named ``qemu-x`` (comm), running as nobody, whose command
    line names the VM's QMP socket as reached through another path (a symlinked dir, as
    /var/run is /run): the base driver took the process named qemu* that mentions the
    socket for QEMU and chowned the FIFO to it. Yields it and the symlink dir."""
    base = Path(tempfile.mkdtemp(prefix="mdqd", dir="/tmp"))
    base.chmod(0o755)
    alias = base / "q"
    alias.symlink_to(qemu_vm.parent)
    script = base / "qemu-x"
    script.write_text("#!/bin/sh\nsleep 600\n")
    script.chmod(0o755)
    proc = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(script),
         "-qmp", f"unix:{alias / qemu_vm.name},server=on,wait=off"],
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "qemu-x":
            assert time.monotonic() < deadline, "the decoy did not start"
            time.sleep(0.05)
        assert proc_uid(proc.pid) == 65534
        yield proc, alias
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        alias.unlink()
        script.unlink()
        base.rmdir()


def test_qemu_is_its_sockets_peer_not_a_process_named_qemu(
    decoy: tuple[subprocess.Popen[bytes], Path],
    qhv: HypervisorConfig,
    qsettings: Settings,
    qemu_vm: Path,
    lab_dir: Path,
) -> None:
    proc, alias = decoy
    d = open_driver(qhv.model_copy(update={"qmp_dir": str(alias)}), qsettings.ssh)
    try:
        pid = qemu_pid(lab_dir)
        ref = d.resolve(VM)
        # Not chosen: the pid recorded is the process serving the socket (SO_PEERCRED).
        info = d.snapshot(ref)
        assert info.domain_id == str(pid) != str(proc.pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert info.domain_xml_sha256 == hashlib.sha256(cmdline).hexdigest()

        src = d.open_dump(ref)
        raw = bytearray()
        chunk = memoryview(bytearray(4 << 20))
        n = src.readinto(chunk)
        assert n > 0  # streaming: QEMU is writing, the guest paused
        raw += chunk[:n]
        # QEMU (not root) writes through the descriptor it was handed: the FIFO it holds
        # is root's, 0600, in root's 0700 dir, so it could not have opened it by name,
        # and neither can the decoy, which holds nothing.
        held = fifos_held_by(pid)
        assert len(held) == 1 and proc_uid(pid) != 0
        fifo = held[0]
        st, dst = os.lstat(fifo), os.lstat(fifo.parent)
        assert stat.S_ISFIFO(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o777 == 0o600
        assert stat.S_ISDIR(dst.st_mode) and dst.st_uid == 0 and dst.st_mode & 0o777 == 0o700
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert all(fifos_held_by(p) == [] for p in [proc.pid, *map(int, kids)])
        while n:
            n = src.readinto(chunk)
            raw += chunk[:n]
        src.close_ok()  # the dump completed (QEMU said so)
    finally:
        d.close()
    assert_markers(bytes(raw), lab_dir, VM)
    assert status(qemu_vm) == "running"
