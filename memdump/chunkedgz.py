"""The chunked .mem.gz (``memdump-chunked-gzip/1``): one valid gzip file that can be read
at any offset, verified chunk by chunk and compared with another dump from its index alone.

The file is a series of gzip members (RFC 1952; ``gunzip`` concatenates their output):

1. one *data member* per chunk of ``chunk_size`` raw bytes (the last one shorter), in order.
   Its header carries a gzip extra subfield ``MD`` (chunk number, member size, raw size), in
   the spirit of BGZF, so a reader can walk the members without inflating them;
2. *index members*: empty members (no output) whose extra subfield ``MI`` holds the next
   slice of the index, one 56-byte entry per chunk (raw offset and size, the member's offset
   and size in the file, the SHA-256 of the chunk's raw bytes);
3. the *trailer*: an empty member of exactly ``TRAILER_SIZE`` bytes, last in the file, whose
   subfield ``MT`` gives the chunk size and count, the raw size, where the index starts and
   how long it is, the SHA-256 of the index bytes and the Merkle root over the chunk hashes.

Everything lives in the one file, so it survives any copy (S3 included) without a sidecar,
and ``gzip_size_bytes``/``sha256`` keep their meaning: the file's size, and the SHA-256 of
the raw image it inflates to. A file without a trailer is an older single-stream dump.

The Merkle root is RFC 6962's Merkle Tree Hash with the chunks' SHA-256 digests as leaves
(README, "The chunked .mem.gz"), so an examiner can recompute it in a few lines of Python.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import BinaryIO, NamedTuple, overload

from isal import isal_zlib

from memdump.errors import ChunkedDumpError, CorruptChunkError

FORMAT = "memdump-chunked-gzip/1"
VERSION = 1
DEFAULT_CHUNK_SIZE = 64 << 10  # measured: benchmarks/pipeline.py, random_read.py (README)
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20

ENTRY = struct.Struct("<QIQI32s")  # raw offset, raw size, member offset, member size, sha256
# Data member header: magic, CM=deflate, FLG=FEXTRA, MTIME 0, XFL 0, OS 255 (unknown),
# XLEN 16, subfield "MD" of 12 bytes: chunk number, member size, raw size.
_DATA_HEAD = struct.Struct("<4sIBBH2sHIII")
DATA_HEADER_SIZE = _DATA_HEAD.size  # 28
_TAIL = struct.Struct("<II")  # CRC32, ISIZE
_EMPTY_DEFLATE = b"\x03\x00"  # one final fixed-Huffman block with no data
_EXTRA_HEAD = struct.Struct("<4sIBBH2sH")  # up to the subfield's LEN
_INDEX_SLICE = 65520  # XLEN is 16 bits: 4 bytes of subfield header + this
_TRAILER_BODY = struct.Struct("<4sB3xIIQQQ32s32s")
TRAILER_SIZE = _EXTRA_HEAD.size + _TRAILER_BODY.size + len(_EMPTY_DEFLATE) + _TAIL.size  # 130
_GZ_MAGIC = b"\x1f\x8b\x08\x04"
_OS_UNKNOWN = 255
# The Merkle tree is checked (and kept, Index.subtree_roots) as the roots of runs of
# SUBTREE chunks: a second index of the same VM re-hashes only the runs whose digests
# differ (read_index's ``like``), and the SHA-256s of a run come out of one unpack.
SUBTREE = 64
_RUN_DIGESTS = struct.Struct("<" + "24x32s" * SUBTREE)


class Chunk(NamedTuple):
    # A tuple, not a dataclass: an index holds 16,384 of them per GiB of image (64 KiB
    # chunks) and is read at every open; a frozen dataclass took 4x as long to build.
    number: int
    raw_offset: int
    raw_size: int
    gz_offset: int
    gz_size: int
    sha256: bytes


class PackedChunks(Sequence[Chunk]):
    """The index's entries as stored (56 bytes each), read as Chunk tuples on access: a
    capture's index grows with the image (16,384 entries per GiB at 64 KiB chunks), and
    objects would cost 3x the bytes (the pipeline's peak memory grew with the dump)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: bytes) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries) // ENTRY.size

    @overload
    def __getitem__(self, i: int) -> Chunk: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Chunk]: ...
    def __getitem__(self, i: int | slice) -> Chunk | Sequence[Chunk]:
        if isinstance(i, slice):
            return [self[n] for n in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chunk number out of range")
        return Chunk(i, *ENTRY.unpack_from(self._entries, i * ENTRY.size))

    def __iter__(self) -> Iterator[Chunk]:
        for n, fields in enumerate(ENTRY.iter_unpack(self._entries)):
            yield Chunk(n, *fields)

    def digests(self) -> list[bytes]:
        return [d for run in self.digest_runs() for d in run]

    def digest_runs(self) -> Iterator[tuple[bytes, ...]]:
        """The chunks' SHA-256s, SUBTREE chunks at a time (the last run may be shorter)."""
        step = SUBTREE * ENTRY.size
        full = len(self._entries) // step * step
        for at in range(0, full, step):
            yield _RUN_DIGESTS.unpack_from(self._entries, at)
        if full < len(self._entries):
            tail = memoryview(self._entries)[full:]
            yield tuple(fields[4] for fields in ENTRY.iter_unpack(tail))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedChunks):
            return self._entries == other._entries
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return f"PackedChunks({len(self)} chunks)"


@dataclass(frozen=True)
class Index:
    chunk_size: int
    raw_size: int
    chunks: PackedChunks
    index_sha256: str  # hex, of the index bytes (the entries, as stored)
    merkle_root: str  # hex
    # The roots of the runs of SUBTREE chunks (the last may be shorter), 32 bytes each, as
    # read_index computed them from ``chunks`` or IndexBuilder as it wrote them.
    subtree_roots: bytes = field(default=b"", compare=False, repr=False)

    def covering(self, start: int, end: int) -> range:
        """Numbers of the chunks holding raw bytes ``[start, end)`` (clipped to the image)."""
        start = max(0, start)
        end = min(end, self.raw_size)
        if end <= start:
            return range(0)
        return range(start // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def summary(self) -> dict[str, object]:
        """The manifest's ``chunks`` section."""
        return {
            "format": FORMAT,
            "chunk_size": self.chunk_size,
            "chunk_count": len(self.chunks),
            "index_sha256": self.index_sha256,
            "merkle_root": self.merkle_root,
        }


class MerkleTree:
    """RFC 6962's Merkle Tree Hash built leaf by leaf in O(log n) memory: a stack of the
    perfect subtrees so far (sizes strictly decreasing), merged as equal sizes meet; the
    root folds the stack from the right, which is the RFC's split at the largest power of
    two below n."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self._runs = bytearray()  # the root of each whole run of SUBTREE leaves so far

    def add(self, digest: bytes) -> None:
        size, node = 1, hashlib.sha256(b"\x00" + digest).digest()
        while self._stack and self._stack[-1][0] == size:
            _, left = self._stack.pop()
            size, node = size * 2, hashlib.sha256(b"\x01" + left + node).digest()
            if size == SUBTREE:  # runs are aligned perfect subtrees: each is one such node
                self._runs += node
        self._stack.append((size, node))

    def run_roots(self) -> bytes:
        """Index.subtree_roots: the root of each run of SUBTREE leaves, the last one
        (shorter) folded from the smaller subtrees still on the stack."""
        tail = [node for size, node in self._stack if size < SUBTREE]
        if not tail:
            return bytes(self._runs)
        node = tail[-1]
        for left in reversed(tail[:-1]):
            node = hashlib.sha256(b"\x01" + left + node).digest()
        return bytes(self._runs) + node

    def root(self) -> bytes:
        if not self._stack:
            return hashlib.sha256(b"").digest()
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = hashlib.sha256(b"\x01" + left + node).digest()
        return node


def merkle_root(digests: Iterable[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash with ``digests`` as the leaves' data, SUBTREE leaves at a
    time (memory: one root per SUBTREE digests)."""
    it = iter(digests)
    return _root_over([_run_root(run) for run in iter(lambda: tuple(islice(it, SUBTREE)), ())])


def _run_root(digests: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of one non-empty run of leaves."""
    sha = hashlib.sha256
    return _root_over([sha(b"\x00" + d).digest() for d in digests])


def _root_over(nodes: list[bytes]) -> bytes:
    """The root above ``nodes``, the roots of consecutive perfect subtrees of one size but
    the last (which may be smaller), level by level: pairs hashed, an odd last node carried
    up as it is. That is RFC 6962's split at the largest power of two below n, one level
    per list comprehension instead of a stack push per leaf (30 % faster)."""
    if not nodes:
        return hashlib.sha256(b"").digest()
    sha = hashlib.sha256
    while len(nodes) > 1:
        pairs = iter(nodes)  # zip(it, it): consecutive pairs; an odd last one is left over
        upper = [
            sha(b"\x01" + left + right).digest()
            for left, right in zip(pairs, pairs)  # noqa: B905
        ]
        if len(nodes) & 1:
            upper.append(nodes[-1])
        nodes = upper
    return nodes[0]


@dataclass(frozen=True)
class Member:
    data: bytes  # the whole gzip member
    raw_size: int
    sha256: bytes  # of the raw bytes


def data_member(number: int, raw: bytes | memoryview, level: int) -> Member:
    """One chunk's gzip member. Safe to call from several threads at once: ISA-L and
    hashlib release the GIL on large buffers."""
    digest = hashlib.sha256(raw).digest()
    body = isal_zlib.compress(raw, level, -15)
    if len(body) >= len(raw):
        # Random-looking bytes do not compress: Huffman-coded literals take ~4x as long to
        # inflate as stored blocks (every random read, check and verify of this chunk
        # pays that), and stored blocks are not larger.
        stored = _stored_deflate(raw)
        if len(stored) <= len(body):
            body = stored
    size = DATA_HEADER_SIZE + len(body) + _TAIL.size
    head = _DATA_HEAD.pack(_GZ_MAGIC, 0, 0, _OS_UNKNOWN, 16, b"MD", 12, number, size, len(raw))
    tail = _TAIL.pack(isal_zlib.crc32(raw) & 0xFFFFFFFF, len(raw) & 0xFFFFFFFF)
    return Member(b"".join((head, body, tail)), len(raw), digest)


_STORED_MAX = 0xFFFF


def _stored_deflate(raw: bytes | memoryview) -> bytes:
    """``raw`` as raw deflate stored blocks (RFC 1951 3.2.4): per block of up to 65,535
    bytes one header byte (BFINAL, BTYPE 00), LEN, NLEN, then the bytes as they are."""
    view = memoryview(raw)
    parts: list[bytes | memoryview] = []
    starts = range(0, max(len(view), 1), _STORED_MAX)
    for at in starts:
        piece = view[at : at + _STORED_MAX]
        final = 1 if at + _STORED_MAX >= len(view) else 0
        parts.append(struct.pack("<BHH", final, len(piece), len(piece) ^ 0xFFFF))
        parts.append(piece)
    return b"".join(parts)


def _empty_member(subfield: bytes, payload: bytes) -> bytes:
    head = _EXTRA_HEAD.pack(_GZ_MAGIC, 0, 0, _OS_UNKNOWN, 4 + len(payload), subfield, len(payload))
    return b"".join((head, payload, _EMPTY_DEFLATE, _TAIL.pack(0, 0)))


class IndexBuilder:
    """Collects the entries of the data members as they are written, in order, and gives
    the bytes that end the file (index members and trailer) and the Index they describe."""

    def __init__(self, chunk_size: int) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk size {chunk_size} is not a power of two in range")
        self.chunk_size = chunk_size
        self._entries = bytearray()  # packed as stored: 56 bytes per chunk
        self._tree = MerkleTree()
        self._raw = 0
        self._gz = 0

    def add(self, member: Member) -> None:
        self._entries += ENTRY.pack(
            self._raw, member.raw_size, self._gz, len(member.data), member.sha256
        )
        self._tree.add(member.sha256)
        self._raw += member.raw_size
        self._gz += len(member.data)

    def finish(self) -> tuple[bytes, Index]:
        """The index members and trailer (to append after the last data member)."""
        entries = bytes(self._entries)
        self._entries = bytearray()
        index_sha = hashlib.sha256(entries).digest()
        chunks = PackedChunks(entries)
        root = self._tree.root()
        members = [
            _empty_member(b"MI", entries[i : i + _INDEX_SLICE])
            for i in range(0, len(entries), _INDEX_SLICE)
        ]
        trailer = _empty_member(
            b"MT",
            _TRAILER_BODY.pack(
                b"MDGZ",
                VERSION,
                self.chunk_size,
                len(chunks),
                self._raw,
                self._gz,
                len(entries),
                index_sha,
                root,
            ),
        )
        index = Index(
            self.chunk_size, self._raw, chunks, index_sha.hex(), root.hex(), self._tree.run_roots()
        )
        return b"".join(members) + trailer, index


def compress_bytes(raw: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = 1) -> bytes:
    """A whole chunked .mem.gz in memory (tests, small tools; captures stream)."""
    builder = IndexBuilder(chunk_size)
    out = []
    for number, off in enumerate(range(0, len(raw), chunk_size)):
        member = data_member(number, raw[off : off + chunk_size], level)
        builder.add(member)
        out.append(member.data)
    tail, _ = builder.finish()
    out.append(tail)
    return b"".join(out)


def _pread(f: BinaryIO, offset: int, size: int) -> bytes:
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd >= 0:
        parts = []
        while size > 0:
            data = os.pread(fd, size, offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)
    f.seek(offset)
    return f.read(size)


def _file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return f.seek(0, os.SEEK_END)


def parse_trailer(tail: bytes) -> tuple[int, int, int, int, int, bytes, bytes] | None:
    """The trailer's fields (chunk size, chunk count, raw size, index offset, index size,
    index SHA-256, Merkle root) from the file's last TRAILER_SIZE bytes; None when they are
    not a memdump trailer (an older single-stream dump)."""
    if len(tail) != TRAILER_SIZE:
        return None
    magic, _mtime, _xfl, _os, xlen, sub, sublen = _EXTRA_HEAD.unpack_from(tail)
    body_at = _EXTRA_HEAD.size
    if (
        magic != _GZ_MAGIC
        or sub != b"MT"
        or xlen != 4 + _TRAILER_BODY.size
        or sublen != _TRAILER_BODY.size
        or tail[body_at : body_at + 4] != b"MDGZ"
    ):
        return None
    fields = _TRAILER_BODY.unpack_from(tail, body_at)
    if tail[body_at + _TRAILER_BODY.size :] != _EMPTY_DEFLATE + _TAIL.pack(0, 0):
        raise ChunkedDumpError("chunked .mem.gz: trailer member is malformed", part="trailer")
    if fields[1] != VERSION:
        raise ChunkedDumpError(
            f"chunked .mem.gz version {fields[1]} is not supported", version=fields[1]
        )
    _m, _v, chunk_size, count, raw_size, index_offset, index_size, index_sha, root = fields
    return chunk_size, count, raw_size, index_offset, index_size, index_sha, root


# Indexes read and checked in this process, by file (its resolved path), that another
# reader of the same file may pass read_index as ``like`` (memdump.analysis: the check
# reads the index, then Volatility's layer opens the file and reads it again). Only the
# hashing of unchanged runs is saved: the root checked is still the file's own.
_HINTS: dict[str, Index] = {}
_HINTS_LOCK = threading.Lock()


@contextmanager
def index_hint(path: os.PathLike[str] | str, index: Index) -> Iterator[None]:
    """While inside, ``hinted(path)`` gives ``index``."""
    key = os.path.realpath(path)
    with _HINTS_LOCK:
        before = _HINTS.get(key)
        _HINTS[key] = index
    try:
        yield
    finally:
        with _HINTS_LOCK:
            if before is None:
                _HINTS.pop(key, None)
            else:
                _HINTS[key] = before


def hinted(path: os.PathLike[str] | str) -> Index | None:
    """The index given for ``path`` by an index_hint in force, if any."""
    with _HINTS_LOCK:
        return _HINTS.get(os.path.realpath(path))


def read_index(f: BinaryIO, *, like: Index | None = None) -> Index | None:
    """The index of a chunked .mem.gz, checked against the trailer's digests and for a
    gap-free tiling of the raw image and the file; None for an older single-stream dump.
    ``like``: an index read before (another capture of the same VM): where a run of
    SUBTREE chunks has the same digests in both, its subtree root is like's (the same
    leaves give the same tree), so checking the Merkle root costs the hashes of the runs
    that changed; the root checked is the same."""
    size = _file_size(f)
    if size < TRAILER_SIZE:
        return None
    parsed = parse_trailer(_pread(f, size - TRAILER_SIZE, TRAILER_SIZE))
    if parsed is None:
        return None
    chunk_size, count, raw_size, index_offset, index_size, index_sha, root = parsed
    if index_offset > size - TRAILER_SIZE or index_size != count * ENTRY.size:
        raise ChunkedDumpError(
            "chunked .mem.gz: the trailer's index position does not fit the file",
            index_offset=index_offset,
            index_size=index_size,
        )
    entries = _read_index_members(_pread(f, index_offset, size - TRAILER_SIZE - index_offset))
    return index_from_entries(
        entries, chunk_size, count, raw_size, index_offset, index_sha, root, like=like
    )


def _read_index_members(blob: bytes) -> bytes:
    parts = []
    at = 0
    end_of_member = len(_EMPTY_DEFLATE) + _TAIL.size
    while at < len(blob):
        if len(blob) - at < _EXTRA_HEAD.size + end_of_member:
            raise ChunkedDumpError("chunked .mem.gz: index member truncated", part="index")
        magic, _t, _x, _o, xlen, sub, sublen = _EXTRA_HEAD.unpack_from(blob, at)
        if magic != _GZ_MAGIC or sub != b"MI" or xlen != sublen + 4:
            raise ChunkedDumpError("chunked .mem.gz: index member malformed", part="index")
        start = at + _EXTRA_HEAD.size
        parts.append(blob[start : start + sublen])
        at = start + sublen
        if blob[at : at + end_of_member] != _EMPTY_DEFLATE + _TAIL.pack(0, 0):
            raise ChunkedDumpError("chunked .mem.gz: index member malformed", part="index")
        at += end_of_member
    return b"".join(parts)


def index_from_entries(
    entries: bytes,
    chunk_size: int,
    count: int,
    raw_size: int,
    index_offset: int,
    index_sha: bytes,
    root: bytes,
    *,
    like: Index | None = None,
) -> Index:
    """Check index bytes against the trailer's fields and turn them into an Index (also
    used where the bytes came by ranged reads, e.g. from S3); ``like`` as for read_index."""
    if hashlib.sha256(entries).digest() != index_sha:
        raise ChunkedDumpError(
            "chunked .mem.gz: the index does not match its SHA-256 in the trailer", part="index"
        )
    if len(entries) != count * ENTRY.size or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkedDumpError("chunked .mem.gz: index size or chunk size is wrong", part="index")
    if not _tiles(entries, chunk_size, raw_size, index_offset):
        _check_tiling(entries, chunk_size, raw_size, index_offset)
    chunks = PackedChunks(bytes(entries))
    roots = _subtree_roots(chunks, like)
    if _root_over(roots) != root:
        raise ChunkedDumpError(
            "chunked .mem.gz: the chunk hashes do not give the trailer's Merkle root",
            part="index",
        )
    return Index(chunk_size, raw_size, chunks, index_sha.hex(), root.hex(), b"".join(roots))


def _subtree_roots(chunks: PackedChunks, like: Index | None) -> list[bytes]:
    """The root of each run of SUBTREE chunks; a run with the same digests as that run of
    ``like`` (as many chunks, roots kept by read_index) gets like's root unhashed."""
    runs = -(-len(chunks) // SUBTREE)
    if like is None or len(like.chunks) != len(chunks) or len(like.subtree_roots) != 32 * runs:
        return [_run_root(run) for run in chunks.digest_runs()]
    kept = like.subtree_roots
    both = zip(chunks.digest_runs(), like.chunks.digest_runs(), strict=True)
    return [
        kept[32 * n : 32 * n + 32] if run == old else _run_root(run)
        for n, (run, old) in enumerate(both)
    ]


def _tiles(entries: bytes, chunk_size: int, raw_size: int, index_offset: int) -> bool:
    """True if the entries tile the raw image [0, raw_size) with chunks of ``chunk_size``
    (the last one shorter) and the file [0, index_offset) with members longer than a data
    header, in order: what _check_tiling asks, as column compares of the entries read as
    native 64- and 32-bit words (little-endian hosts; False elsewhere, or when an entry
    is out of place: _check_tiling then decides and names it). About 3x the loop's speed."""
    count = len(entries) // ENTRY.size
    full, rest = divmod(raw_size, chunk_size)
    if sys.byteorder != "little" or not count or count != full + (rest > 0):
        return False
    words8, words4 = memoryview(entries).cast("Q"), memoryview(entries).cast("I")
    # An entry is 7 words of 8 bytes (raw_offset is the first) or 14 of 4 bytes: raw_offset
    # (2), raw_size, gz_offset (2), gz_size, sha256 (8).
    if words8[0::7].tobytes() != array("Q", range(0, count * chunk_size, chunk_size)).tobytes():
        return False
    sizes = array("I", [chunk_size]) * full
    if rest:
        sizes.append(rest)
    if words4[2::14].tobytes() != sizes.tobytes():
        return False
    members = words4[5::14].tolist()
    ends = array("Q", accumulate(members))
    if ends[-1] != index_offset or min(members) <= DATA_HEADER_SIZE:
        return False
    starts = memoryview((array("Q", [0]) + ends[:-1]).tobytes()).cast("I")  # low, high words
    return (
        words4[3::14].tobytes() == starts[0::2].tobytes()
        and words4[4::14].tobytes() == starts[1::2].tobytes()
    )


def _check_tiling(entries: bytes, chunk_size: int, raw_size: int, index_offset: int) -> None:
    """The tiling check entry by entry: raises naming the first entry out of place."""
    raw_at = gz_at = 0
    for number, (raw_off, raw_len, gz_off, gz_len, _digest) in enumerate(
        ENTRY.iter_unpack(entries)
    ):
        want_len = min(chunk_size, raw_size - raw_at)
        if (raw_off, raw_len, gz_off) != (raw_at, want_len, gz_at) or gz_len <= DATA_HEADER_SIZE:
            raise ChunkedDumpError(
                f"chunked .mem.gz: index entry {number} does not follow the one before",
                part="index",
                number=number,
            )
        raw_at += raw_len
        gz_at += gz_len
    if raw_at != raw_size or gz_at != index_offset:
        raise ChunkedDumpError("chunked .mem.gz: the index does not cover the image", part="index")


def inflate_member(chunk: Chunk, member: bytes, *, check: bool = True) -> bytes:
    """The raw bytes of ``chunk`` from its member's bytes. Every header field is checked;
    with ``check`` also the CRC32 and the SHA-256 (the index's)."""

    def bad(reason: str) -> CorruptChunkError:
        return CorruptChunkError(
            f"chunk {chunk.number} (raw bytes {chunk.raw_offset:#x}-"
            f"{chunk.raw_offset + chunk.raw_size:#x}) is corrupt: {reason}",
            number=chunk.number,
            raw_offset=chunk.raw_offset,
            raw_size=chunk.raw_size,
            reason=reason,
        )

    if len(member) != chunk.gz_size:
        raise bad("member truncated")
    magic, _t, _x, _o, xlen, sub, sublen, number, msize, rsize = _DATA_HEAD.unpack_from(member)
    if (
        magic != _GZ_MAGIC
        or (xlen, sub, sublen) != (16, b"MD", 12)
        or (number, msize, rsize) != (chunk.number, chunk.gz_size, chunk.raw_size)
    ):
        raise bad("member header does not match the index")
    crc, isize = _TAIL.unpack_from(member, len(member) - _TAIL.size)
    try:
        # Never more than the chunk's size plus one byte: a hostile member must not
        # inflate to gigabytes (several are inflated at once when verifying).
        inflater = isal_zlib.decompressobj(-15)
        body = memoryview(member)[DATA_HEADER_SIZE : -_TAIL.size]
        raw = inflater.decompress(body, chunk.raw_size + 1)
        complete = inflater.eof and not inflater.unconsumed_tail
    except Exception as exc:  # isal_zlib.error (untyped), or a too-short member
        raise bad(f"deflate data: {exc}") from exc
    if len(raw) != chunk.raw_size or isize != chunk.raw_size & 0xFFFFFFFF or not complete:
        raise bad("size")
    if check:
        if isal_zlib.crc32(raw) & 0xFFFFFFFF != crc:
            raise bad("crc")
        if hashlib.sha256(raw).digest() != chunk.sha256:
            raise bad("sha256")
    return raw


def read_chunk(f: BinaryIO, chunk: Chunk, *, check: bool = True) -> bytes:
    return inflate_member(chunk, _pread(f, chunk.gz_offset, chunk.gz_size), check=check)


class ChunkReader:
    """Random access to the raw image: only the chunks a read touches are inflated, and the
    last ``cache_chunks`` of them are kept. Thread-safe."""

    def __init__(
        self, f: BinaryIO, index: Index, cache_chunks: int = 8, check: bool = False
    ) -> None:
        self._f = f
        self.index = index
        self._check = check
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = max(1, cache_chunks)
        self._lock = threading.Lock()

    def chunk(self, number: int) -> bytes:
        with self._lock:
            data = self._cache.get(number)
            if data is not None:
                self._cache.move_to_end(number)
                return data
        data = read_chunk(self._f, self.index.chunks[number], check=self._check)
        with self._lock:
            self._cache[number] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        for number in self.index.covering(offset, offset + length):
            chunk = self.index.chunks[number]
            data = self.chunk(number)
            lo = max(offset, chunk.raw_offset) - chunk.raw_offset
            hi = min(offset + length, chunk.raw_offset + chunk.raw_size) - chunk.raw_offset
            parts.append(data[lo:hi])
        return b"".join(parts)
