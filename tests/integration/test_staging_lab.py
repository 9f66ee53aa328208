"""File-staged dumps (Settings.staging = "file") of real lab VMs over the lab's sshd:
byte-exact, nothing left on the hypervisor, a pause window that no longer depends on how
fast the dump is consumed, and a free-space check that refuses before the guest pauses."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from isal import igzip

from memdump.capture import capture
from memdump.errors import CaptureTimeoutError, DumpFailedError, InsufficientSpaceError
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.manifest import manifest_path
from memdump.pipeline import DumpSource, PipelineResult, write_dump
from memdump.settings import AnalysisSettings, Settings
from tests.helpers.lab import (
    URI,
    assert_hypervisor_clean,
    assert_markers,
    extra_lab_vm,
    remote_temp_dirs,
    virsh,
)

pytestmark = pytest.mark.lab

VM = "vm-web-01"
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _staged(driver: Driver, ref: VMRef, settings: Settings) -> DumpSource:
    assert isinstance(driver, LibvirtDriver)
    return driver.open_dump(ref, staging="file", margin=settings.disk_space_margin)


def _staged_files() -> list[Path]:
    """Regular files named mem in the remote temp dirs (FIFO dumps have FIFOs there)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return [p for p in tmp.glob("memdump.*/mem") if stat.S_ISREG(p.lstat().st_mode)]


def test_file_staged_dump_is_byte_exact(
    driver: Driver, settings: Settings, lab_dir: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int, int]] = []

    def peek(done: int, total: int | None) -> None:
        # Streaming: the staged file is complete on the hypervisor, private, and still there.
        if not seen:
            for f in _staged_files():
                st = f.stat()
                seen.append(
                    (stat.S_IMODE(f.parent.stat().st_mode), stat.S_IMODE(st.st_mode), st.st_size)
                )

    virsh("suspend", VM)  # paused, its memory cannot change between the two dumps
    try:
        ref = driver.resolve(VM)
        src = _staged(driver, ref, settings)
        result = write_dump(src, settings.dump_dir, "staged.mem.gz", progress=peek)
        local = tmp_path / "reference.elf"
        virsh("dump", "--memory-only", "--format", "elf", VM, str(local))
    finally:
        virsh("resume", VM)

    raw = igzip.decompress(result.path.read_bytes())
    expected = local.read_bytes()
    assert hashlib.sha256(expected).hexdigest() == result.raw_sha256
    assert raw == expected and result.raw_bytes == len(expected)
    assert_markers(raw, lab_dir, VM)

    assert getattr(src, "staging", None) == "file"
    window = getattr(src, "pause_window", None)
    assert window is not None and window[0] < window[1]
    assert (0o700, 0o600, len(expected)) in seen
    assert_hypervisor_clean(VM)
    assert remote_temp_dirs() == [] and _staged_files() == []


def test_capture_with_file_staging_says_so_in_its_manifest(
    driver: Driver, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # capture() itself passes no staging yet: the same call capture.py is to make.
    monkeypatch.setattr(
        driver,
        "open_dump",
        functools.partial(driver.open_dump, staging="file", margin=settings.disk_space_margin),
    )
    no_analysis = AnalysisSettings(enabled=False)
    settings = settings.model_copy(update={"analysis": no_analysis, "staging": "file"})
    # Staging is about paused dumps: paused whatever the inventory's capture_mode.
    result = capture(driver, driver.resolve(VM), settings, mode="paused")
    cap = result.manifest["capture"]
    assert cap["staging"] == "file" and cap["mode"] == "paused"
    assert 0 < cap["pause_window_sec"] < cap["duration_sec"]
    assert manifest_path(Path(result.record.dump_path)).is_file()
    assert remote_temp_dirs() == []
    assert virsh("domstate", VM).strip() == "running"


class _Throttled:
    """A consumer that takes ``delay`` seconds per 4 MiB, like a slow disk or network."""

    def __init__(self, inner: DumpSource, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self._n = 0

    def readinto(self, view: memoryview) -> int:
        got = self._inner.readinto(view)
        before, self._n = self._n, self._n + got
        if self._delay and got:
            time.sleep(self._delay * ((self._n >> 22) - (before >> 22)))
        return got

    def close_ok(self) -> None:
        self._inner.close_ok()

    def abort(self) -> None:
        self._inner.abort()


def _timed_dump(
    driver: LibvirtDriver, ref: VMRef, staging: str, delay: float, out: Path
) -> tuple[float, float, PipelineResult]:
    src = driver.open_dump(ref, staging=staging)  # type: ignore[arg-type]
    t0 = time.monotonic()
    result = write_dump(_Throttled(src, delay), out, f"{staging}-{delay}.mem.gz")
    total = time.monotonic() - t0
    result.path.unlink()
    assert src.pause_window is not None
    paused, resumed = src.pause_window
    return (resumed - paused).total_seconds(), total, result


def test_a_slow_consumer_keeps_a_fifo_dump_paused_but_not_a_staged_one(
    driver: Driver, tmp_path: Path
) -> None:
    assert isinstance(driver, LibvirtDriver)
    ref = driver.resolve(VM)
    delay = 0.05  # x 64 chunks of 4 MiB (256 MiB VM): ~3.2 s more to consume the dump
    windows: dict[tuple[str, float], float] = {}
    shas = set()
    for staging in ("fifo", "file"):
        for d in (0.0, delay):
            window, total, result = _timed_dump(driver, ref, staging, d, tmp_path)
            windows[staging, d] = window
            shas.add(result.raw_sha256)
            assert total >= window
            if d:
                assert total > 64 * d
    print(windows)
    assert len(shas) == 1  # the lab guest never writes its memory: four identical dumps
    # FIFO: the guest stays paused while the slow consumer drains the dump.
    assert windows["fifo", delay] > windows["fifo", 0.0] + 2.0
    # Staged: the guest resumes once the local file is written, whatever the consumer.
    assert windows["file", delay] < windows["file", 0.0] + 0.5
    assert windows["file", delay] < windows["fifo", delay] / 3
    assert_hypervisor_clean(VM)


# -- a VM of this module: free space, abort while QEMU writes the file ----------------------

OWN_VM = "vm-stage-t1"
OWN_MIB = 1024  # ~1 s for QEMU to write it: time to abort that; 1.1 GiB > the 64 MiB tmpfs


@pytest.fixture(scope="module")
def own_vm(lab_dir: Path) -> Iterator[str]:
    """Nothing else dumps or pauses it while its events are watched."""
    with extra_lab_vm(OWN_VM, OWN_MIB) as name:
        yield name


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 64 MiB tmpfs on the hypervisor (this machine) for the staged dump's temp dir."""
    mnt = Path(tempfile.mkdtemp(prefix="memdump-staging-tmpfs-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mnt)],
        check=True,
        capture_output=True,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        mnt.rmdir()


class _QemuEvents:
    """QEMU's own events for one domain (STOP, DUMP_COMPLETED, RESUME...) as they come,
    from ``virsh qemu-monitor-event --loop`` in the background."""

    def __init__(self, vm: str, out: Path) -> None:
        self._out = out
        self._f = out.open("wb")
        self._p = subprocess.Popen(
            ["virsh", "-c", URI, "qemu-monitor-event", "--domain", vm, "--loop"],
            stdout=self._f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # no "ready" message: give it time to register
        assert self._p.poll() is None, out.read_text()

    def events(self) -> list[tuple[str, str]]:
        """(name, details) in order."""
        out = []
        for line in self._out.read_text().splitlines():
            if line.startswith("event "):
                out.append((line.split()[1], line.split(": ", 1)[-1]))
        return out

    def wait_for(self, name: str, count: int = 1, timeout: float = 20.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if [n for n, _ in self.events()].count(name) >= count:
                break
            time.sleep(0.01)
        return self.events()

    def stop(self) -> None:
        self._p.terminate()
        self._p.wait(10)
        self._f.close()


def test_not_enough_space_on_the_hypervisor_refuses_before_the_pause(
    settings: Settings, own_vm: str, small_tmpfs: Path, tmp_path: Path
) -> None:
    hv = settings.inventory[0].model_copy(update={"staging_dir": str(small_tmpfs)})
    drv = open_driver(hv, settings.ssh)
    events = _QemuEvents(own_vm, tmp_path / "events.txt")
    try:
        ref = drv.resolve(own_vm)
        with pytest.raises(InsufficientSpaceError) as ei:
            write_dump(_staged(drv, ref, settings), settings.dump_dir, "x.mem.gz")
        refused = events.events()
        # Control: the watcher does see this VM pause.
        virsh("suspend", own_vm)
        virsh("resume", own_vm)
        after = events.wait_for("RESUME")
    finally:
        events.stop()
        drv.close()
    e = ei.value
    assert not e.retryable
    assert e.fields["hypervisor"] == "lab" and e.fields["vm_id"] == own_vm
    assert e.fields["path"] == str(small_tmpfs)
    assert e.fields["memory_bytes"] == OWN_MIB * MiB
    assert e.fields["needed_bytes"] == int(OWN_MIB * MiB * 1.1)
    assert 0 < e.fields["free_bytes"] <= 64 * MiB
    assert "lab" in str(e) and str(small_tmpfs) in str(e)
    assert refused == []  # the guest never paused
    assert [n for n, _ in after] == ["STOP", "RESUME"]
    assert virsh("domstate", own_vm).strip() == "running"
    assert "None" in virsh("domjobinfo", own_vm)
    assert list(small_tmpfs.iterdir()) == []
    assert list(settings.dump_dir.iterdir()) == []

    # The same VM with room enough is staged there (and removed).
    roomy = tmp_path / "stage"
    roomy.mkdir(mode=0o700)
    hv = settings.inventory[0].model_copy(update={"staging_dir": str(roomy)})
    drv = open_driver(hv, settings.ssh)
    try:
        src = _staged(drv, drv.resolve(own_vm), settings)
        seen: list[list[str]] = []
        result = write_dump(
            src,
            settings.dump_dir,
            "y.mem.gz",
            progress=lambda *_: seen.append([p.name for p in roomy.glob("memdump.*/mem")]),
        )
    finally:
        drv.close()
    assert seen[0] == ["mem"] and list(roomy.iterdir()) == []
    assert result.raw_bytes > OWN_MIB * MiB


def test_abort_while_qemu_writes_the_file_resumes_the_guest(
    settings: Settings, own_vm: str, tmp_path: Path
) -> None:
    # Over SSH the script learns nothing of the abort while QEMU writes the file, and
    # libvirt refuses domjobabort for a memory-only dump: the abort must still end the
    # dump there and then, not after the whole file is written.
    drv = open_driver(settings.inventory[0], settings.ssh)
    events = _QemuEvents(own_vm, tmp_path / "events.txt")
    try:
        src = _staged(drv, drv.resolve(own_vm), settings)
        assert [n for n, _ in events.wait_for("STOP")] == ["STOP"]
        t0 = time.monotonic()
        src.abort()
        aborted_in = time.monotonic() - t0
        ev = events.wait_for("RESUME")
    finally:
        events.stop()
        drv.close()
    assert [n for n, _ in ev] == ["STOP", "DUMP_COMPLETED", "RESUME"], ev
    done = ev[1][1]
    assert '"status":"failed"' in done, done  # cut short, not completed
    assert aborted_in < 15
    assert_hypervisor_clean(own_vm)
    assert "None" in virsh("domjobinfo", own_vm)
    assert _staged_files() == []


# -- failures and aborts -------------------------------------------------------------------


def test_unknown_vm_fails_fast_and_cleanly(driver: Driver, settings: Settings) -> None:
    t0 = time.monotonic()
    with pytest.raises(DumpFailedError) as ei:
        write_dump(
            _staged(driver, VMRef("lab", "vm-gone-01", "vm-gone-01"), settings),
            settings.dump_dir,
            "x.mem.gz",
        )
    assert time.monotonic() - t0 < 30
    assert "vm-gone-01" in ei.value.fields["stderr"]
    assert list(settings.dump_dir.iterdir()) == []
    assert remote_temp_dirs() == []


@pytest.mark.parametrize("after", [0.0, 0.15, 0.3])
def test_deadline_while_staging_stops_everything(
    driver: Driver, settings: Settings, after: float
) -> None:
    # Wherever the deadline lands (space check, the dump to the file, its streaming), the
    # capture stops, leaves nothing, and the guest runs with no job left.
    src = _staged(driver, driver.resolve(VM), settings)
    t0 = time.monotonic()
    with pytest.raises(CaptureTimeoutError):
        write_dump(src, settings.dump_dir, "x.mem.gz", deadline=time.monotonic() + after)
    assert time.monotonic() - t0 < 30
    assert list(settings.dump_dir.iterdir()) == []
    assert_hypervisor_clean(VM)
    assert "None" in virsh("domjobinfo", VM)


def test_abort_while_streaming_the_staged_file(driver: Driver, settings: Settings) -> None:
    src = _staged(driver, driver.resolve(VM), settings)
    buf = memoryview(bytearray(MiB))
    assert src.readinto(buf) > 0  # the dump is written: the file is streaming
    src.abort()
    assert_hypervisor_clean(VM)
    assert _staged_files() == []
