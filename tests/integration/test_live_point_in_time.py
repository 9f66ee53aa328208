"""Live capture is one instant of a guest that keeps running (issue 12, Build 5: "point in
time" and "the guest keeps running").

The guest is the lab's counter guest (lab/counter.py): it loops c += 1, then stores c into
each of its 128 counter pages in page order, so an image taken at one instant has the
pages' counters non-increasing in page order within one step (tests/helpers/counter_guest
.check_consistent), and an image whose pages were read at different times does not.

- directly with QMP (no memdump driver): QEMU's background-snapshot migration into a pipe
  the test reads, converted by memdump.livecore.LiveCoreSource; under KVM and TCG;
- through the qemu and libvirt drivers' live mode (driver.open_dump(mode="live") +
  memdump.pipeline.write_dump);
- controls: a paused capture of the same guest is consistent too, and a smeared image
  (pages read at different times while the guest runs) fails the same check.

Every live image: consistent; its counter lies between the counter read just before and
just after the capture, and below what the guest wrote while the capture still ran (the
guest's counter advanced between probes taken during the capture, with the guest
"running" and the migration "active" at each); the guest runs at the end, no migration is
active, the capability is off and vm.unprivileged_userfaultfd is what it was; Volatility
reads the counter pages and the seeded markers back from the .mem.gz.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pwd
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from memdump.analysis import analyze
from memdump.hypervisors import Driver, open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.fifo import RUN_DIR
from memdump.livecore import GuestLayout, LiveCoreSource, elf_machine_from_registers
from memdump.pipeline import PipelineResult, write_dump
from memdump.settings import Settings
from tests.helpers.counter_guest import (
    Consistency,
    CounterLayout,
    CounterPage,
    FileSource,
    PhysReader,
    Probe,
    Prober,
    SmearedImage,
    assert_live_point_in_time,
    background_snapshot,
    check_consistent,
    pages_from_core,
    paused_dump,
    pmemsave_reader,
    read_core_gz,
    read_counter,
    read_pages_one_by_one,
)
from tests.helpers.lab import layout, virsh
from tests.helpers.qmp_lab import Qmp

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
MIB = 64
LIVE_PROBE_BANDWIDTH = 16 << 20  # bytes/s: see capture_with_probes
IDLE = ("none", "completed", "failed", "cancelled")


@dataclass
class CounterVM:
    name: str
    lay: CounterLayout
    markers: dict[int, bytes]
    accel: str = ""  # what QEMU really uses: "kvm" or "tcg"
    sock: Path | None = None  # plain QEMU: its QMP socket


def lab(*args: str, accel: str | None = None) -> None:
    env = dict(os.environ)
    if accel is not None:
        env["MEMDUMP_LAB_ACCEL"] = accel
    subprocess.run([str(REPO / "lab" / args[0]), *args[1:]], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip


def lab_down(name: str) -> None:
    subprocess.run(
        [str(REPO / "lab/down"), "--vm", name], check=False, capture_output=True, timeout=120
    )


def markers_of(lab_dir: Path, vm: str) -> dict[int, bytes]:
    return {m["addr"]: bytes.fromhex(m["hex"]) for m in layout(lab_dir, vm)["markers"]}


@pytest.fixture(scope="module", params=["kvm", "tcg"])
def counter_qemu(request: pytest.FixtureRequest, lab_dir: Path) -> Iterator[CounterVM]:
    """A 64 MiB counter guest as a plain QEMU of this module's own, running as root (as
    Proxmox runs QEMU: userfaultfd needs no sysctl change), under KVM or TCG."""
    want: str = request.param
    name = f"cnt-pit-{want}"
    # "kvm": the lab's own choice (KVM where usable); "tcg": forced.
    lab("up", "--qemu", f"{name}:{MIB}:counter,root", accel="tcg" if want == "tcg" else None)
    try:
        vm = CounterVM(
            name,
            CounterLayout.of_vm(lab_dir, name),
            markers_of(lab_dir, name),
            sock=lab_dir / "run" / "qemu" / f"{name}.qmp",
        )
        with Qmp(lab_dir / "run" / "qemu" / f"{name}.qmp") as q:
            kvm = q.execute("query-kvm")
        vm.accel = "kvm" if kvm["enabled"] else "tcg"
        if want == "kvm" and vm.accel != "kvm":
            pytest.skip("KVM is not usable on this host: the tcg case covers it")
        yield vm
    finally:
        lab_down(name)


@pytest.fixture
def read(qmp: Qmp, counter_qemu: CounterVM, tmp_path: Path) -> PhysReader:
    """Guest memory through ``qmp`` (pmemsave: QEMU runs as root here), once the guest
    counts."""
    d = tmp_path / "pmem"
    d.mkdir()
    reader = pmemsave_reader(qmp.execute, d)
    wait_counting(lambda: read_counter(reader, counter_qemu.lay))
    return reader


@contextmanager
def no_window() -> Iterator[None]:
    """Hold the lock every live capture's userfaultfd window holds while it has the sysctl
    at 1 (RUN_DIR/userfaultfd.lock, the drivers' protocol): other tests on this host open
    such windows at any time, and the sysctl only says something outside them."""
    run = Path(RUN_DIR)
    run.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(
        run / "userfaultfd.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        for _ in range(1200):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            raise AssertionError("a userfaultfd window held its lock for 2 minutes")
        yield
    finally:
        os.close(fd)


def settled_sysctl() -> str:
    """vm.unprivileged_userfaultfd outside any window: read under the windows' lock; a
    window whose client was killed outright (other tests do that on purpose) left the
    value to go back to in RUN_DIR/userfaultfd.restore, for the drivers' clean-up."""
    with no_window():
        try:
            return (Path(RUN_DIR) / "userfaultfd.restore").read_text().strip()
        except FileNotFoundError:
            return SYSCTL.read_text().strip()


@pytest.fixture
def sysctl_unchanged() -> Iterator[str]:
    """No test here changes vm.unprivileged_userfaultfd (only the libvirt driver's own
    window, which must put it back): the same before and after."""
    before = settled_sysctl()
    yield before
    after = settled_sysctl()
    assert after == before, f"vm.unprivileged_userfaultfd changed from {before} to {after}"


@pytest.fixture
def qmp(counter_qemu: CounterVM, sysctl_unchanged: str) -> Iterator[Qmp]:
    """A QMP connection to the counter QEMU for one test (QEMU serves one client at a
    time: held no longer). At the end the guest must run with no migration and the
    capability off."""
    assert counter_qemu.sock is not None
    q = Qmp(counter_qemu.sock)
    try:
        yield q
        assert q.status() == "running"
        assert q.migration().get("status", "none") in IDLE
        assert not q.capability()
    finally:
        q.close()


def wait_counting(read: Any) -> None:
    """The guest is in its loop (the init pass is done and the counter moves)."""
    first = read()
    for _ in range(600):
        now = read()
        if now > first > 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the counter guest does not count ({first} -> {now})")


def expected_values(cons: Consistency, lay: CounterLayout) -> dict[int, bytes]:
    """What a consistent image holds at each counter field."""
    return {
        lay.counter_addr(i): struct.pack("<Q", cons.counter - (i >= cons.step))
        for i in range(lay.pages)
    }


def assert_volatility_reads(dump: Path, cons: Consistency, vm: CounterVM) -> None:
    """memdump's Volatility check passes on the .mem.gz, and reads every counter and every
    seeded marker at its guest-physical address."""
    res = analyze(dump, expect={**expected_values(cons, vm.lay), **vm.markers}, banners=False)
    assert res.status == "passed", res
    assert res.layer == "Elf64Layer"


def live_elf(qmp: Qmp, stream: Path, spill: Path, dest: Path) -> tuple[PipelineResult, Any]:
    """The migration stream -> the ELF core, by memdump.livecore as the drivers do it."""
    src = LiveCoreSource(
        FileSource(stream),
        GuestLayout.from_mtree(qmp.hmp("info mtree -f")),
        spill_dir=spill,
        machine=elf_machine_from_registers(qmp.hmp("info registers")),
    )
    return write_dump(src, dest, "live.mem.gz"), src


# -- directly with QMP -------------------------------------------------------------------


def test_background_snapshot_is_one_instant_while_the_guest_runs(
    counter_qemu: CounterVM, qmp: Qmp, read: PhysReader, tmp_path: Path
) -> None:
    vm = counter_qemu
    snap = background_snapshot(qmp, read, vm.lay, tmp_path / "stream.bin")
    assert snap.final["status"] == "completed", snap.final
    # The pause was QEMU's snapshot set-up only: STOP, then RESUME, while the RAM went later.
    assert snap.events[:2] == ["STOP", "RESUME"], snap.events
    res, src = live_elf(qmp, snap.stream, tmp_path, tmp_path / "dumps")
    cons = check_consistent(pages_from_core(read_core_gz(res.path), vm.lay), vm.lay)
    print(
        f"[{vm.accel}] downtime {snap.final.get('downtime')} ms, total "
        f"{snap.final.get('total-time')} ms, stream {src.stream_bytes} bytes, "
        f"pages {src.live['pages']}"
    )
    # The pipe paces QEMU: a probe every 2 MiB of a ~50 MB stream, all while it runs.
    assert_live_point_in_time(
        cons, snap.before, snap.after, snap.probes, f"direct {vm.accel}", min_during=10
    )
    assert qmp.status() == "running"
    assert read_counter(read, vm.lay) > snap.after  # and it still runs
    assert_volatility_reads(res.path, cons, vm)


def test_paused_capture_is_one_instant_too(
    counter_qemu: CounterVM, qmp: Qmp, read: PhysReader
) -> None:
    """Control: QMP stop + dump-guest-memory, as a paused capture takes it. The image
    holds exactly the counter of the paused guest."""
    vm = counter_qemu
    counter, core = paused_dump(qmp, read, vm.lay)
    cons = check_consistent(pages_from_core(core, vm.lay), vm.lay)
    print(f"paused {vm.accel}: counter {counter}, image {cons.counter} step {cons.step}")
    assert cons.counter == counter
    assert qmp.status() == "running"
    wait_counting(lambda: read_counter(read, vm.lay))


def test_smeared_image_is_rejected(counter_qemu: CounterVM, qmp: Qmp, read: PhysReader) -> None:
    """Negative control: the check can fail. Pages read one by one while the guest runs,
    with the guest getting through at least two passes between the first half and the
    second (as a tool copying a running guest's memory would read them), are rejected;
    the same reader with the guest stopped gives a consistent image."""
    vm, lay = counter_qemu, counter_qemu.lay
    pages = read_pages_one_by_one(read, lay)
    first = pages[: lay.pages // 2]
    seen = read_counter(read, lay)
    for _ in range(1000):
        if read_counter(read, lay) >= seen + 2:
            break
        time.sleep(0.01)
    second = read_pages_one_by_one(read, lay)[lay.pages // 2 :]
    smeared: list[CounterPage] = first + second
    with pytest.raises(SmearedImage) as ei:
        check_consistent(smeared, lay)
    print(f"smeared {vm.accel}: {ei.value}")
    # A single page edited into a consistent image is caught too.
    qmp.execute("stop")
    try:
        still = read_pages_one_by_one(read, lay)
    finally:
        qmp.execute("cont")
    cons = check_consistent(still, lay)
    bumped = list(still)
    i = lay.pages - 1
    bumped[i] = CounterPage(i, still[i].magic, cons.counter + 1, still[i].stored_index)
    with pytest.raises(SmearedImage):
        check_consistent(bumped, lay)


# -- through the drivers' live mode ------------------------------------------------------


@dataclass
class DriverCapture:
    result: PipelineResult
    source: Any
    before: int
    after: int
    probes: list[Probe] = field(default_factory=list)


def capture_with_probes(
    driver: Driver,
    ref: VMRef,
    mode: str,
    dest: Path,
    counter: Callable[[], int],
    run_state: Callable[[], str],
    migration: Callable[[], str],
) -> DriverCapture:
    """driver.open_dump + write_dump. Live: the guest is probed (counter, run state,
    migration status) from a thread of its own all along the capture. Not paused: a
    paused dump holds the monitor (QMP dump-guest-memory, libvirt's dump job) until its
    end, and the probes would only wait for it."""
    before = counter()
    kw: dict[str, Any] = {}
    prober = Prober(counter, run_state, migration)
    if mode == "live":
        # The snapshot capped at 16 MiB/s lasts about 4 s for the 64 MiB guest, whatever
        # the machine: uncapped under KVM it can end between two probes (each is three
        # monitor round trips), and "the guest ran during it" would go unobserved.
        kw = {"mode": "live", "spill_dir": dest, "buffer_bytes": 16 << 20}
        kw["max_bandwidth"] = LIVE_PROBE_BANDWIDTH
        prober.start()
    try:
        src = driver.open_dump(ref, **kw)
        res = write_dump(src, dest, f"{mode}.mem.gz")
    finally:
        probes = prober.stop() if mode == "live" else []
    return DriverCapture(res, src, before, counter(), probes)


def qemu_monitor(sock: Path, pmem: Path) -> tuple[Any, Any, Any]:
    """Probes on their own QMP connections, each closed at once: the driver's script
    needs its turn at the socket too."""

    def one(f: Any) -> Any:
        with Qmp(sock) as q:
            return f(q)

    return (
        lambda lay: one(lambda q: read_counter(pmemsave_reader(q.execute, pmem), lay)),
        lambda: one(lambda q: q.status()),
        lambda: one(lambda q: str(q.migration().get("status", "none"))),
    )


@pytest.fixture
def qemu_driver(lab_dir: Path) -> Iterator[Driver]:
    settings = Settings(inventory_file=lab_dir / "inventory-qemu.yaml")
    d = open_driver(settings.hypervisor("lab-qemu"), settings.ssh)
    yield d
    d.close()


@pytest.mark.parametrize("mode", ["live", "paused"])
def test_qemu_driver_capture_is_one_instant(
    counter_qemu: CounterVM,
    qemu_driver: Driver,
    sysctl_unchanged: str,
    tmp_path: Path,
    mode: str,
) -> None:
    vm = counter_qemu
    assert vm.sock is not None
    pmem = tmp_path / "pmem"
    pmem.mkdir()
    counter_of, run_state, migration = qemu_monitor(vm.sock, pmem)
    counter = lambda: counter_of(vm.lay)  # noqa: E731
    wait_counting(counter)
    cap = capture_with_probes(
        qemu_driver, VMRef("lab-qemu", vm.name, vm.name), mode, tmp_path, counter, run_state,
        migration,
    )  # fmt: skip
    cons = check_consistent(pages_from_core(read_core_gz(cap.result.path), vm.lay), vm.lay)
    if mode == "live":
        live = cap.source.live
        print(f"qemu driver {vm.accel}: {live.get('downtime_ms')} ms pause, {live.get('pages')}")
        assert live["mode"] == "live" and live["userfaultfd"] == "root"
        assert_live_point_in_time(
            cons, cap.before, cap.after, cap.probes, f"qemu driver {vm.accel}"
        )
    else:
        print(f"qemu driver paused {vm.accel}: {cap.before} <= {cons.counter} <= {cap.after}")
        assert cap.before <= cons.counter <= cap.after
    assert run_state() == "running"
    assert migration() in IDLE
    with Qmp(vm.sock) as q:
        assert not q.capability()
    assert_volatility_reads(cap.result.path, cons, vm)


@pytest.fixture(scope="module", params=["kvm", "tcg"])
def counter_domain(request: pytest.FixtureRequest, lab_dir: Path) -> Iterator[CounterVM]:
    """A 64 MiB counter guest as a libvirt domain of this module's own, domain type kvm
    (the lab's choice) or qemu (TCG). libvirt runs its QEMU as libvirt-qemu: the driver
    needs its userfaultfd window."""
    want: str = request.param
    name = f"cnt-pit-virt-{want}"
    lab("up", "--counter", f"{name}:{MIB}", accel="tcg" if want == "tcg" else None)
    try:
        vm = CounterVM(name, CounterLayout.of_vm(lab_dir, name), markers_of(lab_dir, name))
        kvm = virsh("qemu-monitor-command", name, "--hmp", "info kvm")
        vm.accel = "kvm" if "enabled" in kvm and "disabled" not in kvm else "tcg"
        if want == "kvm" and vm.accel != "kvm":
            pytest.skip("KVM is not usable on this host: the tcg case covers it")
        yield vm
    finally:
        lab_down(name)


def sysctl_window(sysctl: str) -> str:
    return "unprivileged-allowed" if sysctl == "1" else "sysctl-window"


def virsh_qmp(domain: str, command: str, args: dict[str, Any] | None = None) -> Any:
    doc = json.loads(
        virsh(
            "qemu-monitor-command",
            domain,
            json.dumps({"execute": command, **({"arguments": args} if args else {})}),
        )
    )
    return doc["return"]


@pytest.fixture
def qemu_user_dir() -> Iterator[Path]:
    """A 0700 directory of libvirt's QEMU user (libvirt-qemu, not root) for its pmemsave
    files, in /tmp (pytest's tmp dirs are root's and closed to it)."""
    d = Path(tempfile.mkdtemp(prefix="memdump-test-pmem."))
    try:
        pw = pwd.getpwnam("libvirt-qemu")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def virsh_migration(domain: str) -> str:
    return str(virsh_qmp(domain, "query-migrate").get("status", "none"))


def virsh_capability(domain: str) -> bool:
    caps = virsh_qmp(domain, "query-migrate-capabilities")
    return any(c["capability"] == "background-snapshot" and c["state"] for c in caps)


@pytest.mark.parametrize("mode", ["live", "paused"])
def test_libvirt_driver_capture_is_one_instant(
    counter_domain: CounterVM,
    libvirt_window_driver: Driver,
    sysctl_unchanged: str,
    qemu_user_dir: Path,
    tmp_path: Path,
    mode: str,
) -> None:
    vm = counter_domain
    reader = pmemsave_reader(functools.partial(virsh_qmp, vm.name), qemu_user_dir)

    def counter() -> int:
        return read_counter(reader, vm.lay)

    def run_state() -> str:
        return virsh("domstate", vm.name).strip()

    def migration() -> str:
        return virsh_migration(vm.name)

    wait_counting(counter)
    ref = libvirt_window_driver.resolve(vm.name)
    cap = capture_with_probes(
        libvirt_window_driver, ref, mode, tmp_path, counter, run_state, migration
    )
    cons = check_consistent(pages_from_core(read_core_gz(cap.result.path), vm.lay), vm.lay)
    if mode == "live":
        live = cap.source.live
        print(f"libvirt driver {vm.accel}: {live.get('downtime_ms')} ms pause, {live.get('pages')}")
        # libvirt runs QEMU as libvirt-qemu and the sysctl is 0 here: the driver's window.
        assert live["mode"] == "live" and live["userfaultfd"] == sysctl_window(sysctl_unchanged)
        assert_live_point_in_time(cons, cap.before, cap.after, cap.probes, f"libvirt {vm.accel}")
    else:
        print(f"libvirt driver paused {vm.accel}: {cap.before} <= {cons.counter} <= {cap.after}")
        assert cap.before <= cons.counter <= cap.after
    assert run_state() == "running"
    assert migration() in IDLE
    assert not virsh_capability(vm.name)
    assert_volatility_reads(cap.result.path, cons, vm)
