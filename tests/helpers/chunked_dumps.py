"""Chunked .mem.gz files for the Volatility layer's and the analysis's tests: written with
memdump.chunkedgz's own writer, plus where a test finds a chunk's member to damage it."""

from __future__ import annotations

import gzip
from pathlib import Path

from memdump.chunkedgz import DATA_HEADER_SIZE, Chunk, compress_bytes, read_index

SMALL_CHUNK = 64 << 10  # the format's smallest: many chunks from a few MiB


def write_chunked(path: Path, raw: bytes, chunk_size: int = SMALL_CHUNK) -> Path:
    path.write_bytes(compress_bytes(raw, chunk_size=chunk_size, level=1))
    return path


def write_single_stream(path: Path, raw: bytes) -> Path:
    """The format before issue 14: one gzip stream, no index."""
    path.write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    return path


def chunks(path: Path) -> tuple[Chunk, ...]:
    with open(path, "rb") as f:
        index = read_index(f)
    assert index is not None, f"{path} is not a chunked .mem.gz"
    return index.chunks


def chunk_at(path: Path, raw_offset: int) -> Chunk:
    return next(c for c in chunks(path) if c.raw_offset <= raw_offset < c.raw_offset + c.raw_size)


def flip_in_member(path: Path, chunk: Chunk, delta: int = 0) -> None:
    """Flip one bit inside ``chunk``'s deflate data (not its header), ``delta`` bytes in.
    Pick a chunk of varied bytes: in a run of zeros' deflate data a flip can change only
    a match distance, and the chunk still inflates to the same zeros."""
    blob = bytearray(path.read_bytes())
    body = chunk.gz_size - DATA_HEADER_SIZE - 8
    blob[chunk.gz_offset + DATA_HEADER_SIZE + (body // 2 + delta) % body] ^= 0x04
    path.write_bytes(bytes(blob))
