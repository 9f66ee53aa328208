"""What changed between two captures, from their chunk indexes alone (issue 14, item 5).

A chunked .mem.gz (memdump.chunkedgz) carries the SHA-256 of every fixed-size chunk of
the raw image in its index. Two captures with the same chunk size and the same raw size
(the same VM, its memory unchanged in size) differ exactly in the chunks whose digests
differ, so the comparison reads two indexes (the trailer and index members at the end of
each file: a few KiB per GiB, by ranged GETs on S3) and inflates nothing. Mapping changed
chunks to guest-physical addresses needs the ELF's program headers, which are in the
first chunk: :func:`diff` inflates that one chunk per dump (checked against its index),
never the memory.

Two entry points: :func:`diff` (``memdump diff A B``: the changed guest-physical ranges,
chunk granularity, merged into runs) and :func:`since_previous` (the capture chain: how
many chunks differ from the previous capture of the same VM, recorded in the manifest and
the record). Whatever cannot be compared (no previous capture, an older single-stream
dump, another chunk size or raw size, a copy that cannot be read) is said as such, with
the reason: a count is never guessed.

The second index of a comparison is read ``like`` the first (memdump.chunkedgz.read_index):
its Merkle root is checked re-hashing only the runs of chunks that differ. ``memdump diff``
of two local files imports nothing of the settings, record stores or S3: they are imported
in the functions that need them (benchmarks/diff.py times it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from memdump.chunkedgz import SUBTREE, ChunkReader, Index, read_index
from memdump.elfcore import PT_LOAD, CoreLayout, parse_core
from memdump.errors import InvalidDumpError, MemdumpError

if TYPE_CHECKING:
    from memdump.records.base import RecordReader
    from memdump.settings import Settings
    from memdump.stored import StoredDump

log = logging.getLogger("memdump.changes")

PAGE = 100  # records per store query while looking for the previous capture
MAX_PAGES = 20  # a VM's previous capture is among its newest 2,000 records, or not looked for


@dataclass(frozen=True)
class Changes:
    """This capture compared with the previous capture of the same VM.
    ``chunks_changed`` is None whenever no count can be given; ``reason`` says why."""

    chunks_changed: int | None
    chunk_count: int | None  # this capture's (None: not a chunked dump)
    compared_with: str = ""  # the previous capture's dump_path as recorded
    compared_with_timestamp: str = ""  # and its record timestamp
    reason: str = ""  # "" when counted

    def manifest_section(self) -> dict[str, Any]:
        """The manifest's ``changes`` section."""
        previous = None
        if self.compared_with:
            previous = {"dump_path": self.compared_with, "timestamp": self.compared_with_timestamp}
        return {
            "chunks_changed": self.chunks_changed,
            "chunk_count": self.chunk_count,
            "previous": previous,
            "reason": self.reason or None,
        }


@dataclass(frozen=True)
class Diff:
    """Dump B compared with dump A: the chunks whose digests differ and the guest-physical
    ranges they hold (``ranges``, [start, end), merged runs). ``outside`` lists changed raw
    ranges that hold no guest memory (ELF headers and notes: the CPU state)."""

    a: Index
    b: Index
    changed: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...] = ()
    outside: tuple[tuple[int, int], ...] = ()
    layout: CoreLayout | None = field(default=None, repr=False)

    @property
    def changed_bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunk_size": self.a.chunk_size,
            "chunk_count": len(self.a.chunks),
            "chunks_changed": len(self.changed),
            "changed_guest_bytes": self.changed_bytes,
            "ranges": [{"start": hex(s), "end": hex(e), "bytes": e - s} for s, e in self.ranges],
            "outside_guest_memory": [
                {"raw_start": hex(s), "raw_end": hex(e)} for s, e in self.outside
            ],
        }


# -- indexes and layouts ---------------------------------------------------------------------


def load_index(stored: StoredDump, *, like: Index | None = None) -> Index | None:
    """The checked index of a stored dump (None: an older single-stream .mem.gz). Local:
    two reads at the end of the file; S3: a HEAD and two ranged GETs. ``like``: an index
    of the same VM read before (its unchanged runs of chunks are not hashed again)."""
    with stored.open() as f:
        return read_index(f, like=like)


def read_layout(f: BinaryIO, index: Index) -> CoreLayout:
    """The ELF layout of a chunked dump: only the chunk(s) holding the headers are inflated
    (checked against their SHA-256 in the index: CorruptChunkError otherwise)."""
    reader = ChunkReader(f, index, cache_chunks=4, check=True)
    want = min(index.chunk_size, index.raw_size)
    while True:
        layout = parse_core(reader.read(0, want))
        if layout is not None:
            return layout
        if want >= index.raw_size:
            raise InvalidDumpError("the dump ends inside its ELF headers", raw_size=index.raw_size)
        want = min(want * 2, index.raw_size)


def guest_ranges(layout: CoreLayout, start: int, end: int) -> list[tuple[int, int]]:
    """The guest-physical ranges [start, end) the raw bytes [start, end) of the image hold
    (through its PT_LOADs), in address order; empty for headers and notes."""
    return _through_loads(layout, start, end, to_guest=True)


def raw_ranges(layout: CoreLayout, start: int, end: int) -> list[tuple[int, int]]:
    """The inverse: the raw image ranges holding guest-physical [start, end), in file
    order; parts of the range in no PT_LOAD are not in the dump and are left out."""
    return _through_loads(layout, start, end, to_guest=False)


def _through_loads(
    layout: CoreLayout, start: int, end: int, *, to_guest: bool
) -> list[tuple[int, int]]:
    out = []
    for s in layout.segments:
        if s.type != PT_LOAD or not s.filesz:
            continue
        src, dst = (s.offset, s.paddr) if to_guest else (s.paddr, s.offset)
        lo, hi = max(start, src), min(end, src + s.filesz)
        if lo < hi:
            out.append((dst + lo - src, dst + hi - src))
    return sorted(out)


def merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent or overlapping [start, end) ranges merged into runs."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def incomparable(a: Index, b: Index) -> str:
    """Why two indexes cannot be compared chunk by chunk ("" if they can)."""
    if a.chunk_size != b.chunk_size:
        return f"chunk sizes differ ({a.chunk_size} and {b.chunk_size} bytes)"
    if a.raw_size != b.raw_size:
        return f"raw image sizes differ ({a.raw_size} and {b.raw_size} bytes)"
    return ""


def changed_chunks(a: Index, b: Index) -> list[int]:
    """Numbers of the chunks whose SHA-256 differs (indexes already found comparable),
    compared a run of SUBTREE digests at a time: an unchanged run is one compare."""
    out: list[int] = []
    runs = zip(a.chunks.digest_runs(), b.chunks.digest_runs(), strict=True)
    for at, (x, y) in enumerate(runs):
        if x != y:
            out.extend(
                at * SUBTREE + n for n, (dx, dy) in enumerate(zip(x, y, strict=True)) if dx != dy
            )
    return out


# -- memdump diff ----------------------------------------------------------------------------


def diff(a: StoredDump, b: StoredDump) -> Diff:
    """What differs in ``b`` from ``a``. InvalidDumpError if either is not a chunked dump,
    their chunk layouts or ELF memory layouts differ, or an index is damaged."""
    indexes: list[Index] = []
    for which, stored in (("A", a), ("B", b)):
        index = load_index(stored, like=indexes[0] if indexes else None)
        if index is None:
            raise InvalidDumpError(
                f"dump {which} ({stored.location.where}) is a single-stream .mem.gz without a"
                " chunk index: diff needs two chunked dumps",
                location=stored.location.where[:300],
            )
        indexes.append(index)
    ia, ib = indexes
    if why := incomparable(ia, ib):
        raise InvalidDumpError(f"the dumps cannot be compared chunk by chunk: {why}")
    changed = changed_chunks(ia, ib)
    with a.open() as f:
        layout = read_layout(f, ia)
    if ia.chunks and ib.chunks and ia.chunks[0].sha256 != ib.chunks[0].sha256:
        with b.open() as f:
            other = read_layout(f, ib)
        loads = [s for s in layout.segments if s.type == PT_LOAD]
        if loads != [s for s in other.segments if s.type == PT_LOAD]:
            raise InvalidDumpError(
                "the dumps cannot be compared: their ELF memory layouts (PT_LOADs) differ"
            )
    raw_runs = merge(
        (ia.chunks[n].raw_offset, ia.chunks[n].raw_offset + ia.chunks[n].raw_size) for n in changed
    )
    guest: list[tuple[int, int]] = []
    outside: list[tuple[int, int]] = []
    for start, end in raw_runs:
        mapped = guest_ranges(layout, start, end)
        guest.extend(mapped)
        # What of the run is in no PT_LOAD (headers, notes, the section table).
        covered = merge(r for lo, hi in mapped for r in raw_ranges(layout, lo, hi))
        at = start
        for lo, hi in covered:
            if lo > at:
                outside.append((at, lo))
            at = max(at, hi)
        if at < end:
            outside.append((at, end))
    return Diff(ia, ib, tuple(changed), tuple(merge(guest)), tuple(merge(outside)), layout)


# -- the capture chain: since the previous capture -------------------------------------------


def previous_record(store: RecordReader, hypervisor: str, vmid: str) -> dict[str, Any] | None:
    """The newest record of VM ``vmid`` on ``hypervisor`` (the same vmid on another
    hypervisor is another VM)."""
    from memdump.records.base import RecordQuery

    query = RecordQuery(vmid=vmid)
    for page in range(MAX_PAGES):
        rows = store.list(PAGE, page * PAGE, query)
        for row in rows:
            if row.get("hypervisor") == hypervisor:
                return row
        if len(rows) < PAGE:
            break
    return None


def _previous_index(
    row: Mapping[str, Any], settings: Settings, like: Index | None = None
) -> tuple[Index | None, str]:
    """The index of a readable copy of a recorded dump: (index, "") or (None, why not).
    Every location is confined first (memdump.stored): a record is data. ``like`` as for
    load_index."""
    from memdump.locations import record_locations
    from memdump.stored import open_stored

    if row.get("deleted_at"):
        return None, f"the previous capture's dump was deleted by retention ({row['deleted_at']})"
    problems = []
    for loc in record_locations(row):
        if loc.deleted_at:
            continue
        if loc.kind == "local" and loc.collector and loc.collector != settings.collector_id:
            problems.append(f"its local copy is on collector {loc.collector}")
            continue
        try:
            stored = open_stored(loc, settings)
            if not stored.exists():
                problems.append(f"{loc.where} is gone")
                continue
            index = load_index(stored, like=like)
        except MemdumpError as exc:
            problems.append(f"{loc.where}: {exc}")
            continue
        if index is None:
            return None, "the previous capture is a single-stream .mem.gz (older format, no index)"
        return index, ""
    return None, "no readable copy of the previous capture: " + ("; ".join(problems) or "none")


def compare_with(new: Index | None, row: Mapping[str, Any] | None, settings: Settings) -> Changes:
    """``new`` (this capture's index; None: not chunked) against the previous capture's
    record ``row`` (None: there is none)."""
    count = len(new.chunks) if new is not None else None
    if new is None:
        return Changes(None, None, reason="this capture is not a chunked .mem.gz")
    if row is None:
        return Changes(None, count, reason="no previous capture of this VM in the record store")
    where, ts = str(row.get("dump_path") or ""), str(row.get("timestamp") or "")
    old, why = _previous_index(row, settings, like=new)
    if old is None:
        return Changes(None, count, where, ts, why)
    if why := incomparable(old, new):
        return Changes(None, count, where, ts, f"not comparable with the previous capture: {why}")
    return Changes(len(changed_chunks(old, new)), count, where, ts)


def since_previous(settings: Settings, hypervisor: str, vmid: str, dump: Path) -> Changes:
    """How many chunks of the new dump ``dump`` differ from the previous capture of the
    same VM (same hypervisor and vmid) found through the record store. Never raises for
    what it cannot know (store down, previous copy unreadable): the reason is returned."""
    try:
        with open(dump, "rb") as f:
            new = read_index(f)
    except (OSError, MemdumpError) as exc:
        return Changes(None, None, reason=f"this capture's index cannot be read: {exc}")
    from memdump.records import open_reader

    try:
        store = open_reader(settings)  # it only reads
        try:
            row = previous_record(store, hypervisor, vmid)
        finally:
            store.close()
    except Exception as exc:  # any store failure: the capture goes on, the reason is kept
        log.warning("previous capture of %s:%s not looked up: %s", hypervisor, vmid, exc)
        return Changes(
            None,
            len(new.chunks) if new else None,
            reason=f"the record store could not be read: {exc}",
        )
    try:
        return compare_with(new, row, settings)
    except Exception as exc:  # e.g. S3 unreachable mid-read: said, never fatal to a capture
        log.warning("previous capture of %s:%s not compared: %s", hypervisor, vmid, exc)
        where = str((row or {}).get("dump_path") or "")
        return Changes(
            None, len(new.chunks) if new else None, where, reason=f"comparison failed: {exc}"
        )


def stored_for(where: str, settings: Settings) -> StoredDump:
    """``where`` (a dump_path: local path in the dump directory or s3:// URI), confined."""
    from memdump.locations import Location
    from memdump.stored import open_stored

    return open_stored(Location.of(where), settings)
