"""The lab's counter guest (lab/counter.py, `lab/up --qemu NAME:MIB:counter` / `--counter`):
reading its counter pages from a running guest (HMP ``xp``) or from an ELF core, and the
point-in-time check an image of it must pass.

The guest loops for ever: c += 1, then c is stored into each of its pages in page order.
At any instant pages 0..k-1 hold c and pages k..N-1 hold c-1. So an image taken at one
instant has, in page order, non-increasing counters that span at most one step; an image
whose pages were read at different times (smeared) does not, as soon as the guest got
through a pass between two of the reads."""

from __future__ import annotations

import gzip
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memdump.elfcore import parse_core
from tests.helpers.qmp_lab import Qmp

# Reads guest-physical memory: (address, size) -> bytes.
PhysReader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class CounterLayout:
    """The "counter" entry of a counter VM's layout.json."""

    addr: int
    pages: int
    page_size: int
    magic: bytes
    off_magic: int
    off_counter: int
    off_index: int

    @classmethod
    def of_vm(cls, lab_dir: Path, vm: str) -> CounterLayout:
        doc = json.loads((lab_dir / "vms" / vm / "layout.json").read_text())
        c = doc.get("counter")
        if c is None:
            raise AssertionError(f"{vm} is not a counter VM (no 'counter' in its layout.json)")
        return cls(
            addr=c["addr"],
            pages=c["pages"],
            page_size=c["page_size"],
            magic=c["magic"].encode(),
            off_magic=c["offsets"]["magic"],
            off_counter=c["offsets"]["counter"],
            off_index=c["offsets"]["index"],
        )

    def page_addr(self, i: int) -> int:
        return self.addr + i * self.page_size

    def counter_addr(self, i: int) -> int:
        return self.page_addr(i) + self.off_counter

    @property
    def span(self) -> int:
        """Bytes from the first page's start to the end of the last page's fields."""
        return (self.pages - 1) * self.page_size + self.off_index + 4


@dataclass(frozen=True)
class CounterPage:
    index: int  # which page (0 = the first the guest writes in a pass)
    magic: bytes
    counter: int
    stored_index: int  # the index the guest's init pass wrote into the page


@dataclass(frozen=True)
class Consistency:
    """What a consistent image says: the counter at its instant (page 0's, the highest)
    and how far the guest's pass had got (pages 0..step-1 hold ``counter``, the others
    ``counter - 1``; ``step == pages``: all equal)."""

    counter: int
    step: int
    pages: int


class SmearedImage(AssertionError):
    """The counter pages were not all taken at one instant."""


def pages_from_bytes(data: bytes, lay: CounterLayout) -> list[CounterPage]:
    """``data`` holds guest memory from ``lay.addr`` on (at least ``lay.span`` bytes)."""
    out = []
    for i in range(lay.pages):
        o = i * lay.page_size
        magic = bytes(data[o + lay.off_magic : o + lay.off_magic + len(lay.magic)])
        (counter,) = struct.unpack_from("<Q", data, o + lay.off_counter)
        (idx,) = struct.unpack_from("<I", data, o + lay.off_index)
        out.append(CounterPage(i, magic, counter, idx))
    return out


def pages_from_core(core: bytes, lay: CounterLayout) -> list[CounterPage]:
    """The counter pages of a whole ELF core (as dump-guest-memory / memdump write it)."""
    cl = parse_core(core)
    if cl is None or cl.file_size != len(core):
        raise AssertionError("not a whole ELF core")
    start = cl.offset_of(lay.addr)
    end = cl.offset_of(lay.addr + lay.span - 1)
    # One PT_LOAD holds the whole low RAM, so the range is contiguous in the file.
    if start is None or end is None or end - start != lay.span - 1:
        raise AssertionError(f"the counter pages at {lay.addr:#x} are not in one PT_LOAD")
    return pages_from_bytes(core[start : start + lay.span], lay)


def read_core_gz(path: Path) -> bytes:
    """The ELF core inside a .mem.gz (small lab guests: kept in memory)."""
    with gzip.open(path, "rb") as f:
        return f.read()


def check_consistent(pages: Sequence[CounterPage], lay: CounterLayout) -> Consistency:
    """Raise SmearedImage unless the pages are one instant of the counter loop."""
    if len(pages) != lay.pages:
        raise SmearedImage(f"{len(pages)} counter pages, expected {lay.pages}")
    for p in pages:
        if p.magic != lay.magic or p.stored_index != p.index:
            raise SmearedImage(
                f"page {p.index} at {lay.page_addr(p.index):#x} is not a counter page "
                f"(magic {p.magic!r}, index {p.stored_index})"
            )
    values = [p.counter for p in pages]
    top, bottom = values[0], values[-1]
    for i in range(1, len(values)):
        if values[i] > values[i - 1]:
            raise SmearedImage(
                f"page {i} holds {values[i]}, more than page {i - 1}'s {values[i - 1]}: "
                "pages read at different times"
            )
    if top - bottom > 1:
        raise SmearedImage(
            f"counters span {bottom}..{top} ({top - bottom} steps, at most 1 at one instant)"
        )
    step = sum(1 for v in values if v == top)
    return Consistency(counter=top, step=step, pages=len(values))


# -- reading a running guest through the monitor ----------------------------------------
#
# With QMP ``pmemsave`` (QEMU writes the bytes into a file), not HMP ``xp``: ``xp`` first
# synchronises the vCPU's registers (mon_get_cpu -> run_on_cpu), and during a background
# snapshot the vCPU may sit in a userfaultfd write fault that only the migration thread
# resolves, which waits for the reader of the stream: a test probing with ``xp`` while it
# is not reading the stream deadlocks QEMU (seen on the lab: main loop stuck, vCPU spinning
# in the fault; it stays so when the reader then goes away).


def pmemsave_reader(execute: Callable[[str, dict[str, Any]], Any], directory: Path) -> PhysReader:
    """A PhysReader over QMP ``pmemsave`` (``execute(command, arguments)``) into a file in
    ``directory``, which QEMU's user must be able to write."""
    path = directory / "pmemsave.bin"

    def read(addr: int, size: int) -> bytes:
        execute("pmemsave", {"val": addr, "size": size, "filename": str(path)})
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        if len(data) != size:
            raise AssertionError(f"pmemsave gave {len(data)} bytes, expected {size}")
        return data

    return read


def read_counter(read: PhysReader, lay: CounterLayout, page: int = 0) -> int:
    """The guest's counter now: page 0's (the first page each pass writes)."""
    (value,) = struct.unpack("<Q", read(lay.counter_addr(page), 8))
    return int(value)


def read_pages_one_by_one(read: PhysReader, lay: CounterLayout) -> list[CounterPage]:
    """Each page with its own monitor command while the guest runs: a smeared image, as a
    tool that copies a running guest's memory page by page would get."""
    size = lay.off_index + 4
    out = []
    for i in range(lay.pages):
        data = read(lay.page_addr(i), size)
        magic = data[lay.off_magic : lay.off_magic + len(lay.magic)]
        (counter,) = struct.unpack_from("<Q", data, lay.off_counter)
        (idx,) = struct.unpack_from("<I", data, lay.off_index)
        out.append(CounterPage(i, magic, counter, idx))
    return out


# -- a small QMP client that can pass descriptors ----------------------------------------


class FileSource:
    """A memdump.pipeline.DumpSource over a file (a migration stream saved by a test)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.closed = self.aborted = False

    def readinto(self, view: memoryview) -> int:
        return os.readv(self.fd, [view])

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def close_ok(self) -> None:
        self._close()

    def abort(self) -> None:
        self.aborted = True
        self._close()


# -- capturing ---------------------------------------------------------------------------


@dataclass
class Probe:
    """The guest seen from outside during a capture: its counter (page 0), its run state
    and the migration's status, at one moment: ``at`` bytes of the stream read (direct
    captures) or the probe's number (Prober)."""

    at: int
    counter: int
    run_state: str
    migration: str


@dataclass
class DirectSnapshot:
    stream: Path
    before: int
    after: int
    probes: list[Probe]
    final: dict[str, Any]  # the last query-migrate
    events: list[str]  # QMP event names seen on the connection (STOP, RESUME)


def background_snapshot(
    qmp: Qmp, read: PhysReader, lay: CounterLayout, stream: Path, *, probe_every: int = 2 << 20
) -> DirectSnapshot:
    """QEMU's background-snapshot migration of a running counter guest, straight over QMP
    (no memdump driver): the write end of a pipe goes to QEMU with ``getfd``, the test
    reads the other end into ``stream`` and, every ``probe_every`` bytes, reads the
    guest's counter (``read``: pmemsave, see above). The pipe holds 64 KiB, so QEMU cannot finish
    before the test has read everything: every probe is taken while the capture runs.
    The capability is turned off and a migration still running is cancelled on every
    exit path."""
    before = read_counter(read, lay)
    r, w = os.pipe()
    try:
        qmp.execute("getfd", {"fdname": "memdump-test"}, fds=[w])
    finally:
        os.close(w)
    probes: list[Probe] = []
    final: dict[str, Any] = {}
    try:
        qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": True}]},
        )
        # Without the capability, migrate is an ordinary one that leaves the guest paused.
        if not qmp.capability():
            raise AssertionError("background-snapshot did not turn on")
        qmp.execute("migrate", {"uri": "fd:memdump-test"})
        n, due = 0, probe_every
        with open(stream, "wb") as out:
            while chunk := os.read(r, 1 << 20):
                out.write(chunk)
                n += len(chunk)
                if n >= due:
                    due = n + probe_every
                    probes.append(
                        Probe(
                            n,
                            read_counter(read, lay),
                            qmp.status(),
                            str(qmp.migration().get("status", "none")),
                        )
                    )
        for _ in range(600):
            final = qmp.migration()
            if final.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        after = read_counter(read, lay)
    finally:
        os.close(r)
        if qmp.migration().get("status") in ("setup", "active", "device"):
            qmp.execute("migrate_cancel")
        qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": False}]},
        )
        if qmp.status() == "paused":
            qmp.execute("cont")
    return DirectSnapshot(stream, before, after, probes, final, [e["event"] for e in qmp.events])


def paused_dump(qmp: Qmp, read: PhysReader, lay: CounterLayout) -> tuple[int, bytes]:
    """``stop``, the counter, QMP ``dump-guest-memory`` (paging off) into a pipe, ``cont``:
    a paused capture of the guest, as memdump's paused mode takes it."""
    qmp.execute("stop")
    try:
        counter = read_counter(read, lay)
        r, w = os.pipe()
        try:
            qmp.execute("getfd", {"fdname": "memdump-test-dump"}, fds=[w])
        finally:
            os.close(w)
        buf = bytearray()

        def drain() -> None:
            try:
                while chunk := os.read(r, 1 << 20):
                    buf.extend(chunk)
            finally:
                os.close(r)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        # Synchronous: returns once QEMU has written (and closed) the whole core.
        qmp.execute("dump-guest-memory", {"paging": False, "protocol": "fd:memdump-test-dump"})
        reader.join(120)
        assert not reader.is_alive()
        return counter, bytes(buf)
    finally:
        qmp.execute("cont")


class Prober(threading.Thread):
    """Probes the guest (counter, run state, migration status) over and over from its own
    thread while a driver's capture runs, whatever the driver and converter buffer."""

    def __init__(
        self, counter: Callable[[], int], run_state: Callable[[], str], migration: Callable[[], str]
    ) -> None:
        super().__init__(name="counter-prober", daemon=True)
        self.counter, self.run_state, self.migration = counter, run_state, migration
        self.probes: list[Probe] = []
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        try:
            while not self._done.is_set():
                self.probes.append(
                    Probe(len(self.probes), self.counter(), self.run_state(), self.migration())
                )
                # Others (the driver's script) need their turn at QEMU's one QMP client slot.
                self._done.wait(0.02)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> list[Probe]:
        self._done.set()
        self.join(120)
        if self.error is not None:
            raise AssertionError(f"probing the guest failed: {self.error!r}") from self.error
        return self.probes


# -- judging a live capture ---------------------------------------------------------------


def assert_live_point_in_time(
    cons: Consistency, before: int, after: int, probes: list[Probe], what: str, min_during: int = 2
) -> None:
    """The image holds one instant of a guest that kept running while it was taken.

    QEMU sets a background snapshot's status to ``active`` and *then* stops the vCPUs for
    its set-up (milliseconds), so the probes that first see the migration active may see
    the guest ``paused``: that set-up stop is the live capture's whole pause. Only a
    leading run of such probes is allowed; after the first ``running`` one every probe
    must be ``running`` (a guest stopped later, or left stopped, fails), and at least
    ``min_during`` running probes must have seen the counter move."""
    during = [p for p in probes if p.migration == "active"]
    report = (
        f"{what}: counter before {before}, image {cons.counter} (pages 0..{cons.step - 1} "
        f"hold it, {cons.step}..{cons.pages - 1} one less), after {after}; "
        f"{len(probes) - len(during)} probes outside the migration, during it: "
        + ", ".join(f"{p.counter}@{p.at}/{p.run_state}" for p in during)
    )
    print(report)
    setup = 0
    while setup < len(during) and during[setup].run_state == "paused":
        setup += 1
    running = during[setup:]
    # The guest kept running through the capture and its counter advanced meanwhile.
    assert len(running) >= min_during, report
    assert all(p.run_state == "running" for p in running), report
    assert [p.counter for p in during] == sorted(p.counter for p in during), report
    assert running[-1].counter > running[0].counter, report
    # The image holds one instant between the reads before and after the capture...
    assert before <= cons.counter < after, report
    # ... and not a later one: values the guest wrote while the capture ran are not in it.
    assert cons.counter < running[-1].counter, report
