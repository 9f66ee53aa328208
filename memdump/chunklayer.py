"""A Volatility 3 layer that reads a chunked ``.mem.gz`` (memdump.chunkedgz) in place.

Volatility opens ``*.gz`` through Python's gzip module: every read decompresses from the
start of the stream (or from the last position, forwards), so analysts gunzip a copy
first. A chunked dump needs neither: its index says which gzip member holds any offset of
the raw image, and only that member is inflated (``ChunkReader``, which keeps the last few
chunks). Reads spanning several chunks (a plugin's 16 MiB scan windows) inflate them on
a few threads at once: ISA-L and hashlib release the GIL.

``ChunkedGzipLayer`` is a data layer over the raw ELF image, so Volatility's ELF layer
(and, above it, the OS layers) stack on it as they do on the uncompressed file.
``ChunkedGzipStacker`` makes ``-f dump.mem.gz`` use it: Volatility first opens the file
as a FileLayer (through gzip), this stacker runs before the file-format ones
(``stack_order``) and puts the chunked layer on top when the file has a memdump
trailer; an older single-stream dump is left to Volatility's own gzip path.

This module is Volatility code (it imports volatility3 at import time): only
memdump.volatility imports it, from ``load()``, and the ``memdump vol`` command.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from isal import isal_zlib
from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import physical

from memdump.chunkedgz import (
    DATA_HEADER_SIZE,
    Chunk,
    ChunkReader,
    Index,
    hinted,
    read_chunk,
    read_index,
)
from memdump.errors import ChunkedDumpError

log = logging.getLogger("memdump.chunklayer")

# Inflated chunks kept, in bytes (so in chunks: 48 of 1 MiB, at least 4): a plugin
# walking structures comes back to the same pages, and a scan holds its window and the
# next one, read ahead (see _read).
CACHE_BYTES = 48 << 20
# Chunks a page read keeps (without verify: as far as reads went into them, see
# _from_prefix), in bytes (so 64 of 64 KiB, at least 4): enough for the pages a plugin
# comes back to (page tables, lists it walks); more costs every random read fresh
# memory (measured: 768 chunks kept made a random page ~40 % slower than 16).
PREFIX_CACHE_BYTES = 4 << 20
_LIVE_PREFIXES = 2
# Threads inflating one multi-chunk read; the reader is the analyst's process, not a
# collector, so "the cores there are" (capped: more is memory, not speed, at 2 per core).
_MAX_THREADS = 8


def local_path(location: str) -> Path | None:
    """The local file behind a Volatility location (a ``file:`` URI or a plain path);
    None for anything remote (Volatility would download it: not ours to read in place)."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return None
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(location)
    return None


def open_index(path: Path) -> Index | None:
    """The chunk index of ``path``; None for an older single-stream ``.mem.gz`` (or any
    file without a memdump trailer). A trailer whose index is damaged raises
    ChunkedDumpError."""
    with open(path, "rb") as f:
        return read_index(f)


# A data member's header as the format defines it (memdump.chunkedgz, README): magic
# with FLG.FEXTRA, MTIME, XFL, OS (not compared), XLEN, subfield "MD", its length, chunk
# number, member size, raw size. Unpacked: magic, XLEN, "MD", 12, number, sizes.
_MEMBER_HEAD = struct.Struct("<4s4x2xH2sHIII")  # DATA_HEADER_SIZE bytes (tested)
_GZ_TAIL = 8  # CRC32, ISIZE
# Raw deflate stored blocks (RFC 1951 3.2.4), as the writer stores an incompressible
# chunk: blocks of up to 65,535 bytes, each a header byte (BFINAL, BTYPE 00, padding),
# LEN, NLEN, then the bytes as they are.
_STORED_MAX = 0xFFFF
_STORED_HEAD = struct.Struct("<BHH")
# Compressed input fed to the inflater beyond what the chunk's average ratio says the
# wanted output takes: the ratio varies inside a chunk, and every call costs a little.
_FEED_MARGIN = 512


class _Damaged(Exception):
    """A partly read chunk is not what its index entry says (see _damaged)."""


class _Irregular(Exception):
    """A member of a stored chunk's size whose blocks are not laid out as the writer lays
    them out: valid deflate perhaps, read by inflating it (_Prefix)."""


def _stored_body_size(raw_size: int) -> int:
    return raw_size + _STORED_HEAD.size * max(1, -(-raw_size // _STORED_MAX))


def _stored_head_ok(head: bytes, number: int, raw_size: int) -> bool:
    """Whether ``head`` is stored block ``number``'s header as the writer lays it out: a
    full block (the last one the rest), BFINAL only on the last."""
    if len(head) != _STORED_HEAD.size:
        return False
    flags, size, check = _STORED_HEAD.unpack(head)
    last = max(1, -(-raw_size // _STORED_MAX)) - 1
    want = min(_STORED_MAX, raw_size - number * _STORED_MAX)
    return bool(
        flags & 0b110 == 0 and flags & 1 == (number == last) and size == want == check ^ 0xFFFF
    )


class _Zeros:
    """A chunk whose index SHA-256 is that of all-zero bytes (its member header checked):
    the index, checked against the trailer's digest and Merkle root when it was read,
    already says what every byte is, so nothing is inflated (``verify`` still does)."""

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk

    def read(self, lo: int, hi: int) -> bytes:
        return bytes(hi - lo)


class _Stored:
    """A chunk stored as it is (incompressible bytes, stored deflate blocks): a read is
    one pread of the bytes themselves, the member's header and the headers of the blocks
    up to the read's end checked first (the ones a read spans, from its own bytes)."""

    def __init__(self, fd: int, chunk: Chunk) -> None:
        self.chunk = chunk
        self._fd = fd
        self._body = chunk.gz_offset + DATA_HEADER_SIZE
        self._checked = 1  # block headers known good (block 0's: checked by _start)

    def _head(self, number: int, head: bytes) -> None:
        if not _stored_head_ok(head, number, self.chunk.raw_size):
            raise _Irregular

    def read(self, lo: int, hi: int) -> bytes:
        step = _STORED_MAX + _STORED_HEAD.size
        first, last = lo // _STORED_MAX, (hi - 1) // _STORED_MAX
        # Headers before the read's first block are not among its bytes: read them.
        for n in range(self._checked, first + 1):
            self._head(n, os.pread(self._fd, _STORED_HEAD.size, self._body + n * step))
            self._checked = n + 1
        # Raw byte r of block n is at body + 5 * (n + 1) + r.
        start = self._body + _STORED_HEAD.size * (first + 1) + lo
        size = _STORED_HEAD.size * (last - first) + hi - lo
        got = os.pread(self._fd, size, start)
        if len(got) != size:
            raise _Damaged  # the file is shorter than its index says
        if first == last:
            return got
        parts = []
        at = 0
        for n in range(first, last + 1):
            if n > first:
                self._head(n, got[at : at + _STORED_HEAD.size])
                self._checked = max(self._checked, n + 1)
                at += _STORED_HEAD.size
            take = min((n + 1) * _STORED_MAX, hi) - max(n * _STORED_MAX, lo)
            parts.append(got[at : at + take])
            at += take
        return b"".join(parts)


class _Prefix:
    """A chunk inflated as far as reads have needed.

    ISA-L inflates all the input it is given whatever ``max_length`` says (measured: the
    first 4 KiB of a 64 KiB chunk cost as much as all of it), so the compressed bytes are
    fed a slice at a time: about what the wanted output takes at the chunk's ratio. Each
    call's output stays bounded by the chunk's size (plus one byte, which is damage).

    While the chunk is among the last few read (the layer's ``_live``) the inflater and
    the compressed bytes are kept, so a walk through the chunk goes on where it stopped;
    after that (``suspend``) only the output is: an inflater is ~100 KB, and keeping one
    per cached chunk made every random read pay for fresh memory (measured: +40 %).
    A suspended prefix that must go further starts again from the member."""

    def __init__(self, chunk: Chunk, fd: int, check_head: Callable[[Chunk, bytes], None]) -> None:
        self.chunk = chunk
        self.data = b""
        self.complete = False
        self._fd = fd
        self._check_head = check_head  # raises for a member header the index disowns
        self._inflater: Any = None
        self._at = 0  # deflate bytes fed so far

    def read(self, lo: int, hi: int) -> bytes:
        if len(self.data) < hi:
            self.extend(hi)
        return self.data[lo:hi]

    def suspend(self) -> None:
        self._inflater = None

    def extend(self, end: int) -> None:
        chunk = self.chunk
        raw_size = chunk.raw_size
        body_size = chunk.gz_size - DATA_HEADER_SIZE - _GZ_TAIL
        if self._inflater is None:  # new, or suspended: from the start of the member
            self._inflater = isal_zlib.decompressobj(-15)
            self._at = 0
            self.data = b""
        try:
            while len(self.data) < end and not self.complete:
                # The compressed bytes are read as they are fed (not the whole member
                # first): a page near a chunk's start needs a small part of it.
                need = end - len(self.data)
                take = min(need * body_size // raw_size + _FEED_MARGIN, body_size - self._at)
                if self._at == 0:
                    head = os.pread(self._fd, DATA_HEADER_SIZE + take, chunk.gz_offset)
                    self._check_head(chunk, head[:DATA_HEADER_SIZE])
                    piece = head[DATA_HEADER_SIZE:]
                else:
                    at = chunk.gz_offset + DATA_HEADER_SIZE + self._at
                    piece = os.pread(self._fd, take, at)
                if len(piece) != take:
                    raise _Damaged  # the file is shorter than its index says
                self._at += take
                room = raw_size + 1 - len(self.data)
                got = self._inflater.decompress(piece, room)
                # bytes, not a bytearray: a new chunk's one piece is kept uncopied.
                self.data = self.data + got if self.data else got
                if self._inflater.unconsumed_tail or len(self.data) > raw_size:
                    raise _Damaged  # more output than the chunk holds
                # All input taken is not the end: the inflater may hold more output.
                if self._inflater.eof or (not got and self._at >= body_size):
                    self.complete = True
                    self.suspend()
        except _Damaged:
            raise
        except Exception as exc:  # isal_zlib.error (untyped)
            raise _Damaged from exc
        if self.complete and len(self.data) != raw_size:
            raise _Damaged


class ChunkedGzipLayer(interfaces.layers.DataLayerInterface):  # type: ignore[misc]
    """The raw image inside a chunked ``.mem.gz``, read chunk by chunk through its index.

    Config: ``location`` (a ``file:`` URI or path), ``verify`` (optional, default off:
    also check each chunk's CRC32 and SHA-256 against the index when inflating it; the
    header fields and sizes are always checked). A chunk that fails raises
    CorruptChunkError (memdump.errors) out of ``read``, naming the chunk and its raw
    range: a damaged dump is never read as zeros, even with ``pad``.
    """

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._location: str = self.config["location"]
        self._verify = bool(self.config.get("verify", False))
        path = local_path(self._location)
        if path is None:
            raise exceptions.LayerException(name, f"not a local file: {self._location}")
        self._path = path
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._reader: ChunkReader | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future[bytes]] = {}  # chunks being read ahead
        self._cache_chunks = 4
        self._prefix_lock = threading.Lock()
        self._prefixes: OrderedDict[int, _Zeros | _Stored | _Prefix] = OrderedDict()
        self._zero_digests: dict[int, bytes] = {}
        # The prefixes whose inflater is kept (see _Prefix): a walk through a chunk, or
        # two walks side by side (a page table and what it maps), go on where they were.
        self._live: deque[_Prefix] = deque(maxlen=_LIVE_PREFIXES)
        self._prefix_chunks = 4
        self.inflated: set[int] = set()  # chunk numbers read so far (checked, with verify)
        # Open now, so a missing file or a damaged index fails the layer's construction
        # (and the stacker), as FileLayer does for a missing file.
        self._index = self._open().index

    def _open(self) -> ChunkReader:
        with self._lock:
            if self._reader is None:
                f = open(self._path, "rb")  # noqa: SIM115 (closed by destroy())
                try:
                    index = read_index(f, like=hinted(self._path))
                except ChunkedDumpError as exc:
                    f.close()
                    raise exceptions.LayerException(self.name, str(exc)) from exc
                except BaseException:
                    f.close()
                    raise
                if index is None:
                    f.close()
                    raise exceptions.LayerException(
                        self.name, f"not a chunked .mem.gz (no memdump trailer): {self._path}"
                    )
                self._file = f
                self._cache_chunks = max(4, CACHE_BYTES // index.chunk_size)
                self._prefix_chunks = max(4, PREFIX_CACHE_BYTES // index.chunk_size)
                self._reader = ChunkReader(
                    f, index, cache_chunks=self._cache_chunks, check=self._verify
                )
            return self._reader

    @property
    def index(self) -> Index:
        return self._index

    @property
    def location(self) -> str:
        return self._location

    @property
    def maximum_address(self) -> int:
        return self._index.raw_size - 1

    @property
    def minimum_address(self) -> int:
        return 0

    def is_valid(self, offset: int, length: int = 1) -> bool:
        if length <= 0:
            raise ValueError("Length must be positive")
        return 0 <= offset and offset + length <= self._index.raw_size

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        if length <= 0:
            return b""
        size = self._index.raw_size
        if not (0 <= offset and offset + length <= size):  # is_valid, without the call
            if not pad:
                bad = offset if not 0 <= offset < size else size
                raise exceptions.InvalidAddressException(
                    self.name, bad, "Offset outside of the chunked image's boundaries"
                )
            # Only the part outside the image is padding.
            lo, hi = max(offset, 0), min(offset + length, size)
            if lo >= hi:
                return bytes(length)
            return bytes(lo - offset) + self._read(lo, hi - lo) + bytes(offset + length - hi)
        return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        # Per page, Python's overhead is a good part of the cost: chunk numbers from
        # the chunk size (the index tiles the image: checked when it was read), and an
        # index entry unpacked only when a chunk is first read.
        size = self._index.chunk_size
        first = offset // size
        last = (offset + length - 1) // size
        if self._file is None:
            self._open()  # after destroy(), or unpickled in another process
        if not self._verify and last - first <= 1:
            if first == last:
                data = self._from_prefix(first, offset - first * size, length)
            else:
                # A page across a chunk edge (an ELF's segments need not start on a
                # page boundary of the file: then 1 page in 16 at 64 KiB chunks).
                edge = last * size
                data = self._from_prefix(first, offset - first * size, edge - offset)
                data += self._from_prefix(last, 0, offset + length - edge)
            self.inflated.add(first)
            self.inflated.add(last)
            return data
        reader = self._reader or self._open()
        numbers = range(first, last + 1)
        if len(numbers) <= 2:
            data = reader.read(offset, length)
        else:
            # A scan window: inflate its chunks side by side, then cut the range out.
            chunks = [f.result() for f in self._inflate(reader, numbers)]
            at = offset - first * size
            data = b"".join(chunks)[at : at + length]
        self.inflated.update(numbers)
        return data

    def _from_prefix(self, number: int, lo: int, length: int) -> bytes:
        """Bytes ``[lo, lo + length)`` of chunk ``number``, reading no more of it than
        they need (without ``verify`` only: the CRC32 and SHA-256 need the whole chunk).
        By the kind of chunk:

        * all zeros (its index SHA-256 says so): no inflating at all (_Zeros);
        * stored (incompressible): a pread of the bytes themselves (_Stored);
        * compressed: inflated only as far as the read goes (deflate cannot start
          mid-member, but it can stop, and a random page is on average half way in),
          the inflater kept while the chunk is among the last read, so a later read
          further into it goes on from there (_Prefix). Its size is checked once
          complete.

        The member's header is checked against the index for every kind, once."""
        with self._prefix_lock:
            part = self._prefixes.get(number)
            if part is None:
                part = self._start_prefix(self._index.chunks[number])
                self._prefixes[number] = part
                while len(self._prefixes) > self._prefix_chunks:
                    self._prefixes.popitem(last=False)
            else:
                self._prefixes.move_to_end(number)
            try:
                try:
                    data = part.read(lo, lo + length)
                except _Irregular:
                    part = self._inflating(part.chunk)
                    self._prefixes[number] = part
                    data = part.read(lo, lo + length)
            except _Damaged:
                del self._prefixes[number]
                self._damaged(part.chunk)
            if type(part) is _Prefix and not part.complete and part not in self._live:
                if len(self._live) == self._live.maxlen:
                    self._live[0].suspend()
                self._live.append(part)
            return data

    def _start_prefix(self, chunk: Chunk) -> _Zeros | _Stored | _Prefix:
        f = self._file
        if f is None:
            raise exceptions.LayerException(self.name, "layer destroyed")
        body = chunk.gz_size - DATA_HEADER_SIZE - _GZ_TAIL
        zeros = self._zero_digest(chunk.raw_size) == chunk.sha256
        stored = body == _stored_body_size(chunk.raw_size)
        if not (zeros or stored):
            return self._inflating(chunk)
        size = DATA_HEADER_SIZE + _STORED_HEAD.size
        head = os.pread(f.fileno(), size, chunk.gz_offset)
        self._check_head(chunk, head, size)
        if zeros:
            return _Zeros(chunk)
        if _stored_head_ok(head[DATA_HEADER_SIZE:], 0, chunk.raw_size):
            return _Stored(f.fileno(), chunk)
        return self._inflating(chunk)  # compressed to a stored chunk's size

    def _inflating(self, chunk: Chunk) -> _Prefix:
        f = self._file
        if f is None:
            raise exceptions.LayerException(self.name, "layer destroyed")
        return _Prefix(chunk, f.fileno(), self._check_member_head)

    def _check_member_head(self, chunk: Chunk, head: bytes) -> None:
        self._check_head(chunk, head, DATA_HEADER_SIZE)

    def _check_head(self, chunk: Chunk, member: bytes, size: int) -> None:
        """``size`` bytes were there and the member's gzip header says what the index
        says (else: damaged)."""
        head = _MEMBER_HEAD.unpack_from(member) if len(member) >= _MEMBER_HEAD.size else None
        if len(member) != size or head != (
            b"\x1f\x8b\x08\x04",
            16,
            b"MD",
            12,
            chunk.number,
            chunk.gz_size,
            chunk.raw_size,
        ):
            self._damaged(chunk)

    def _zero_digest(self, size: int) -> bytes:
        """SHA-256 of ``size`` zero bytes (the chunk size's and the last chunk's, kept)."""
        digest = self._zero_digests.get(size)
        if digest is None:
            h = hashlib.sha256()
            block = bytes(min(size, 1 << 20))
            for at in range(0, size, len(block)):
                h.update(block[: size - at])
            digest = self._zero_digests[size] = h.digest()
        return digest

    def _damaged(self, chunk: Chunk) -> NoReturn:
        """Raise memdump.chunkedgz's own CorruptChunkError for ``chunk`` (naming it, its
        raw range and why), by reading it whole the checked way."""
        with open(self._path, "rb") as f:
            read_chunk(f, chunk, check=True)
        # Unreachable unless the two readings disagree: still never return bad bytes.
        raise exceptions.LayerException(self.name, f"chunk {chunk.number} cannot be read")

    def _inflate(self, reader: ChunkReader, numbers: range) -> list[Future[bytes]]:
        """Futures of ``numbers``' bytes, and the same count of chunks after them read
        ahead (as far as the cache holds both): a scan reads its windows in order, so the
        next window inflates on the other cores while Volatility scans this one. A
        chunk read ahead but never asked for raises nothing (its error stays in its
        future)."""
        pool = self._threads()
        room = max(0, self._cache_chunks - len(numbers))
        after = range(
            numbers[-1] + 1, min(numbers[-1] + 1 + min(len(numbers), room), len(self._index.chunks))
        )
        with self._lock:
            wanted = [
                self._ahead.pop(n) if n in self._ahead else pool.submit(reader.chunk, n)
                for n in numbers
            ]
            kept = {n: self._ahead[n] for n in after if n in self._ahead}
            for n in after:
                if n not in kept:
                    kept[n] = pool.submit(reader.chunk, n)
            self._ahead = kept
        return wanted

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                n = max(1, min(_MAX_THREADS, os.cpu_count() or 1))
                self._pool = ThreadPoolExecutor(n, thread_name_prefix="memdump-chunklayer")
            return self._pool

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "a chunked .mem.gz is evidence: read only")

    def destroy(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            self._ahead = {}
            self._prefixes = OrderedDict()
            self._live.clear()
            if self._file is not None:
                self._file.close()
                self._file = None
            self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        # Volatility pickles layers for multiprocessing; the file, the threads and the
        # lock are reopened/recreated in the other process.
        state = dict(self.__dict__)
        state.update(_file=None, _reader=None, _pool=None, _lock=None, _ahead={})
        state.update(_prefix_lock=None, _prefixes=OrderedDict(), _live=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._prefix_lock = threading.Lock()
        self._live = deque(maxlen=_LIVE_PREFIXES)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.StringRequirement(name="location", optional=False),
            requirements.BooleanRequirement(
                name="verify",
                description="Check each chunk's CRC32 and SHA-256 when inflating it",
                default=False,
                optional=True,
            ),
        ]


class ChunkedGzipStacker(interfaces.automagic.StackerLayerInterface):  # type: ignore[misc]
    """Puts ChunkedGzipLayer over a FileLayer whose file is a chunked ``.mem.gz``."""

    # Before the file-format stackers (ELF, LiME, ... at 10 and above): they would
    # otherwise stack on the FileLayer, i.e. on Volatility's gzip stream.
    stack_order = 5

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        base = context.layers[layer_name]
        if type(base) is not physical.FileLayer:
            return None
        path = local_path(base.location)
        if path is None or not path.is_file():
            return None
        try:
            index = open_index(path)
        except ChunkedDumpError as exc:
            # Still one valid gzip file: Volatility's own (slow) path can read it.
            log.warning("%s: %s; reading it as a single gzip stream", path, exc)
            return None
        if index is None:
            return None
        # LayerStacker logs the FileLayer's size after stacking; for a .gz FileLayer that
        # means seeking to the end of the gzip stream, i.e. inflating the whole dump.
        # The index knows the answer (the size of what the stream inflates to).
        if getattr(base, "_maximum_address", 0) is None:
            base._maximum_address = index.raw_size - 1
        name = context.layers.free_layer_name("ChunkedGzipLayer")
        context.config[interfaces.configuration.path_join(name, "location")] = base.location
        return ChunkedGzipLayer(context, name, name)
