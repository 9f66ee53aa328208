"""Byte-exact comparison of a live core with a paused dump of the same guest (issue 12,
item 5): memdump's live core (memdump.livecore, streamed from a driver) against QEMU's
paused dump (``dump-guest-memory`` with paging off, what ``virsh dump --memory-only
--format elf`` and HMP ``dump-guest-memory`` write) in a file.

Neither core is held whole in memory (a 4 GiB guest's core as Python bytes, twice, would
be 8+ GiB of RSS) nor hashed (SHA-256 of the live core as it came added ~10 s to a 1 GiB
libvirt capture of ~14 s on the lab's 2 shared cores): the live core is read in 4 MiB
chunks and every byte of every PT_LOAD is compared with the same guest-physical bytes of
the file (``pread``, found through the file's own PT_LOAD headers), in whatever order
the live core holds its PT_LOADs (it lays segment data out in the order QEMU's migration
sweep sends RAM blocks, so its p_offsets need not grow with the addresses). A failure
names the first guest-physical address at which the two differ.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memdump.elfcore import PT_LOAD, PT_NOTE, CoreLayout, parse_core
from memdump.livecore import NT_MEMDUMP_LIVE
from memdump.pipeline import DumpSource

NT_PRSTATUS = 1
_BUF = 4 << 20
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
# Indexes into the ELF header tuple.
_E_PHOFF, _E_EHSIZE, _E_PHNUM = 5, 8, 10


@dataclass
class Core:
    """What the comparison keeps of one core."""

    ehdr: tuple[Any, ...] = ()
    # (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align), in order.
    phdrs: list[tuple[int, ...]] = field(default_factory=list)
    # (name, type, descsz) of every note of every PT_NOTE, in file order.
    notes: list[tuple[bytes, int, int]] = field(default_factory=list)
    grabbed: dict[int, bytes] = field(default_factory=dict)  # guest-physical addr -> bytes
    size: int = 0  # what the headers declare (for a stream: also what was read)

    def load_headers(self) -> list[tuple[int, ...]]:
        """The PT_LOAD program headers without p_offset, in header order."""
        return [p[:2] + p[3:] for p in self.phdrs if p[0] == PT_LOAD]

    def loads(self) -> list[tuple[int, int, int]]:
        """(p_offset, p_paddr, p_filesz) of every PT_LOAD."""
        return [(p[2], p[4], p[5]) for p in self.phdrs if p[0] == PT_LOAD]


def _notes(data: bytes) -> list[tuple[bytes, int, int]]:
    out = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        out.append((data[pos : pos + namesz].rstrip(b"\0"), ntype, descsz))
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3
    return out


def _headers(head: bytes, layout: CoreLayout) -> Core:
    ehdr = _EHDR.unpack_from(head)
    phoff, phnum = ehdr[_E_PHOFF], ehdr[_E_PHNUM]
    return Core(
        ehdr=ehdr,
        phdrs=[_PHDR.unpack_from(head, phoff + i * _PHDR.size) for i in range(phnum)],
        size=layout.file_size,
    )


def read_core_file(path: Path, grab: Mapping[int, int] = {}) -> Core:
    """The headers, notes and ``grab`` bytes (guest-physical address -> length) of a core
    file, read where they are (the file is not read through)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = b""
        layout = None
        while layout is None:
            more = os.pread(fd, max(len(head), 1 << 16), len(head))
            assert more, f"{path}: not an ELF core"
            head += more
            layout = parse_core(head)
        core = _headers(head, layout)
        assert os.fstat(fd).st_size == core.size, f"{path}: not the size its headers declare"
        for s in layout.segments:
            if s.type == PT_NOTE:
                core.notes += _notes(os.pread(fd, s.filesz, s.offset))
        for addr, length in grab.items():
            for off, paddr, size in core.loads():
                if paddr <= addr < paddr + size:
                    core.grabbed[addr] = os.pread(fd, length, off + addr - paddr)
        return core
    finally:
        os.close(fd)


def assert_same_headers(live: Core, paused: Core) -> None:
    """The same ELF header but e_ehsize (QEMU 7.2 writes 8, sizeof a pointer, fixed in
    later QEMU; the live core writes the right 64): so the same identification, type,
    machine and program/section header positions; and the same PT_LOAD headers, in the
    same order, but p_offset."""
    # (tests/helpers is not rewritten by pytest: the messages say what differs.)
    pick = [i for i in range(14) if i != _E_EHSIZE]
    a, b = [live.ehdr[i] for i in pick], [paused.ehdr[i] for i in pick]
    assert a == b, f"ELF headers differ (but e_ehsize): live {a}, paused {b}"
    assert live.ehdr[_E_EHSIZE] == 64 and paused.ehdr[_E_EHSIZE] in (8, 64)
    a, b = live.load_headers(), paused.load_headers()
    assert a == b, f"PT_LOAD headers (but p_offset) differ: live {_hex(a)}, paused {_hex(b)}"
    assert len(a) >= 2, f"{len(a)} PT_LOAD"


def _hex(rows: list[tuple[int, ...]]) -> list[str]:
    return [" ".join(f"{v:#x}" for v in row) for row in rows]


def compare_stream_with_file(
    read: Callable[[memoryview], int], reference: Path, grab: Mapping[int, int] = {}
) -> tuple[Core, Core]:
    """Stream a core from ``read`` (readinto-like: fills the view's start, 0 at the end)
    to its end and compare it with the core file ``reference``: headers as
    ``assert_same_headers`` (as soon as the stream's are in), then every byte of every
    PT_LOAD; the stream must be exactly as long as its headers declare. Returns (stream's,
    file's) headers, notes and ``grab`` bytes."""
    paused = read_core_file(reference, grab)
    live = Core()
    fd = os.open(reference, os.O_RDONLY)
    try:
        view = memoryview(bytearray(_BUF))
        head = bytearray()
        # (live offset, size, paddr, file offset in reference) of each PT_LOAD.
        segs: list[tuple[int, int, int, int]] = []
        notes: list[tuple[int, int, bytearray]] = []
        compared = 0
        parsed = False
        pos = 0

        def feed(chunk: memoryview, at: int) -> None:
            nonlocal compared
            end = at + len(chunk)
            for off, size, paddr, ref_off in segs:
                lo, hi = max(off, at), min(off + size, end)
                if lo >= hi:
                    continue
                # bytes, not the memoryview: memoryview == bytes compares item by item.
                mine = bytes(chunk[lo - at : hi - at])
                theirs = os.pread(fd, hi - lo, ref_off + lo - off)
                if mine != theirs:
                    first = next(i for i in range(hi - lo) if mine[i] != theirs[i])
                    raise AssertionError(
                        f"PT_LOAD at {paddr:#x}: the live core differs from {reference.name}"
                        f" first at guest-physical {paddr + lo - off + first:#x}"
                    )
                compared += hi - lo
                for addr, length in grab.items():
                    a_lo = off + addr - paddr
                    g_lo, g_hi = max(a_lo, lo), min(a_lo + length, hi)
                    if paddr <= addr < paddr + size and g_lo < g_hi:
                        live.grabbed[addr] = live.grabbed.get(addr, b"") + bytes(
                            chunk[g_lo - at : g_hi - at]
                        )
            for off, size, buf in notes:
                lo, hi = max(off, at), min(off + size, end)
                if lo < hi:
                    buf += chunk[lo - at : hi - at]

        while True:
            n = read(view)
            if not n:
                break
            chunk = view[:n]
            if parsed:
                feed(chunk, pos)
            else:
                head += chunk
                layout = parse_core(bytes(head))
                if layout is not None:
                    parsed = True
                    live = _headers(bytes(head), layout)
                    assert_same_headers(live, paused)
                    ref_off = {paddr: off for off, paddr, _ in paused.loads()}
                    segs = [(off, size, paddr, ref_off[paddr]) for off, paddr, size in live.loads()]
                    notes = [
                        (s.offset, s.filesz, bytearray())
                        for s in layout.segments
                        if s.type == PT_NOTE
                    ]
                    feed(memoryview(head), 0)  # everything read so far
                    head = bytearray()
            pos += n
    finally:
        os.close(fd)
    assert parsed, f"the stream is no ELF core: {pos} bytes"
    assert pos == live.size, f"{pos} bytes, the headers declare {live.size}"
    total = sum(size for _, _, size in paused.loads())
    assert compared == total, f"{compared} bytes of PT_LOAD compared, not {total}"
    for _, _, buf in notes:
        live.notes += _notes(bytes(buf))
    return live, paused


def compare_source_with_file(
    src: DumpSource, reference: Path, grab: Mapping[int, int] = {}
) -> tuple[Core, Core]:
    """``compare_stream_with_file`` on a driver's DumpSource, read as memdump's pipeline
    reads one: to its end, then ``close_ok`` (which raises if the hypervisor side
    failed); ``abort`` on any error, a difference included."""
    try:
        out = compare_stream_with_file(src.readinto, reference, grab)
        src.close_ok()
    except BaseException:
        src.abort()
        raise
    return out


def save_source(src: DumpSource, path: Path) -> None:
    """A driver's DumpSource into a new file, as it comes (then ``close_ok``)."""
    view = memoryview(bytearray(_BUF))
    try:
        with open(path, "xb") as f:
            while n := src.readinto(view):
                f.write(view[:n])
        src.close_ok()
    except BaseException:
        src.abort()
        raise


def lab_markers(layout: Mapping[str, Any]) -> dict[int, bytes]:
    """The seeded markers of a lab guest (its layout.json, lab/image.py): guest-physical
    address -> bytes."""
    return {m["addr"]: bytes.fromhex(m["hex"]) for m in layout["markers"]}


def assert_lab_image(core: Core, layout: Mapping[str, Any]) -> None:
    """``core`` (read with ``grab`` from ``lab_markers``) holds the lab guest's markers at
    their guest-physical addresses, and its PT_LOADs cover every RAM region the lab
    seeded (for a 4 GiB guest, the GiB above 4 GiB too): the comparison is not between
    two cores that miss the same memory."""
    assert core.grabbed == lab_markers(layout)
    loads = [(paddr, size) for _, paddr, size in core.loads()]
    for region in layout["ram_regions"]:
        lo, hi = region["addr"], region["addr"] + region["size"]
        assert any(a <= lo and hi <= a + n for a, n in loads), f"RAM [{lo:#x}, {hi:#x})"


def assert_notes_as_documented(live: Core, paused: Core) -> None:
    """The notes differ: QEMU's paused dump has each vCPU's registers (NT_PRSTATUS "CORE"
    and a "QEMU" CPU-state note), read while the guest is stopped; the live core cannot
    have them (the guest runs on through the snapshot instant) and has one note of its
    own instead ("MEMDUMP", NT_MEMDUMP_LIVE, a text saying so)."""
    kinds = [(name, ntype) for name, ntype, _ in paused.notes]
    assert (b"CORE", NT_PRSTATUS) in kinds
    assert [(name, ntype) for name, ntype, _ in live.notes] == [(b"MEMDUMP", NT_MEMDUMP_LIVE)]


def assert_same_lab_guest(live: Core, paused: Core, layout: Mapping[str, Any]) -> None:
    """After compare_source_with_file: both cores are the lab guest's whole image (markers,
    every seeded RAM region, the GiB above the PCI hole of a guest that has one), and the
    notes differ as documented."""
    assert_lab_image(live, layout)
    assert_lab_image(paused, layout)
    assert_notes_as_documented(live, paused)
    if layout["memory_bytes"] > 3 << 30:  # RAM above the PCI hole is in the comparison
        assert (1 << 32, 1 << 30) in [(paddr, size) for _, paddr, size in live.loads()]
