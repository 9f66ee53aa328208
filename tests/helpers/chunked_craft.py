"""Chunked .mem.gz files with hand-made data members, for the reading side's tests: a
member whose deflate data is laid out differently from what memdump's writer makes (still
valid), or lies about what it holds, inside an otherwise well-formed file (index, trailer,
Merkle root all consistent with the members as given). The member header follows the
format's spec (README, "The chunked .mem.gz"); the index and trailer come from memdump's
own IndexBuilder."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

from memdump.chunkedgz import IndexBuilder, Member, data_member

# magic + FLG.FEXTRA, MTIME 0, XFL 0, OS 255, XLEN 16, "MD", 12, number, member size, raw size
_HEAD = struct.Struct("<4sIBBH2sHIII")
STORED_MAX = 0xFFFF


def member(number: int, raw: bytes, deflate: bytes, *, claims: bytes | None = None) -> Member:
    """Chunk ``number``'s member holding ``deflate`` (raw deflate of ``raw``, CRC32 and
    ISIZE of ``raw``); its index entry's SHA-256 is that of ``claims`` (default ``raw``)."""
    size = _HEAD.size + len(deflate) + 8
    head = _HEAD.pack(b"\x1f\x8b\x08\x04", 0, 0, 255, 16, b"MD", 12, number, size, len(raw))
    tail = struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF)
    digest = hashlib.sha256(raw if claims is None else claims).digest()
    return Member(head + deflate + tail, len(raw), digest)


def stored_blocks(raw: bytes, sizes: list[int]) -> bytes:
    """``raw`` as stored deflate blocks of these sizes (they must add up to len(raw))."""
    assert sum(sizes) == len(raw)
    out, at = [], 0
    for n, size in enumerate(sizes):
        final = 1 if n == len(sizes) - 1 else 0
        out.append(struct.pack("<BHH", final, size, size ^ 0xFFFF) + raw[at : at + size])
        at += size
    return b"".join(out)


def write_members(path: Path, chunk_size: int, raws: list[bytes | Member]) -> Path:
    """A chunked .mem.gz of these chunks, in order: raw bytes (memdump's writer makes the
    member, level 1) or a hand-made Member."""
    builder = IndexBuilder(chunk_size)
    with open(path, "wb") as f:
        for number, item in enumerate(raws):
            m = item if isinstance(item, Member) else data_member(number, item, 1)
            builder.add(m)
            f.write(m.data)
        f.write(builder.finish()[0])
    return path
