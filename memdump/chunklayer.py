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

import logging
import os
import struct
import threading
import urllib.parse
import urllib.request
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from isal import isal_zlib
from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import physical

from memdump.chunkedgz import DATA_HEADER_SIZE, Chunk, ChunkReader, Index, read_chunk, read_index
from memdump.errors import ChunkedDumpError

log = logging.getLogger("memdump.chunklayer")

# Inflated chunks kept, in bytes (so in chunks: 48 of 1 MiB, at least 4): a plugin
# walking structures comes back to the same pages, and a scan holds its window and the
# next one, read ahead (see _read).
CACHE_BYTES = 48 << 20
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


class _Damaged(Exception):
    """A partly inflated chunk is not what its index entry says (see _damaged)."""


class _Prefix:
    """A chunk inflated as far as reads have needed, and the inflater to go on."""

    def __init__(self, chunk: Chunk, body: bytes) -> None:
        self.chunk = chunk
        self.data = bytearray()
        self._inflater: Any = isal_zlib.decompressobj(-15)
        self._pending = body

    def extend(self, end: int) -> None:
        try:
            while len(self.data) < end and self._inflater is not None:
                got = self._inflater.decompress(self._pending, end - len(self.data))
                self.data += got
                self._pending = self._inflater.unconsumed_tail
                # Input all taken is not the end: the inflater may hold more output.
                if self._inflater.eof or (not got and not self._pending):
                    self._inflater = None
        except Exception as exc:  # isal_zlib.error (untyped)
            raise _Damaged from exc
        if self._inflater is None and len(self.data) != self.chunk.raw_size:
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
        self._prefixes: OrderedDict[int, _Prefix] = OrderedDict()
        self.inflated: set[int] = set()  # chunk numbers read so far (checked, with verify)
        # Open now, so a missing file or a damaged index fails the layer's construction
        # (and the stacker), as FileLayer does for a missing file.
        self._index = self._open().index

    def _open(self) -> ChunkReader:
        with self._lock:
            if self._reader is None:
                f = open(self._path, "rb")  # noqa: SIM115 (closed by destroy())
                try:
                    index = read_index(f)
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
        if not self.is_valid(offset, length):
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
        reader = self._reader or self._open()
        numbers = self._index.covering(offset, offset + length)
        if len(numbers) == 1 and not self._verify:
            data = self._from_prefix(numbers[0], offset, length)
        elif len(numbers) <= 2:
            data = reader.read(offset, length)
        else:
            # A scan window: inflate its chunks side by side, then cut the range out.
            chunks = [f.result() for f in self._inflate(reader, numbers)]
            first = self._index.chunks[numbers[0]].raw_offset
            data = b"".join(chunks)[offset - first : offset - first + length]
        self.inflated.update(numbers)
        return data

    def _from_prefix(self, number: int, offset: int, length: int) -> bytes:
        """Bytes of one chunk, inflating it only as far as they go: deflate cannot start
        mid-member, but it can stop, and a random page is on average half way in (half
        the inflating). The inflater is kept with what it produced, so a later read
        further into the chunk goes on from there. Without ``verify`` only: the CRC32 and
        SHA-256 need the whole chunk (the size is checked once it is complete)."""
        chunk = self._index.chunks[number]
        lo = offset - chunk.raw_offset
        hi = lo + length
        with self._prefix_lock:
            part = self._prefixes.get(number)
            if part is None:
                part = self._start_prefix(chunk)
                self._prefixes[number] = part
                while len(self._prefixes) > self._cache_chunks:
                    self._prefixes.popitem(last=False)
            else:
                self._prefixes.move_to_end(number)
            try:
                if len(part.data) < hi:
                    part.extend(hi)
            except _Damaged:
                del self._prefixes[number]
                self._damaged(chunk)
            return bytes(part.data[lo:hi])

    def _start_prefix(self, chunk: Chunk) -> _Prefix:
        f = self._file
        if f is None:
            raise exceptions.LayerException(self.name, "layer destroyed")
        member = os.pread(f.fileno(), chunk.gz_size, chunk.gz_offset)
        head = _MEMBER_HEAD.unpack_from(member) if len(member) >= _MEMBER_HEAD.size else None
        if len(member) != chunk.gz_size or head != (
            b"\x1f\x8b\x08\x04",
            16,
            b"MD",
            12,
            chunk.number,
            chunk.gz_size,
            chunk.raw_size,
        ):
            self._damaged(chunk)
        return _Prefix(chunk, member[DATA_HEADER_SIZE:-8])  # header .. CRC32, ISIZE

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
            if self._file is not None:
                self._file.close()
                self._file = None
            self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        # Volatility pickles layers for multiprocessing; the file, the threads and the
        # lock are reopened/recreated in the other process.
        state = dict(self.__dict__)
        state.update(_file=None, _reader=None, _pool=None, _lock=None, _ahead={})
        state.update(_prefix_lock=None, _prefixes=OrderedDict())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._prefix_lock = threading.Lock()

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
