"""Live capture (issue 12) with the plain-QEMU driver on the lab: a QEMU that runs as
libvirt's QEMU user (so the userfaultfd window is needed: vm.unprivileged_userfaultfd is 0
here), reached through the lab's sshd. The guest keeps running throughout (polled from
here while the capture runs); afterwards no migration is active, the capability
background-snapshot is off, the sysctl is what it was, no temp dir or restore file is
left and the window's lock is free. Unsupported cases say why before anything touches the
guest; abort, deadline and a script killed outright leave the guest as clean."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from isal import igzip

from memdump.capture import capture
from memdump.errors import CaptureTimeoutError, LiveCaptureUnsupportedError
from memdump.hypervisors import open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.qemu import QemuDriver
from memdump.pipeline import DumpSource, write_dump
from memdump.settings import Settings
from tests.helpers.lab import assert_markers, remote_temp_dirs
from tests.helpers.libvirt_live import qemu_thp
from tests.helpers.qmp_lab import (
    IDLE,
    RESTORE,
    SYSCTL,
    Poller,
    assert_clean,
    capability,
    migration,
    qmp,
    status,
)

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
VM = "qlive-01"
HV = "lab-qemu"
STREAM_HEAD = b"QEVM\x00\x00\x00\x03"
CAP = 200 << 20  # a cap on the snapshot (Settings.live_max_bandwidth_bytes)
QEMU_DEFAULT_BANDWIDTH = 128 << 20  # QEMU 7.2's own


def max_bandwidth(sock: Path) -> int:
    value: int = qmp(sock, "query-migrate-parameters")["return"]["max-bandwidth"]
    return value


def set_max_bandwidth(sock: Path, value: int) -> None:
    assert qmp(sock, "migrate-set-parameters", {"max-bandwidth": value}) == {"return": {}}


def wait_max_bandwidth(sock: Path, value: int) -> int:
    """max-bandwidth once it is ``value`` (the client sets the cap just after the
    snapshot's start), or after 10 s."""
    deadline = time.monotonic() + 10
    while (now := max_bandwidth(sock)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


@pytest.fixture(scope="module")
def vm_sock(lab_dir: Path) -> Iterator[Path]:
    """A 256 MiB lab QEMU VM of this module's own, stopped at the end."""
    sock = lab_dir / "run" / "qemu" / f"{VM}.qmp"
    subprocess.run(
        [str(REPO / "lab/up"), "--qemu", f"{VM}:256"], check=True, capture_output=True, timeout=300
    )
    try:
        yield sock
    finally:
        subprocess.run(
            [str(REPO / "lab/down"), "--vm", VM], check=False, capture_output=True, timeout=120
        )


@pytest.fixture
def sysctl_before() -> Iterator[str]:
    before = SYSCTL.read_text().strip()
    yield before
    # Never leave it changed, whatever the test did.
    if SYSCTL.read_text().strip() != before:
        SYSCTL.write_text(before + "\n")
        pytest.fail(f"vm.unprivileged_userfaultfd was left changed (restored to {before})")


def make_driver(lab_dir: Path, policy: str = "sysctl-window") -> QemuDriver:
    settings = Settings(inventory_file=lab_dir / "inventory-qemu.yaml")
    hv = settings.hypervisor(HV).model_copy(update={"live_userfaultfd": policy})
    d = open_driver(hv, settings.ssh)
    assert isinstance(d, QemuDriver)
    return d


@pytest.fixture
def qdriver(lab_dir: Path, vm_sock: Path, sysctl_before: str) -> Iterator[QemuDriver]:
    d = make_driver(lab_dir)
    yield d
    d.close()


def read_all(src: DumpSource) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(1 << 20))
    while n := src.readinto(buf):
        out += buf[:n]
    src.close_ok()
    return bytes(out)


def test_live_stream_of_a_running_guest(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str
) -> None:
    assert sysctl_before == "0"  # the lab's QEMU is not root: the window is needed
    before = remote_temp_dirs()
    poller = Poller(vm_sock)
    poller.start()
    try:
        raw, pre = qdriver.open_live_stream(VMRef(HV, VM, VM))
        assert pre.userfaultfd == "sysctl-window"
        assert "pc.ram" in pre.mtree
        data = read_all(raw)
    finally:
        seen = poller.stop()
    assert data.startswith(STREAM_HEAD)
    assert seen and set(seen) == {"running"}
    live = raw.live
    assert live["migration_status"] == "completed"
    assert live["userfaultfd"] == "sysctl-window" and live["userfaultfd_window_ms"] > 0
    assert isinstance(live["downtime_ms"], int) and live["total_time_ms"] >= live["downtime_ms"]
    assert live["ram"]["total"] >= 256 << 20
    assert len(data) >= live["ram"]["transferred"]
    assert [e["event"] for e in live["events"]][:2] == ["STOP", "RESUME"]
    assert live["pause_ms_events"] >= 0 and live["snapshot_instant"]
    assert live["qemu_version"] == pre.qemu_version
    assert raw.pause_window is not None and raw.pause_window[0] <= raw.pause_window[1]
    assert_clean(vm_sock, before, sysctl_before)


def loads(core: bytes) -> list[tuple[tuple[int, int, int, int], bytes]]:
    """Each PT_LOAD of an ELF core: (p_paddr, p_filesz, p_memsz, p_flags) and its data."""
    import struct

    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", core, 32)[0],
        *struct.unpack_from("<HH", core, 54),
    )
    out = []
    for i in range(phnum):
        p_type, p_flags, p_off, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", core, phoff + i * phentsize
        )
        if p_type == 1:
            out.append(((p_paddr, p_filesz, p_memsz, p_flags), core[p_off : p_off + p_filesz]))
    return out


def test_huge_pages_are_put_back_after_a_live_capture_when_asked(
    lab_dir: Path, sysctl_before: str
) -> None:
    """As on libvirt (test_libvirt_live), through the QMP client: a fresh VM's guest RAM
    on huge pages stays so after a live capture with live_restore_huge_pages, its RSS
    as it was; without it, most of it is on 4 KiB pages afterwards."""
    name = "qlive-huge"
    sock = lab_dir / "run" / "qemu" / f"{name}.qmp"
    lab = ["--qemu", f"{name}:256"]
    subprocess.run([str(REPO / "lab/up"), *lab], check=True, capture_output=True, timeout=300)
    try:
        settings = Settings(inventory_file=lab_dir / "inventory-qemu.yaml")
        ref = VMRef(HV, name, name)
        start: tuple[int, int] | None = None
        for restore in (True, False):
            update = {"live_userfaultfd": "sysctl-window", "live_restore_huge_pages": restore}
            d = open_driver(settings.hypervisor(HV).model_copy(update=update), settings.ssh)
            assert isinstance(d, QemuDriver)
            try:
                pid = int(d.live_preflight(ref).pid)
                if start is None:
                    start = qemu_thp(pid)
                    assert start[0] >= 200 << 10  # of 256 MiB
                before = remote_temp_dirs()
                raw, _ = d.open_live_stream(ref)
                read_all(raw)
            finally:
                d.close()
            assert_clean(sock, before, sysctl_before)
            huge, rss = qemu_thp(pid)
            if restore:
                hp = raw.live["huge_pages"]
                assert hp["regions_before"] == start[0] // 2048
                assert hp["restored"] == hp["regions_before"] and hp["not_restored"] == 0
                assert huge == start[0]
                assert rss <= start[1] + 2048  # no memory turned into huge pages anew
            else:
                assert "huge_pages" not in raw.live
                assert huge < start[0] // 2
    finally:
        subprocess.run(
            [str(REPO / "lab/down"), "--vm", name], check=False, capture_output=True, timeout=120
        )


def test_max_bandwidth_cap_while_the_snapshot_runs_and_put_back(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str
) -> None:
    """Without a cap the capture leaves QEMU's max-bandwidth alone (QEMU does not
    rate-limit a background snapshot); with one, max-bandwidth is the cap while the
    snapshot runs and the VM's own value (here not QEMU's default) after it."""
    before = remote_temp_dirs()
    assert max_bandwidth(vm_sock) == QEMU_DEFAULT_BANDWIDTH
    try:
        raw, _ = qdriver.open_live_stream(VMRef(HV, VM, VM))
        read_all(raw)
        assert "max_bandwidth" not in raw.live
        assert max_bandwidth(vm_sock) == QEMU_DEFAULT_BANDWIDTH
        set_max_bandwidth(vm_sock, 300 << 20)
        raw, _ = qdriver.open_live_stream(VMRef(HV, VM, VM), max_bandwidth=CAP)
        try:
            buf = memoryview(bytearray(1 << 20))
            got = 0
            while got < 4 << 20:  # then stop reading: the snapshot waits, still running
                got += raw.readinto(buf)
            assert migration(vm_sock) == "active"
            assert wait_max_bandwidth(vm_sock, CAP) == CAP
        except BaseException:
            raw.abort()  # not left running for the next test
            raise
        read_all(raw)
        assert (raw.live["max_bandwidth"], raw.live["max_bandwidth_before"]) == (CAP, 300 << 20)
        assert max_bandwidth(vm_sock) == 300 << 20
    finally:
        set_max_bandwidth(vm_sock, QEMU_DEFAULT_BANDWIDTH)
    assert_clean(vm_sock, before, sysctl_before)


def test_live_capture_is_the_paused_dump_of_a_quiescent_guest(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str, lab_dir: Path, tmp_path: Path
) -> None:
    """open_dump(mode="live") through the pipeline: an ELF core whose PT_LOADs hold what
    QEMU's own dump-guest-memory of the same (halted, so quiescent) guest holds, its
    seeded markers at their guest-physical addresses; the guest ran throughout."""
    before = remote_temp_dirs()
    poller = Poller(vm_sock)
    poller.start()
    try:
        src = qdriver.open_dump(
            VMRef(HV, VM, VM), mode="live", spill_dir=tmp_path, buffer_bytes=1 << 20
        )
        result = write_dump(src, tmp_path, "live.mem.gz")
    finally:
        seen = poller.stop()
    assert seen and set(seen) == {"running"}
    live = src.live  # type: ignore[attr-defined]
    assert live["mode"] == "live" and live["userfaultfd"] == "sysctl-window"
    assert live["stream_bytes"] > 0 and len(live["stream_sha256"]) == 64
    assert src.dump_format == "elf"  # type: ignore[attr-defined]
    core = igzip.decompress(result.path.read_bytes())
    assert_markers(core, lab_dir, VM)
    ref = tmp_path / "paused.elf"
    fd = os.open(ref, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        args = {"paging": False, "protocol": "fd:ref", "format": "elf"}
        assert qmp(vm_sock, "dump-guest-memory", args, fd=fd) == {"return": {}}
    finally:
        os.close(fd)
    paused = ref.read_bytes()
    # The same ELF header (type, machine, offsets, counts), but e_ehsize: QEMU 7.2 writes
    # 8 there (sizeof a pointer, in its prepare_elf64_header), the converter the size.
    assert core[:52] + core[54:64] == paused[:52] + paused[54:64]
    assert loads(core) == loads(paused)
    assert_clean(vm_sock, before, sysctl_before)


def test_unsupported_without_userfaultfd_setting_touches_nothing(
    lab_dir: Path, vm_sock: Path, sysctl_before: str
) -> None:
    before = remote_temp_dirs()
    mig = migration(vm_sock)
    d = make_driver(lab_dir, "none")
    try:
        with pytest.raises(LiveCaptureUnsupportedError) as ei:
            d.open_live_stream(VMRef(HV, VM, VM))
    finally:
        d.close()
    reason = ei.value.fields["reason"]
    assert "live_userfaultfd" in reason and "vm.unprivileged_userfaultfd is 0" in reason
    assert migration(vm_sock) == mig  # no migration was started
    assert_clean(vm_sock, before, sysctl_before)


def test_unsupported_while_another_migration_runs(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str
) -> None:
    """A migration of someone else's (here: an ordinary one into a socket nobody reads)
    is refused before anything is touched, and left alone."""
    before = remote_temp_dirs()
    ours, theirs = socket.socketpair()
    try:
        assert "return" in qmp(vm_sock, "migrate", {"uri": "fd:ref"}, fd=theirs.fileno())
        theirs.close()
        assert migration(vm_sock) in ("setup", "active")
        with pytest.raises(LiveCaptureUnsupportedError) as ei:
            qdriver.open_live_stream(VMRef(HV, VM, VM))
        assert "another migration is in progress" in ei.value.fields["reason"]
        assert migration(vm_sock) in ("setup", "active")  # theirs, untouched
        assert not capability(vm_sock)
    finally:
        qmp(vm_sock, "migrate_cancel")
        ours.close()
        deadline = time.monotonic() + 30
        while migration(vm_sock) not in IDLE and time.monotonic() < deadline:
            time.sleep(0.1)
    assert_clean(vm_sock, before, sysctl_before)


def test_abort_mid_capture_leaves_the_guest_clean(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str
) -> None:
    before = remote_temp_dirs()
    bw_before = max_bandwidth(vm_sock)
    raw, _ = qdriver.open_live_stream(VMRef(HV, VM, VM), max_bandwidth=CAP)
    got = 0
    buf = memoryview(bytearray(1 << 20))
    try:
        while got < 8 << 20:  # then stop reading: QEMU waits on the full pipe
            got += raw.readinto(buf)
        assert migration(vm_sock) == "active"
        assert status(vm_sock) == "running"
        assert not RESTORE.exists()  # the window closed as soon as QEMU resumed the guest
        assert wait_max_bandwidth(vm_sock, CAP) == CAP
    finally:
        raw.abort()
    assert_clean(vm_sock, before, sysctl_before)
    assert max_bandwidth(vm_sock) == bw_before


def test_ssh_cut_mid_capture_leaves_the_guest_clean(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str
) -> None:
    """The SSH channel goes (a network cut: no abort script runs): the reader's writes
    fail, the client sees its reader gone and ends the snapshot on its own."""
    before = remote_temp_dirs()
    raw, _ = qdriver.open_live_stream(VMRef(HV, VM, VM))
    buf = memoryview(bytearray(1 << 20))
    got = 0
    while got < 8 << 20:
        got += raw.readinto(buf)
    assert migration(vm_sock) == "active"
    raw._s.abort()  # only the channel, as a cut would  # noqa: SLF001
    assert_clean(vm_sock, before, sysctl_before, timeout=60)


class Slow:
    """A source that reads slowly: the deadline comes mid-capture."""

    def __init__(self, src: DumpSource) -> None:
        self.src = src

    def readinto(self, view: memoryview) -> int:
        time.sleep(0.05)
        return self.src.readinto(view[: 1 << 16])

    def close_ok(self) -> None:
        self.src.close_ok()

    def abort(self) -> None:
        self.src.abort()


def test_deadline_mid_capture_leaves_the_guest_clean(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str, tmp_path: Path
) -> None:
    before = remote_temp_dirs()
    raw, _ = qdriver.open_live_stream(VMRef(HV, VM, VM))
    with pytest.raises(CaptureTimeoutError):
        write_dump(Slow(raw), tmp_path, "x.mem.gz", deadline=time.monotonic() + 1.0)
    assert_clean(vm_sock, before, sysctl_before)
    assert list(tmp_path.iterdir()) == []


def test_clean_stale_repairs_a_killed_script(
    qdriver: QemuDriver, vm_sock: Path, sysctl_before: str
) -> None:
    """The script and its client killed outright (SIGKILL) mid-capture: the migration
    still runs with the capability on; the driver's clean-up cancels it, turns the
    capability off and removes the directory."""
    before = remote_temp_dirs()
    set_max_bandwidth(vm_sock, 300 << 20)  # not QEMU's default: it must come back as it was
    raw, _ = qdriver.open_live_stream(VMRef(HV, VM, VM), max_bandwidth=CAP)
    d = Path(raw.directory or "")
    try:
        buf = memoryview(bytearray(1 << 20))
        got = 0
        while got < 4 << 20:
            got += raw.readinto(buf)
        client = int((d / "client").read_text())
        script = int(Path(f"/proc/{client}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(script, signal.SIGKILL)
        os.kill(client, signal.SIGKILL)
        assert migration(vm_sock) == "active" and capability(vm_sock)
        assert status(vm_sock) == "running"
        assert wait_max_bandwidth(vm_sock, CAP) == CAP
        removed = qdriver.clean_stale(0)
    finally:
        raw.abort()
        bw_after = max_bandwidth(vm_sock)
        set_max_bandwidth(vm_sock, QEMU_DEFAULT_BANDWIDTH)
    assert "memdump-repaired migration completed" in removed
    assert "memdump-repaired background-snapshot off" in removed
    assert f"memdump-repaired max-bandwidth {300 << 20}" in removed
    assert bw_after == 300 << 20
    assert str(d) in removed
    assert_clean(vm_sock, before, sysctl_before)


def test_live_capture_under_tcg(lab_dir: Path, sysctl_before: str, tmp_path: Path) -> None:
    """The same under TCG (the lab's fallback where /dev/kvm is missing): userfaultfd
    write protection is on the host's mapping of guest RAM, which TCG writes too."""
    vm = "qlive-tcg"
    sock = lab_dir / "run" / "qemu" / f"{vm}.qmp"
    env = {**os.environ, "MEMDUMP_LAB_ACCEL": "tcg"}
    subprocess.run(
        [str(REPO / "lab/up"), "--qemu", f"{vm}:256"],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    d = make_driver(lab_dir)
    try:
        argv = json.loads((lab_dir / "vms" / vm / "qemu.argv.json").read_text())
        assert "pc,accel=tcg" in argv
        before = remote_temp_dirs()
        poller = Poller(sock)
        poller.start()
        try:
            src = d.open_dump(VMRef(HV, vm, vm), mode="live", spill_dir=tmp_path)
            result = write_dump(src, tmp_path, "tcg.mem.gz")
        finally:
            seen = poller.stop()
        assert seen and set(seen) == {"running"}
        assert src.live["migration_status"] == "completed"  # type: ignore[attr-defined]
        assert_markers(igzip.decompress(result.path.read_bytes()), lab_dir, vm)
        assert_clean(sock, before, sysctl_before)
    finally:
        d.close()
        subprocess.run(
            [str(REPO / "lab/down"), "--vm", vm], check=False, capture_output=True, timeout=120
        )


@pytest.mark.parametrize("policy", ["sysctl-window", "none"])
def test_capture_live_or_paused_with_the_reason(
    lab_dir: Path, vm_sock: Path, sysctl_before: str, tmp_path: Path, policy: str
) -> None:
    """memdump.capture in live mode on plain QEMU: with the window allowed, a live capture
    (its fields in the manifest and the record); without, a paused one whose manifest and
    record say why."""
    settings = Settings(
        inventory_file=lab_dir / "inventory-qemu.yaml",
        dump_dir=tmp_path / "d",
        analysis={"enabled": False},
    )
    hv = settings.hypervisor(HV).model_copy(update={"live_userfaultfd": policy})
    d = open_driver(hv, settings.ssh)
    before = remote_temp_dirs()
    try:
        c = capture(d, VMRef(HV, VM, VM), settings, mode="live", hv=hv)
    finally:
        d.close()
    cap = c.manifest["capture"]
    assert cap["mode_requested"] == "live"
    if policy == "sysctl-window":
        assert cap["mode"] == "live" and c.record.capture_mode == "live"
        assert cap["live"]["userfaultfd"] == "sysctl-window"
        assert isinstance(cap["live"]["downtime_ms"], int)
        assert c.record.live_fallback_reason == ""
    else:
        assert cap["mode"] == "paused" and c.record.capture_mode == "paused"
        assert "live_userfaultfd" in cap["fallback_reason"]
        assert c.record.live_fallback_reason == cap["fallback_reason"]
    assert_markers(igzip.decompress(Path(c.record.dump_path).read_bytes()), lab_dir, VM)
    assert_clean(vm_sock, before, sysctl_before)
