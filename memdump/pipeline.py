"""Byte stream -> SHA-256 of the raw bytes + chunked gzip -> ``<name>.part`` -> fsync -> final name.

The read loop and the hash+compress work overlap: the reader fills a fixed pool of buffers
(no allocation, no page faults per chunk) that go round between it and the digester
thread, so memory stays flat whatever the dump size and a slow disk pushes back on the SSH
stream. The digester hashes the whole image in order and hands each buffer's chunks to
``threads`` compression workers (ISA-L and hashlib release the GIL), then writes their
gzip members in order (memdump.chunkedgz: one member per chunk, then the index and the
trailer). Nothing is left under the final name unless every byte the dump's own headers
declare arrived, the producer reported success and the file is on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memdump.bannerscan import BannerScan
from memdump.chunkedgz import DEFAULT_CHUNK_SIZE, Index, IndexBuilder, Member, data_member
from memdump.elfcore import parse_core
from memdump.errors import (
    CaptureTimeoutError,
    InvalidDumpError,
    MemdumpError,
    ShortDumpError,
    StorageError,
)
from memdump.fsperm import private_dir

ProgressFn = Callable[[int, int | None], None]
_BUFFERS = 8
_BUFFER_SIZE = 4 << 20
_PROGRESS_EVERY = 64 << 20
_MAX_HEAD = 64 << 20  # as memdump.elfcore's bound on ELF headers
_STOP = object()


class DumpSource(Protocol):
    """A producer of dump bytes (a driver wraps its transport stream in one)."""

    def readinto(self, view: memoryview) -> int:
        """Fill the start of ``view`` with the next bytes; 0 at the end."""
        ...

    def close_ok(self) -> None:
        """At the end of the bytes: raise if the producer did not succeed."""
        ...

    def abort(self) -> None:
        """Tear the producer down after an error (stop the remote dump, clean up)."""
        ...


@dataclass(frozen=True)
class PipelineResult:
    path: Path
    raw_bytes: int
    raw_sha256: str
    gz_bytes: int
    gz_sha256: str
    chunks: Index


def elf_size(head: bytes) -> int | None:
    layout = parse_core(head)
    return None if layout is None else layout.file_size


class _Digester(threading.Thread):
    """Hashes filled buffers in order, has their chunks compressed by the workers, writes
    the members in order, then hands the buffers back to the pool. After an error it keeps
    recycling buffers so the reader never blocks; the error is re-raised in the reader's
    thread."""

    def __init__(
        self, raw_sha: Any, sink: _ChunkedFileSink, scan: BannerScan | None = None
    ) -> None:
        super().__init__(name="memdump-digest", daemon=True)
        self.scan = scan
        self._offset = 0
        self.work: queue.Queue[Any] = queue.Queue()
        self.free: queue.Queue[bytearray] = queue.Queue()
        # Whole chunks per buffer, so that chunk boundaries fall on buffer boundaries (the
        # reader fills every buffer but the last).
        size = max(_BUFFER_SIZE, sink.chunk_size)
        for _ in range(_BUFFERS):
            self.free.put(bytearray(size))
        self.raw_sha = raw_sha
        self.sink = sink
        self.error: BaseException | None = None
        # Buffers whose chunks are being compressed. Fewer than _BUFFERS, or the reader
        # (waiting for a free buffer) and this thread (waiting for work) would wait forever.
        self._pending: deque[tuple[bytearray, list[Future[list[Member]]]]] = deque()
        self._max_pending = min(_BUFFERS - 2, sink.threads + 1)

    def run(self) -> None:
        while True:
            item = self.work.get()
            if item is _STOP:
                self._drain(0)
                return
            buf, n = item
            if self.error is None:
                try:
                    view = memoryview(buf)[:n]
                    self._pending.append((buf, self.sink.submit(view)))
                    self.raw_sha.update(view)
                    if self.scan is not None:
                        self.scan.feed(buf, n, self._offset)
                    self._offset += n
                except BaseException as exc:  # re-raised by the reader
                    self.error = exc
                    self.free.put(buf)
            else:
                self.free.put(buf)
            self._drain(self._max_pending)

    def _drain(self, keep: int) -> None:
        """Write finished buffers' members in order; wait while more than ``keep`` pend."""
        while self._pending and (
            len(self._pending) > keep or all(f.done() for f in self._pending[0][1])
        ):
            buf, futures = self._pending.popleft()
            try:
                if self.error is None:
                    for future in futures:
                        self.sink.write_members(future.result())
            except BaseException as exc:  # re-raised by the reader
                self.error = exc
            finally:
                for future in futures:
                    future.cancel()
                # A cancelled or failed future no longer reads the buffer; a running one
                # is waited for, since its worker still reads it.
                for future in futures:
                    if not future.cancelled():
                        with contextlib.suppress(BaseException):
                            future.result()
                self.free.put(buf)

    def finish(self) -> None:
        self.work.put(_STOP)
        self.join()
        if self.error is not None:
            raise self.error


class _ChunkedFileSink:
    """Compresses chunks into gzip members on ``threads`` workers and writes the members,
    then the index and trailer, to ``fd``; hashes and counts what it writes."""

    def __init__(self, fd: int, level: int, chunk_size: int, threads: int) -> None:
        self.fd = fd
        self.level = level
        self.chunk_size = chunk_size
        self.threads = max(1, threads)
        self.index = IndexBuilder(chunk_size)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="memdump-gzip")
        self._submitted = 0
        self.sha = hashlib.sha256()
        self.size = 0

    def submit(self, view: memoryview) -> list[Future[list[Member]]]:
        """The buffer's chunks, in at most ``threads`` jobs of consecutive chunks: one job
        per chunk would cost a hand-off per 64 KiB with small chunks."""
        size = self.chunk_size
        count = -(-len(view) // size)
        per_job = -(-count // min(self.threads, count))
        futures = []
        for first in range(0, count, per_job):
            part = view[first * size : (first + per_job) * size]
            futures.append(
                self._pool.submit(_members, self._submitted + first, part, size, self.level)
            )
        self._submitted += count
        return futures

    def write_members(self, members: list[Member]) -> None:
        for member in members:
            self.index.add(member)
            self.sha.update(member.data)
        # One write per job, not per member: 64 KiB members would cost a syscall each.
        self._out(b"".join(m.data for m in members), hashed=True)

    def finish(self) -> Index:
        tail, index = self.index.finish()
        self._out(tail)
        return index

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _out(self, data: bytes, hashed: bool = False) -> None:
        if not data:
            return
        if not hashed:
            self.sha.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]


def _members(first: int, view: memoryview, size: int, level: int) -> list[Member]:
    return [
        data_member(first + i, view[off : off + size], level)
        for i, off in enumerate(range(0, len(view), size))
    ]


def write_dump(
    source: DumpSource,
    dest_dir: Path,
    filename: str,
    *,
    level: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int = 1,
    scan: BannerScan | None = None,
    expected_size: Callable[[bytes], int | None] = elf_size,
    progress: ProgressFn | None = None,
    deadline: float | None = None,
) -> PipelineResult:
    """Stream ``source`` into ``dest_dir/filename`` (gzip), returning sizes and hashes.

    ``chunk_size`` and ``threads`` (compression workers) shape the chunked .mem.gz
    (memdump.chunkedgz). ``expected_size`` reads the total length from the first bytes
    (ELF headers by default). ``scan`` sees every raw byte in order (kernel banner
    candidates for the post-capture check). ``deadline`` is a ``time.monotonic()``
    value; past it the capture is aborted with CaptureTimeoutError.
    """
    final = dest_dir / filename
    part = dest_dir / (filename + ".part")
    try:
        private_dir(dest_dir)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        source.abort()
        raise _storage_error(exc, part) from exc
    try:
        # Held until the .part is gone (renamed or removed): the start-up clean-up of files
        # left by a killed worker skips any .part whose writer is alive (memdump.leftovers).
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        part.unlink()
        os.close(fd)
        source.abort()
        raise _storage_error(exc, part) from exc

    sink = _ChunkedFileSink(fd, level, chunk_size, threads)
    raw_sha = hashlib.sha256()
    digester = _Digester(raw_sha, sink, scan)
    digester.start()
    committed = False
    watchdog = _Watchdog(source, deadline)
    try:
        done, expected = _pump(source, digester, expected_size, progress, watchdog)
        digester.finish()
        index = sink.finish()
        os.fsync(fd)
        # The producer's end (the hypervisor script's exit and checks) is waited for once
        # the file is whole and on disk: its tail runs beside the last buffers' hashing,
        # compression and the fsync instead of after them. Its verdict still comes
        # before the length's (its error says more than "short") and before the commit.
        source.close_ok()
        total = _checked_length(done, expected)
        if progress is not None:
            progress(done, expected)
        _commit(part, final)
        committed = True
        return PipelineResult(
            final, total, raw_sha.hexdigest(), sink.size, sink.sha.hexdigest(), index
        )
    except BaseException as exc:
        source.abort()
        if digester.is_alive():
            with contextlib.suppress(BaseException):
                digester.finish()
        if isinstance(exc, OSError):
            raise _storage_error(exc, part) from exc
        raise
    finally:
        watchdog.cancel()
        sink.close()
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        os.close(fd)  # after the unlink: the lock covers the .part for its whole life


def _pump(
    source: DumpSource,
    digester: _Digester,
    expected_size: Callable[[bytes], int | None],
    progress: ProgressFn | None,
    watchdog: _Watchdog,
) -> tuple[int, int | None]:
    """Read ``source`` to its end into the digester: the bytes read, and the length the
    headers declare (None: not found)."""
    head = bytearray()
    expected: int | None = None
    done = 0
    next_report = 0
    eof = False
    while not eof:
        buf = digester.free.get()
        view = memoryview(buf)
        n = 0
        try:
            # Fill the whole buffer: fewer, larger hand-offs to the digester.
            while n < len(buf):
                if watchdog.expired():
                    watchdog.check(done + n, expected)
                got = source.readinto(view[n:])
                if not got:
                    eof = True
                    break
                n += got
        except MemdumpError as exc:
            watchdog.check(done + n, expected, exc)
            raise
        finally:
            view.release()
        if eof:
            watchdog.check(done + n, expected)
        if n == 0:
            digester.free.put(buf)
            break
        done += n
        if expected is None:
            # The contiguous prefix, whole buffers: headers with many PT_LOADs run past one
            # buffer. The ELF parser refuses headers past 64 MiB; the bound here holds for
            # any expected_size.
            head += memoryview(buf)[:n]
            expected = expected_size(bytes(head))
            if expected is not None:
                head = bytearray()
            elif len(head) > _MAX_HEAD:
                digester.free.put(buf)
                raise InvalidDumpError(
                    f"no length found in the first {len(head)} bytes of the dump",
                    bytes_done=done,
                )
        if expected is not None and done > expected:
            digester.free.put(buf)
            raise ShortDumpError(
                f"dump is longer than its headers declare ({done} > {expected} bytes)",
                bytes_done=done,
                bytes_expected=expected,
            )
        if digester.error is not None:
            raise digester.error
        digester.work.put((buf, n))
        if progress is not None and done >= next_report:
            progress(done, expected)
            next_report = done + _PROGRESS_EVERY
    return done, expected


def _checked_length(done: int, expected: int | None) -> int:
    if expected is None or done != expected:
        raise ShortDumpError(
            f"dump ended after {done} bytes, its headers declare {expected}",
            bytes_done=done,
            bytes_expected=expected,
        )
    return done


class _Watchdog:
    """Enforces the deadline even while a read blocks: at the deadline it aborts the
    source (closing the channel stops the remote dump), which unblocks the read."""

    def __init__(self, source: DumpSource, deadline: float | None) -> None:
        self._fired = threading.Event()
        self._timer: threading.Timer | None = None
        if deadline is not None:
            self._timer = threading.Timer(
                max(0.0, deadline - time.monotonic()), self._fire, args=(source,)
            )
            self._timer.daemon = True
            self._timer.start()

    def _fire(self, source: DumpSource) -> None:
        self._fired.set()
        source.abort()

    def expired(self) -> bool:
        return self._fired.is_set()

    def check(self, done: int, expected: int | None, cause: BaseException | None = None) -> None:
        if self._fired.is_set():
            raise CaptureTimeoutError(
                "capture exceeded its deadline and was stopped",
                bytes_done=done,
                bytes_expected=expected,
            ) from cause

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _commit(part: Path, final: Path) -> None:
    """Give the .part its final name without ever replacing an existing dump."""
    try:
        os.link(part, final)
    except FileExistsError as exc:
        raise StorageError(
            f"{final} already exists; not overwriting evidence", path=str(final)
        ) from exc
    part.unlink()
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _storage_error(exc: OSError, path: Path) -> MemdumpError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left writing {path}", path=str(path), errno=exc.errno)
    return StorageError(
        f"cannot write {path}: {exc.strerror or exc}", path=str(path), errno=exc.errno
    )
