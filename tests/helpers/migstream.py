"""Synthetic QEMU migration streams (the background-snapshot form) for memdump.livecore's
tests: the records QEMU 7.2 writes (migration/savevm.c, migration/ram.c), built by hand
so that each test states exactly which bytes the converter sees."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

PAGE = 4096
MAGIC = b"QEVM\x00\x00\x00\x03"
EOF = 0x00
START, PART, END, FULL, SUBSECTION, VMDESC, CONFIGURATION, FOOTER = (
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x07,
    0x7E,
)
ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONTINUE, XBZRLE, HOOK, COMPRESS = (
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
    0x40,
    0x80,
    0x100,
)
RAM_ID = 2


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def string(s: str) -> bytes:
    raw = s.encode()
    return bytes([len(raw)]) + raw


def subsection(name: str, body: bytes, version: int = 1) -> bytes:
    return bytes([SUBSECTION]) + string(name) + be32(version) + body


def header(machine: str | None = "pc-i440fx-7.2", subsections: bytes = b"") -> bytes:
    """Magic, version and (unless ``machine`` is None) the configuration section."""
    out = MAGIC
    if machine is not None:
        out += bytes([CONFIGURATION]) + be32(len(machine)) + machine.encode() + subsections
    return out


def section_header(
    kind: int, name: str, section_id: int, instance: int = 0, version: int = 4
) -> bytes:
    return bytes([kind]) + be32(section_id) + string(name) + be32(instance) + be32(version)


def footer(section_id: int = RAM_ID) -> bytes:
    return bytes([FOOTER]) + be32(section_id)


def ram_setup(blocks: Iterable[tuple[str, int]], section_id: int = RAM_ID) -> bytes:
    """SECTION_START "ram": total size | MEM_SIZE, each block's idstr and length, EOS."""
    blocks = list(blocks)
    out = section_header(START, "ram", section_id)
    out += be64(sum(n for _, n in blocks) | MEM_SIZE)
    for name, n in blocks:
        out += string(name) + be64(n)
    return out + be64(EOS) + footer(section_id)


def part(section_id: int = RAM_ID) -> bytes:
    return bytes([PART]) + be32(section_id)


def page(offset: int, data: bytes, block: str | None = None) -> bytes:
    """A PAGE record; ``block`` None: CONTINUE (same block as the previous record)."""
    assert len(data) == PAGE
    if block is None:
        return be64(offset | PAGE_FLAG | CONTINUE) + data
    return be64(offset | PAGE_FLAG) + string(block) + data


def zero(offset: int, block: str | None = None, fill: int = 0) -> bytes:
    if block is None:
        return be64(offset | ZERO | CONTINUE) + bytes([fill])
    return be64(offset | ZERO) + string(block) + bytes([fill])


def eos(section_id: int = RAM_ID, with_footer: bool = True) -> bytes:
    return be64(EOS) + (footer(section_id) if with_footer else b"")


def device_tail() -> bytes:
    """What a background snapshot appends after RAM: device sections (opaque), EOF, the
    JSON vmdescription."""
    dev = section_header(FULL, "timer", 0, version=2) + bytes(range(40)) + footer(0)
    dev += section_header(FULL, "cpu", 5, version=12) + b"\x7e\x05" * 50 + footer(5)
    desc = json.dumps({"page_size": PAGE, "devices": [{"name": "timer"}]}).encode()
    return dev + bytes([EOF]) + bytes([VMDESC]) + be32(len(desc)) + desc


def pattern(block: str, offset: int) -> bytes:
    """Recognisable content for a page: its block and offset, repeated."""
    tag = f"<{block}@{offset:#x}>".encode()
    return (tag * (PAGE // len(tag) + 1))[:PAGE]


def sweep(
    blocks: Iterable[tuple[str, int]],
    *,
    zero_pages: Iterable[tuple[str, int]] = (),
    early: Iterable[tuple[str, int]] = (),
    records_per_part: int = 5,
) -> bytes:
    """A whole background-snapshot stream: every page of every block once, in the sweep
    order (blocks as listed, offsets ascending), except that pages in ``early`` (the guest
    wrote them) come first; ``zero_pages`` are ZERO records, the others carry
    :func:`pattern`. Records are cut into RAM parts of ``records_per_part``."""
    blocks = list(blocks)
    zeros = set(zero_pages)
    first = list(early)
    order = first + [
        (name, off)
        for name, size in blocks
        for off in range(0, size, PAGE)
        if (name, off) not in set(first)
    ]
    recs: list[bytes] = []
    last: str | None = None
    for name, off in order:
        blk = None if name == last else name
        last = name
        recs.append(zero(off, blk) if (name, off) in zeros else page(off, pattern(name, off), blk))
    out = header() + ram_setup(blocks)
    for i in range(0, len(recs), records_per_part):
        out += part() + b"".join(recs[i : i + records_per_part]) + eos()
    out += part() + eos()  # the last iteration finds nothing left
    return out + device_tail()


def mtree(ranges: Iterable[tuple[int, int, str, str, int]]) -> str:
    """``info mtree -f`` text with one "memory" flat view: (start, size, type, name, offset)."""
    lines = [
        "FlatView #0",
        ' AS "I/O", root: io',
        " Root memory region: io",
        "  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan",
        "",
        "FlatView #1",
        ' AS "memory", root: system',
        ' AS "cpu-memory-0", root: system',
        " Root memory region: system",
    ]
    for start, size, kind, name, off in ranges:
        at = f" @{off:016x}" if off else ""
        lines.append(f"  {start:016x}-{start + size - 1:016x} (prio 0, {kind}): {name}{at} KVM")
    return "\n".join(lines) + "\n\n"


class BytesSource:
    """A DumpSource over bytes, handed out in small uneven reads (records straddle them)."""

    def __init__(
        self,
        data: bytes,
        chunk: int = 1000,
        live: dict[str, object] | None = None,
        *,
        vary: bool = True,
    ) -> None:
        self.data = data
        self.pos = 0
        self.chunk = chunk
        self.vary = vary  # False: every read is ``chunk`` bytes (long runs in one buffer)
        self.closed_ok = False
        self.aborted = False
        self.close_error: Exception | None = None
        if live is not None:
            self.live = live
        self.pause_window = ("t0", "t1")
        self.staging = "fifo"

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.chunk, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        # Vary the read size so that headers and pages land across read boundaries.
        if self.vary:
            self.chunk = 1 + (self.chunk * 7 + 13) % 9000
        return n

    def close_ok(self) -> None:
        if self.close_error is not None:
            raise self.close_error
        self.closed_ok = True

    def abort(self) -> None:
        self.aborted = True
