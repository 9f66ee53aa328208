"""Live capture through libvirt on the lab (issue 12), over the lab's real sshd: QEMU 7.2
run by libvirt as libvirt-qemu with vm.unprivileged_userfaultfd=0, so the capture needs the
userfaultfd window. Each test uses domains of its own (256 MiB, seeded RAM; 1 GiB for
the byte-exact comparison with virsh dump) and checks afterwards: guest
running, no migration active, background-snapshot off, no write protection left in QEMU,
the sysctl as it was, the window's lock free, no temp dir."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from memdump.errors import CaptureTimeoutError, LiveCaptureUnsupportedError
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.transport import open_transport

if TYPE_CHECKING:
    from memdump.livecore import LiveCoreSource

from tests.helpers.elf_compare import (
    assert_same_lab_guest,
    compare_source_with_file,
    lab_markers,
)
from tests.helpers.lab import (
    URI,
    assert_markers,
    extra_lab_vm,
    layout,
    virsh,
)
from tests.helpers.libvirt_live import (
    ACTIVE,
    SYSCTL,
    assert_live_clean,
    background_snapshot_on,
    guest_thp,
    live_dirs,
    migration_status,
    qmp,
)

pytestmark = pytest.mark.lab

VM = "vlive-t1"
FRESH = "vlive-t2"
HUGE = "vlive-t3"
CAP = 200 << 20  # a cap on the snapshot (Settings.live_max_bandwidth_bytes)


@pytest.fixture(scope="module")
def vm(lab_dir: Path) -> Iterator[str]:
    with extra_lab_vm(VM, 256) as name:
        yield name


@pytest.fixture(scope="module")
def sysctl_before() -> str:
    return SYSCTL.read_text().strip()


def _driver(lab_dir: Path, setting: str, restore_huge_pages: bool = True) -> LibvirtDriver:
    s = Settings(inventory_file=lab_dir / "inventory.yaml")
    hv: HypervisorConfig = s.inventory[0].model_copy(
        update={"live_userfaultfd": setting, "live_restore_huge_pages": restore_huge_pages}
    )
    return LibvirtDriver(hv, open_transport(hv, s.ssh))


@pytest.fixture
def live_driver(lab_dir: Path) -> Iterator[LibvirtDriver]:
    d = _driver(lab_dir, "sysctl-window")
    yield d
    d.close()


def max_bandwidth(vm: str) -> int:
    ret = qmp(vm, "query-migrate-parameters")
    assert isinstance(ret, dict)
    return int(ret["max-bandwidth"])


def set_max_bandwidth(vm: str, value: int) -> None:
    doc = {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": value}}
    assert "return" in json.loads(virsh("qemu-monitor-command", vm, json.dumps(doc)))


def wait_max_bandwidth(vm: str, value: int) -> int:
    """max-bandwidth once it is ``value`` (the script sets the cap just after the
    snapshot's start), or after 10 s."""
    deadline = time.monotonic() + 10
    while (now := max_bandwidth(vm)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def _dir_of(src: object) -> str | None:
    from memdump.livecore import LiveCoreSource

    assert isinstance(src, LiveCoreSource)
    d: str | None = src.stream._s.dir  # type: ignore[attr-defined]
    return d


class StatePoller(threading.Thread):
    """``virsh domstate`` over and over while the capture runs: (start, end, state)."""

    def __init__(self, vm: str) -> None:
        super().__init__(daemon=True)
        self.vm = vm
        self.seen: list[tuple[float, float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.time()
            state = virsh("domstate", self.vm, check=False).strip()
            self.seen.append((t0, time.time(), state))


def test_live_capture_of_a_running_guest(
    vm: str, live_driver: LibvirtDriver, lab_dir: Path, tmp_path: Path, sysctl_before: str
) -> None:
    assert sysctl_before == "0"  # the lab: the window is what makes live possible
    ref = VMRef("lab", vm, vm)
    bw_before = max_bandwidth(vm)
    poller = StatePoller(vm)
    poller.start()
    src: LiveCoreSource | None = None
    try:
        opened = live_driver.open_dump(ref, mode="live", spill_dir=tmp_path, buffer_bytes=4 << 20)
        from memdump.livecore import LiveCoreSource

        assert isinstance(opened, LiveCoreSource)
        src = opened
        directory = _dir_of(src)
        # The stream has begun and is not being read: the migration is running now.
        assert migration_status(vm) == "active"
        assert background_snapshot_on(vm) is True
        # No cap asked for: QEMU's max-bandwidth is left alone (it does not rate-limit
        # a background snapshot).
        assert max_bandwidth(vm) == bw_before
        # libvirt does not see it as a job of its own, and domjobabort leaves it alone.
        assert "None" in virsh("domjobinfo", vm)
        abort = subprocess.run(
            ["virsh", "-c", URI, "domjobabort", vm], capture_output=True, text=True, timeout=60
        )
        assert abort.returncode != 0 and "no job is active" in abort.stderr
        res = write_dump(src, tmp_path, "live.mem.gz")
    except BaseException:
        if src is not None:
            src.abort()
        raise
    finally:
        poller.stop.set()
        poller.join()
    assert_markers(gzip.open(res.path).read(), lab_dir, vm)
    live = src.live
    assert live["mode"] == "live" and live["driver"] == "libvirt"
    assert live["migration_status"] == "completed"
    assert live["userfaultfd"] == "sysctl-window"
    assert 0 < live["userfaultfd_window_ms"] < 60_000
    assert isinstance(live["downtime_ms"], int)
    assert datetime.fromisoformat(live["snapshot_at"]).tzinfo is not None
    # QEMU's STOP and RESUME events were seen (the pause as they show it).
    assert live["snapshot_at"] == live["stopped_at"]
    assert live["pause_ms_events"] >= 0
    assert "custom-monitor" in live["taint"]
    assert "max_bandwidth" not in live
    assert max_bandwidth(vm) == bw_before
    assert len(live["stream_sha256"]) == 64 and live["stream_bytes"] > 0
    window = src.pause_window
    assert window is not None
    # The guest ran throughout: every domstate is "running" but those that overlap the
    # script's window around the snapshot's start (QEMU stops the vCPUs for milliseconds
    # there, and libvirt follows QEMU's STOP/RESUME events).
    t0, t1 = window[0].timestamp(), window[1].timestamp()
    assert len(poller.seen) >= 2
    off = [s for s in poller.seen if s[2] != "running" and not (s[0] <= t1 and s[1] >= t0)]
    assert off == []
    assert_live_clean(vm, sysctl_before, directory)


def _loads(core: bytes) -> list[tuple[int, ...]]:
    """(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align) of each
    PT_LOAD, in header order."""
    import struct

    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", core, 32)[0],
        *struct.unpack_from("<HH", core, 54),
    )
    hdrs = [struct.unpack_from("<IIQQQQQQ", core, phoff + i * phentsize) for i in range(phnum)]
    return [h for h in hdrs if h[0] == 1]


def test_live_elf_equals_virsh_dump_in_every_pt_load(
    vm: str, live_driver: LibvirtDriver, tmp_path: Path, sysctl_before: str
) -> None:
    """The lab's seeded guest does not write its memory (it halts): its live image and
    libvirt's paused dump must agree byte for byte in every PT_LOAD, with the same program
    headers but p_offset (the live core lays data out in the order the stream sends it)."""
    res = write_dump(
        live_driver.open_dump(VMRef("lab", vm, vm), mode="live", spill_dir=tmp_path),
        tmp_path,
        "live.mem.gz",
    )
    live = gzip.open(res.path).read()
    reference = tmp_path / "paused.elf"
    virsh("dump", "--memory-only", "--format", "elf", vm, str(reference))
    paused = reference.read_bytes()
    assert live[:16] == paused[:16]  # ELF identification
    a, b = _loads(live), _loads(paused)
    assert len(a) == len(b) >= 2
    assert [h[:2] + h[3:] for h in a] == [h[:2] + h[3:] for h in b]
    for x, y in zip(a, b, strict=True):
        assert live[x[2] : x[2] + x[5]] == paused[y[2] : y[2] + y[5]], f"PT_LOAD {x[4]:#x}"
    assert_live_clean(vm, sysctl_before)


# This module's own larger domains (bx-: names no other test uses): 1 GiB seeded as the
# lab seeds every guest, and 4 GiB (RAM above the PCI hole) zero but for the markers
# (lab/up's sparse kind), which costs about what a small guest does; the seeded 4 GiB
# domain cost this module 76 s of CI's 30 minutes, and is compared the same way, PT_LOAD
# by PT_LOAD, by benchmarks/capture.py's live method.
BIG = {1024: ("bx-lv-1g", ""), 4096: ("bx-lv-4g", "sparse")}


@pytest.fixture(scope="module", params=sorted(BIG), ids=["1G", "4G-sparse"])
def big_vm(request: pytest.FixtureRequest, lab_dir: Path) -> Iterator[str]:
    """A 1 GiB and a 4 GiB lab domain, each removed once its tests are done, so no test
    of another module (e2e captures of "all" VMs) ever sees it."""
    mib: int = request.param
    name, kind = BIG[mib]
    with extra_lab_vm(name, mib, kind) as vm:
        yield vm


def test_live_elf_equals_virsh_dump_of_a_larger_guest(
    big_vm: str, live_driver: LibvirtDriver, lab_dir: Path, tmp_path: Path, sysctl_before: str
) -> None:
    """As the 256 MiB test above, for a 1 GiB and a 4 GiB guest (the GiB above the PCI
    hole in its own PT_LOAD), the live core streamed against virsh
    dump's file (tests/helpers/elf_compare: never a whole core in memory): the same ELF
    header (bar e_ehsize, which QEMU 7.2 writes as 8), the same PT_LOAD headers but p_offset
    (the live core lays data out in the order QEMU's sweep sends RAM blocks), every PT_LOAD
    equal byte for byte, the seeded markers in both. The notes differ: virsh dump's hold the
    vCPU's registers (NT_PRSTATUS and QEMU's CPU state), which a live core cannot have (the
    guest runs on through the snapshot instant); it carries a MEMDUMP note of its own saying
    so. The paused dump is taken first (the guest is quiescent: the order does not matter)
    so that the live one can be compared as it arrives."""
    vm = big_vm
    lay = layout(lab_dir, vm)
    grab = {a: len(b) for a, b in lab_markers(lay).items()}
    reference = tmp_path / "paused.elf"
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    try:
        virsh("dump", "--memory-only", "--format", "elf", vm, str(reference))
        assert virsh("domstate", vm).strip() == "running"
        src = live_driver.open_dump(VMRef("lab", vm, vm), mode="live", spill_dir=spill)
        live, paused = compare_source_with_file(src, reference, grab)
    finally:
        reference.unlink(missing_ok=True)  # gone as soon as compared
    assert_live_clean(vm, sysctl_before)
    assert list(spill.iterdir()) == []
    assert_same_lab_guest(live, paused, lay)


def test_live_userfaultfd_none_is_unsupported_before_the_guest_is_touched(
    lab_dir: Path, tmp_path: Path, sysctl_before: str
) -> None:
    status_xml = Path(f"/run/libvirt/qemu/{FRESH}.xml")
    with extra_lab_vm(FRESH, 256) as name:
        assert "custom-monitor" not in status_xml.read_text()  # a fresh domain
        drv = _driver(lab_dir, "none")
        try:
            with pytest.raises(LiveCaptureUnsupportedError) as ei:
                drv.open_dump(VMRef("lab", name, name), mode="live", spill_dir=tmp_path)
        finally:
            drv.close()
        reason = ei.value.fields["reason"]
        assert "live_userfaultfd: sysctl-window" in reason
        assert "vm.unprivileged_userfaultfd is 0" in reason
        # Not even a monitor command (which taints the domain) was issued.
        assert "custom-monitor" not in status_xml.read_text()
        assert live_dirs(name) == []
        assert SYSCTL.read_text().strip() == sysctl_before
        assert virsh("domstate", name).strip() == "running"


def test_abort_mid_capture_leaves_the_guest_running(
    vm: str, live_driver: LibvirtDriver, tmp_path: Path, sysctl_before: str
) -> None:
    bw_before = max_bandwidth(vm)
    set_max_bandwidth(vm, 300 << 20)  # not QEMU's default: it must come back as it was
    try:
        src = live_driver.open_dump(
            VMRef("lab", vm, vm),
            mode="live",
            spill_dir=tmp_path,
            buffer_bytes=4 << 20,
            max_bandwidth=CAP,
        )
        directory = _dir_of(src)
        buf = memoryview(bytearray(1 << 20))
        assert src.readinto(buf) > 0
        assert migration_status(vm) == "active"
        assert wait_max_bandwidth(vm, CAP) == CAP
        src.abort()
        assert_live_clean(vm, sysctl_before, directory)
        assert max_bandwidth(vm) == 300 << 20
    finally:
        set_max_bandwidth(vm, bw_before)
    # QEMU 7.2 would leave guest RAM write-protected after a cancel: the abort drained
    # the snapshot to its end instead.
    assert migration_status(vm) == "completed"


def _live_script_pid(directory: str) -> int:
    """The pid of the live script (sh) that made ``directory`` and holds its lock."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        if b"memdump_live_end" not in cmd or not cmd.startswith(b"sh\0"):
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == f"{directory}/lock":
                    return int(entry)
            except OSError:
                continue
    raise AssertionError(f"no live script holds {directory}/lock")


def test_clean_stale_repairs_a_killed_live_script(
    vm: str, live_driver: LibvirtDriver, tmp_path: Path, sysctl_before: str
) -> None:
    """SIGKILL to the script mid-capture: nothing of its own clean-up runs. Its reader
    (its own session) drains the snapshot to the end, so QEMU is not left write-protected,
    but the capability stays on and the directory stays: clean_stale repairs both."""
    bw_before = max_bandwidth(vm)
    src = live_driver.open_dump(
        VMRef("lab", vm, vm),
        mode="live",
        spill_dir=tmp_path,
        buffer_bytes=4 << 20,
        max_bandwidth=CAP,
    )
    directory = _dir_of(src)
    assert directory is not None
    try:
        assert wait_max_bandwidth(vm, CAP) == CAP
        os.kill(_live_script_pid(directory), 9)
    finally:
        src.abort()
    assert max_bandwidth(vm) == CAP  # nobody put it back
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and migration_status(vm) in ACTIVE:
        time.sleep(0.2)
    assert migration_status(vm) == "completed"
    assert background_snapshot_on(vm) is True  # nobody turned it off
    assert Path(directory, "live").exists()
    time.sleep(2.1)  # clean_stale takes directories at least min_age_sec old
    removed = live_driver.clean_stale(min_age_sec=2)
    assert f"live-repaired {vm}" in removed
    assert directory in removed
    assert_live_clean(vm, sysctl_before, directory)
    assert max_bandwidth(vm) == bw_before


def _newest_child(marker: bytes) -> int:
    """This process's newest live child whose command line holds ``marker`` (the ssh
    client of the stream just opened; an earlier test's may still be going away)."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        state, ppid, start = fields[0], fields[1], int(fields[19])
        if ppid == me and state != "Z" and cmd.startswith(b"ssh\0") and marker in cmd:
            found.append((start, int(entry)))
    assert found, "no ssh client of this test's stream"
    return max(found)[1]


def test_ssh_cut_mid_capture_leaves_the_guest_running(
    vm: str, live_driver: LibvirtDriver, tmp_path: Path, sysctl_before: str
) -> None:
    """The collector's SSH connection dies (its client killed) mid-stream: nothing tells
    the script; its reader's stdout breaks and it drains the snapshot into /dev/null."""
    from memdump.errors import MemdumpError

    src = live_driver.open_dump(
        VMRef("lab", vm, vm), mode="live", spill_dir=tmp_path, buffer_bytes=4 << 20
    )
    directory = _dir_of(src)
    try:
        os.kill(_newest_child(b"memdump_live_end"), 9)
    except BaseException:
        src.abort()
        raise
    with pytest.raises(MemdumpError):
        write_dump(src, tmp_path, "cut.mem.gz")
    assert not (tmp_path / "cut.mem.gz").exists()
    assert_live_clean(vm, sysctl_before, directory)
    assert migration_status(vm) == "completed"


def test_deadline_mid_capture_leaves_the_guest_running(
    vm: str, live_driver: LibvirtDriver, tmp_path: Path, sysctl_before: str
) -> None:
    src = live_driver.open_dump(
        VMRef("lab", vm, vm), mode="live", spill_dir=tmp_path, buffer_bytes=4 << 20
    )
    directory = _dir_of(src)
    fired = threading.Event()

    def slow(done: int, total: int | None) -> None:
        # The first progress report holds the pipeline past the deadline (the watchdog
        # aborts the source while the capture is mid-stream).
        if not fired.is_set():
            fired.set()
            time.sleep(3)

    with pytest.raises(CaptureTimeoutError):
        write_dump(src, tmp_path, "d.mem.gz", progress=slow, deadline=time.monotonic() + 1.0)
    assert fired.is_set()
    assert not (tmp_path / "d.mem.gz").exists()
    assert_live_clean(vm, sysctl_before, directory)


def test_huge_pages_are_put_back_after_a_live_capture_when_asked(
    lab_dir: Path, tmp_path: Path, sysctl_before: str
) -> None:
    """A fresh domain's guest RAM is on huge pages. A live capture with
    live_restore_huge_pages leaves it so (the manifest says how many 2 MiB regions were
    put back) and its RSS as it was; one without leaves most of it on 4 KiB pages, the
    state that makes the next capture's pause ~5x longer at 4 GiB."""
    with extra_lab_vm(HUGE, 256) as vm:
        ref = VMRef("lab", vm, vm)
        start = guest_thp(vm)
        assert start is not None
        huge0, rss0 = start
        assert huge0 >= 200 << 10  # of 256 MiB
        for restore in (True, False):
            drv = _driver(lab_dir, "sysctl-window", restore_huge_pages=restore)
            try:
                src = drv.open_dump(ref, mode="live", spill_dir=tmp_path)
                write_dump(src, tmp_path, f"live-{restore}.mem.gz")
            finally:
                drv.close()
            assert_live_clean(vm, sysctl_before)
            after = guest_thp(vm)
            assert after is not None
            live = src.live  # type: ignore[attr-defined]
            if restore:
                hp = live["huge_pages"]
                assert hp["regions_before"] == huge0 // 2048
                assert hp["restored"] == hp["regions_before"] and hp["not_restored"] == 0
                assert after[0] == huge0
                # Only what was a huge page before became one again: no RSS grown.
                assert after[1] <= rss0 + 2048
            else:
                assert "huge_pages" not in live
                assert after[0] < huge0 // 2
