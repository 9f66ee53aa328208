"""Post-capture check: does a ``.mem.gz`` open as an analysis-ready image in Volatility 3?

A capture is verified byte for byte on the way in (SHA-256, length from the ELF
headers); this asks the other question an analyst cares about: will the forensic tool
read it? Volatility's own stacking machinery must recognise the image (it must stack its
ELF layer), and sampled guest-physical pages read through that layer are compared with
the bytes memdump's own ELF parser (memdump.elfcore) locates in the image. Two
independent readings of the same headers that agree are the evidence.

A chunked ``.mem.gz`` (memdump.chunkedgz) is read in place: Volatility's ELF layer
stacks on memdump's chunked layer (memdump.chunklayer), memdump's side reads through its
own ChunkReader, and every chunk is checked against the index (CRC32, SHA-256) as it is
inflated; those neither side touched are checked on a few threads at the end, so a
damaged member fails the check as a damaged gzip stream does. An older single-stream
dump is decompressed to a private, sparse temporary file first (Volatility needs random
access, and its own gzip path would inflate from the start for every backward seek).

Volatility is used as a library, which brings process-wide state (module constants, a
urllib opener, loggers): memdump.volatility holds everything memdump uses of it and sets
that up once. Nothing here may touch the network or write outside the temporary
directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

from isal import igzip, igzip_threaded, isal_zlib

from memdump import volatility
from memdump.bannerscan import BannerScan
from memdump.chunkedgz import ChunkReader, Index, hinted, index_hint, read_chunk, read_index
from memdump.elfcore import PT_LOAD, CoreLayout, parse_core
from memdump.errors import ChunkedDumpError, CorruptChunkError, InvalidDumpError

log = logging.getLogger("memdump.analysis")

PAGE = 4096
_MIB = 1 << 20
_READ = 4 * _MIB
_ZERO_BLOCK = bytes(_MIB)
_MAX_HEAD = (64 << 20) + _READ  # memdump.elfcore refuses headers beyond 64 MiB anyway
# Temporary copies live in <work_dir>/.memdump-analysis-XXXX/, locked (flock, exclusive)
# while in use: a cleaner can tell one a killed worker left from one still being read.
TEMP_PREFIX = ".memdump-analysis-"
_CORE_NAME = "core.elf"  # no .gz suffix: Volatility would wrap a *.gz location in gzip again

_PN_XNUM = 0xFFFF
# igzip raises EOFError for a stream cut short, BadGzipFile for a CRC/length mismatch or
# a file that is not gzip at all, IsalError for corrupt deflate data (its stub declares
# it as an instance, hence the cast).
_GZIP_ERRORS = (EOFError, igzip.BadGzipFile, cast("type[Exception]", isal_zlib.error))

Status = Literal["passed", "failed", "error"]


@dataclass(frozen=True)
class Analysis:
    status: Status  # "error": the check itself could not run
    layer: str | None
    physical_bytes: int
    pages_checked: int
    banners: list[str]
    detail: str
    seconds: float
    volatility_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Failed(Exception):
    """The dump is not an analysis-ready image; the message says why."""


class _CheckError(Exception):
    """The check could not run (environment, not the dump)."""


@dataclass
class _Progress:
    """What is known so far, so a failure late in the check still reports it."""

    layer: str | None = None
    physical_bytes: int = 0
    pages_checked: int = 0
    banners: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    summary: str = ""

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[phase] = time.monotonic() - t


def analyze(
    dump: Path,
    *,
    samples: int = 32,
    banners: bool = True,
    work_dir: Path | None = None,
    expect: Mapping[int, bytes] | None = None,
    stream_scan: BannerScan | None = None,
    hashed_as_written: bool = False,
) -> Analysis:
    """Check that ``dump`` (a ``.mem.gz``) is an image Volatility 3 can analyse.

    Never raises for a bad dump: "failed" says what is wrong with it, "error" that the
    check could not run (missing file, no room for the temporary copy, ...).
    ``work_dir``: where a single-stream dump's temporary copy goes (default: beside the
    dump); a chunked dump is read in place and nothing is written.

    For a chunked dump the capture pipeline just wrote, the check reads no more than it
    needs. ``stream_scan``: the pipeline's scan of the bytes as they passed
    (memdump.bannerscan); the banners are its candidates confirmed through the layer (the
    whole-layer scan only when the stream scan gave up). ``hashed_as_written``: the
    pipeline hashed each chunk from the stream as it wrote it (the index holds those
    hashes), so the chunks the check did not read are not read back (``verify`` reads the
    whole file later).
    """
    if samples < 0:
        raise ValueError("samples must be >= 0")
    started = time.monotonic()
    progress = _Progress()
    status: Status = "passed"
    try:
        vol = volatility.load()
    except Exception as exc:  # an unusable volatility3 install is not the dump's fault
        return _result("error", f"volatility3 unavailable: {exc}", progress, started, "")
    version = str(vol.constants.PACKAGE_VERSION)
    try:
        with volatility.offline(vol):
            detail = _check(
                vol,
                dump,
                samples,
                banners,
                work_dir,
                expect or {},
                progress,
                stream_scan,
                hashed_as_written,
            )
    except _Failed as exc:
        status, detail = "failed", str(exc)
    except (_CheckError, OSError) as exc:
        # OSError here is ours (temp dir, disk full, unreadable dump): gzip and ELF
        # errors were turned into _Failed where they occur.
        status, detail = "error", str(exc) or type(exc).__name__
    except Exception as exc:
        log.exception("analysis of %s crashed", dump)
        status, detail = "error", f"analysis crashed: {type(exc).__name__}: {exc}"
    return _result(status, detail, progress, started, version)


def _result(
    status: Status, detail: str, progress: _Progress, started: float, version: str
) -> Analysis:
    return Analysis(
        status=status,
        layer=progress.layer,
        physical_bytes=progress.physical_bytes,
        pages_checked=progress.pages_checked,
        banners=list(progress.banners),
        detail=detail,
        seconds=round(time.monotonic() - started, 3),
        volatility_version=version,
    )


def _check(
    vol: SimpleNamespace,
    dump: Path,
    samples: int,
    banners: bool,
    work_dir: Path | None,
    expect: Mapping[int, bytes],
    progress: _Progress,
    stream_scan: BannerScan | None = None,
    hashed_as_written: bool = False,
) -> str:
    if not dump.is_file():
        raise _CheckError(f"dump not found: {dump}")
    with open(dump, "rb") as f:
        try:
            # like: the writer's index when the capture hands it over (index_hint): the
            # runs the file shares with it are not hashed again; its root is checked.
            index = read_index(f, like=hinted(dump))
        except ChunkedDumpError as exc:
            raise _Failed(f"not a valid chunked gzip file: {exc}") from exc
    if index is not None:
        return _check_chunked(
            vol, dump, index, samples, banners, expect, progress, stream_scan, hashed_as_written
        )
    # Absolute: Volatility opens it through a file:// URI.
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=work_dir or dump.parent)).absolute()
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(lock, fcntl.LOCK_EX)
    ctx: Any = None
    try:
        core = tmp / _CORE_NAME
        with progress.timed("decompress"):
            layout = _decompress(dump, core)
        ctx = vol.contexts.Context()
        with progress.timed("stack"):
            elf_name = _stack(vol, ctx, core, layout, progress)
        with open(core, "rb", buffering=0) as copy:

            def ours(offset: int, length: int) -> bytes:
                return os.pread(copy.fileno(), length, offset)

            return _examine(
                vol, ctx, dump, elf_name, ours, layout, samples, banners, expect, progress
            )
    finally:
        if ctx is not None:
            volatility.destroy_layers(ctx)
        try:
            shutil.rmtree(tmp)
        except OSError as exc:
            log.warning("could not remove analysis temp dir %s: %s", tmp, exc)
        finally:
            os.close(lock)


def _examine(
    vol: SimpleNamespace,
    ctx: Any,
    dump: Path,
    elf_name: str,
    ours: Callable[[int, int], bytes],
    layout: CoreLayout,
    samples: int,
    banners: bool,
    expect: Mapping[int, bytes],
    progress: _Progress,
    after: Callable[[], None] | None = None,
    candidates: tuple[list[int], list[int]] | None = None,
) -> str:
    """The checks through the stacked ELF layer; ``ours`` reads the image at a file offset
    memdump's way; ``after`` runs once Volatility is done with it (the chunked path checks
    the chunks nobody read)."""
    elf = ctx.layers[elf_name]
    failures: list[str] = []
    with progress.timed("pages"):
        failures += _cross_check(vol, elf, ours, layout, samples, expect, progress)
    banner_error: Exception | None = None
    if banners:
        # Even when the pages disagree, the banners tell a human what the image is.
        with progress.timed("banners"):
            try:
                if candidates is not None:
                    unix, windows = candidates
                    progress.banners = volatility.banners_at(vol, ctx, elf_name, unix, windows)
                else:
                    progress.banners = volatility.banners(vol, ctx, elf_name)
            except ChunkedDumpError:
                raise  # the dump is damaged: the plugin is not to blame
            except Exception as exc:  # a plugin bug must not hide a failed check
                banner_error = exc
    if after is not None:
        after()
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        raise _Failed(failures[0] + more)
    if banner_error is not None:
        log.error("banners plugin crashed on %s", dump, exc_info=banner_error)
        raise _CheckError(f"banners plugin crashed: {type(banner_error).__name__}: {banner_error}")
    times = ", ".join(f"{k} {v:.2f}s" for k, v in progress.timings.items())
    return (
        f"{progress.summary}; {progress.physical_bytes} bytes of guest memory; "
        f"{progress.pages_checked} sampled pages and {len(expect)} expected values "
        f"match memdump's reading; {len(progress.banners)} banner(s)"
        f"{' (confirmed from the stream scan)' if candidates is not None else ''} ({times})"
    )


# -- a chunked .mem.gz, in place ---------------------------------------------------------


def _check_chunked(
    vol: SimpleNamespace,
    dump: Path,
    index: Index,
    samples: int,
    banners: bool,
    expect: Mapping[int, bytes],
    progress: _Progress,
    stream_scan: BannerScan | None = None,
    hashed_as_written: bool = False,
) -> str:
    ctx = vol.contexts.Context()
    layout: CoreLayout | None = None
    try:
        with open(dump, "rb") as f:
            # memdump's reading of the headers, every chunk checked: before Volatility.
            mine = ChunkReader(f, index, cache_chunks=1, check=True)
            with progress.timed("index"):
                layout = _layout_of(mine, index)
            # The layer reads the index again: the runs of chunks it shares with this one
            # (all, unless the file changed meanwhile) are not hashed again.
            with progress.timed("stack"), index_hint(dump, index):
                elf_name, base = _stack_chunked(vol, ctx, dump.absolute(), layout, progress)
            layer = ctx.layers[base]

            def rest() -> None:
                with progress.timed("chunks"):
                    _check_chunks(f, index, layer.inflated)

            candidates = None
            if stream_scan is not None and not stream_scan.overflow:
                candidates = (
                    _physical(layout, stream_scan.unix),
                    _physical(layout, stream_scan.windows),
                )

            # memdump's side reads the raw image at the offsets its ELF parser gives,
            # through the chunked layer itself (one inflation per chunk, shared): the
            # cross-check is of Volatility's ELF reading against memdump's.
            return _examine(
                vol,
                ctx,
                dump,
                elf_name,
                layer.read,
                layout,
                samples,
                banners,
                expect,
                progress,
                None if hashed_as_written else rest,
                candidates,
            )
    except CorruptChunkError as exc:
        start = int(exc.fields["raw_offset"])
        where = _guest_ranges(layout, start, start + int(exc.fields["raw_size"]))
        raise _Failed(f"not a valid chunked gzip file: {exc}{where}") from exc
    except ChunkedDumpError as exc:
        raise _Failed(f"not a valid chunked gzip file: {exc}") from exc
    finally:
        volatility.destroy_layers(ctx)


def _physical(layout: CoreLayout, offsets: list[int]) -> list[int]:
    """Raw image offsets as guest-physical addresses through the PT_LOADs (offsets in no
    PT_LOAD, the headers and notes, are no guest memory: the plugin's scan never sees
    them either)."""
    out = []
    for offset in offsets:
        for seg in layout.segments:
            if seg.type == PT_LOAD and seg.offset <= offset < seg.offset + seg.filesz:
                out.append(seg.paddr + offset - seg.offset)
                break
    return out


def _layout_of(reader: ChunkReader, index: Index) -> CoreLayout:
    """memdump's reading of the ELF headers at the start of the image, and the image's
    size against theirs."""
    want = 64 << 10  # QEMU's headers and notes take a few KiB: usually one chunk
    while True:
        head = reader.read(0, min(want, index.raw_size, _MAX_HEAD))
        layout = _parse_head(head)
        if layout is not None:
            break
        if len(head) >= index.raw_size:
            layout = _parse_last(head)
            break
        want *= 4
    if index.raw_size != layout.file_size:
        what = "cut short" if index.raw_size < layout.file_size else "followed by extra data"
        raise _Failed(
            f"core is {what}: {index.raw_size} bytes in the chunked image, its ELF headers "
            f"declare {layout.file_size}"
        )
    return layout


def _check_chunks(f: Any, index: Index, done: set[int]) -> None:
    """Check the chunks Volatility did not inflate (verified) against the index, on a few
    threads (ISA-L and hashlib release the GIL); the first bad one by number raises."""
    todo = [c for c in index.chunks if c.number not in done]
    if not todo:
        return
    threads = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="memdump-analysis") as pool:
        # map yields in order and re-raises the first failure by position.
        for _ in pool.map(lambda c: len(read_chunk(f, c, check=True)), todo):
            pass


def _guest_ranges(layout: CoreLayout | None, start: int, end: int) -> str:
    """The guest-physical ranges file bytes [start, end) hold, for a message."""
    if layout is None:
        return ""
    parts = []
    for s in layout.segments:
        lo, hi = max(start, s.offset), min(end, s.offset + s.filesz)
        if s.type == PT_LOAD and lo < hi:
            a = s.paddr + lo - s.offset
            parts.append(f"0x{a:x}-0x{a + hi - lo:x}")
    return f"; guest-physical {', '.join(parts)}" if parts else "; outside guest memory"


# -- decompression ---------------------------------------------------------------------


def _decompress(dump: Path, core: Path) -> CoreLayout:
    """Gunzip ``dump`` into ``core`` (0600, sparse) and return memdump's reading of it."""
    buf = bytearray(_READ)
    view = memoryview(buf)
    head = bytearray()
    layout: CoreLayout | None = None
    pos = 0
    fd = os.open(core, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # The threaded reader inflates in a worker thread (ISA-L releases the GIL), so
        # reading, inflating and writing overlap: ~3x faster than igzip.open here.
        opened = igzip_threaded.open(  # type: ignore[no-untyped-call]
            dump, "rb", threads=1, block_size=_READ
        )
        with opened as src:
            while True:
                n = _fill(src, view)
                if not n:
                    break
                if layout is None:
                    head += view[: min(n, _MAX_HEAD - len(head))]
                    layout = _parse_head(head)
                    if layout is not None:
                        _check_room(core.parent, layout.file_size)
                        head = bytearray()
                # Whole zero MiBs are left as holes: free guest RAM is mostly zeros, and
                # a slice compare is memcmp (a memoryview compare is ~25x slower).
                for i in range(0, n, _MIB):
                    j = min(n, i + _MIB)
                    if j - i < _MIB or buf[i:j] != _ZERO_BLOCK:
                        os.pwrite(fd, view[i:j], pos + i)
                pos += n
                if n < _READ:
                    break
        os.ftruncate(fd, pos)  # trailing holes still count
    finally:
        os.close(fd)
    if layout is None:
        layout = _parse_last(head)
    if pos != layout.file_size:
        what = "cut short" if pos < layout.file_size else "followed by extra data"
        raise _Failed(
            f"core is {what}: {pos} bytes decompressed, its ELF headers declare {layout.file_size}"
        )
    return layout


def _fill(src: Any, view: memoryview) -> int:
    """Read until ``view`` is full or the stream ends, so holes stay MiB-aligned."""
    n = 0
    try:
        while n < len(view):
            got = src.readinto(view[n:])
            if not got:
                break
            n += got
    except _GZIP_ERRORS as exc:
        raise _Failed(f"not a valid gzip stream: {exc}") from exc
    return n


def _parse_head(head: bytes | bytearray) -> CoreLayout | None:
    """memdump's reading of the headers; None: not enough bytes yet."""
    try:
        layout = parse_core(bytes(head))
    except InvalidDumpError as exc:
        raise _Failed(f"not an ELF core: {exc}") from exc
    if layout is None and len(head) >= _MAX_HEAD:
        raise _Failed("not an ELF core: no complete ELF headers in its first 64 MiB")
    return layout


def _parse_last(head: bytes | bytearray) -> CoreLayout:
    """The stream has ended: the headers must be complete now."""
    layout = _parse_head(head)
    if layout is None:
        raise _Failed(f"not an ELF core: {len(head)} bytes, too short for its ELF headers")
    return layout


def _check_room(directory: Path, size: int) -> None:
    # Holes make the copy smaller than this, but running the dump directory full would
    # fail captures writing next to it; refuse up front instead.
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise _CheckError(
            f"not enough space for the decompressed copy in {directory}: "
            f"{size} bytes needed, {free} free (pass work_dir)"
        )


def _stack(
    vol: SimpleNamespace, ctx: Any, core: Path, layout: CoreLayout, progress: _Progress
) -> str:
    """Let Volatility recognise the file in ``ctx``; returns the ELF layer's name."""
    return _elf_of(vol, ctx, volatility.stack_file(vol, ctx, core), layout, progress)


def _stack_chunked(
    vol: SimpleNamespace, ctx: Any, dump: Path, layout: CoreLayout, progress: _Progress
) -> tuple[str, str]:
    """The same over memdump's chunked layer (checking every chunk it inflates): the
    names of the ELF layer and of the chunked layer under it."""
    try:
        names = volatility.stack_chunked(vol, ctx, dump, verify=True)
    except vol.exceptions.LayerException as exc:  # the index was read once already
        raise _Failed(f"Volatility 3 cannot open the chunked image: {exc}") from exc
    return _elf_of(vol, ctx, names, layout, progress), names[-1]


def _elf_of(
    vol: SimpleNamespace, ctx: Any, names: list[str], layout: CoreLayout, progress: _Progress
) -> str:
    progress.summary = " over ".join(type(ctx.layers[n]).__name__ for n in names)
    if len(names) < 2:
        why = volatility.why_not_elf(vol, ctx, names[-1])
        if len(layout.segments) >= _PN_XNUM:
            why += "; it has more than 65534 program headers (PN_XNUM), Volatility 3 reads e_phnum"
        raise _Failed(f"Volatility 3 recognises no memory image format in this file{why}")
    first = ctx.layers[names[-2]]  # stack_layer lists top first, the file last
    progress.layer = type(first).__name__
    if type(first) is not vol.elf.Elf64Layer:
        raise _Failed(f"Volatility 3 reads this file as {progress.layer}, not as an ELF core")
    return names[-2]


def _cross_check(
    vol: SimpleNamespace,
    elf: Any,
    ours: Callable[[int, int], bytes],
    layout: CoreLayout,
    samples: int,
    expect: Mapping[int, bytes],
    progress: _Progress,
) -> list[str]:
    failures: list[str] = []
    lo, hi = elf.minimum_address, elf.maximum_address
    progress.physical_bytes = sum(
        length for _, length, _, _, _ in elf.mapping(lo, hi - lo + 1, ignore_errors=True)
    )
    if progress.physical_bytes != layout.memory_bytes:
        # e.g. Volatility skips PT_LOADs whose file size differs from their memory size
        failures.append(
            f"Volatility 3 maps {progress.physical_bytes} bytes of guest memory, "
            f"the ELF headers declare {layout.memory_bytes}"
        )
    for paddr, length in _sample_pages(layout, samples):
        progress.pages_checked += 1
        # Sampled from the PT_LOADs themselves, so memdump always has an offset.
        offset = cast(int, layout.offset_of(paddr))
        mine = ours(offset, length)
        try:
            theirs = elf.read(paddr, length)
        except vol.exceptions.InvalidAddressException as exc:
            failures.append(f"Volatility 3 cannot read guest-physical 0x{paddr:x}: {exc}")
            continue
        if theirs != mine:
            failures.append(
                f"guest-physical page 0x{paddr:x}: Volatility 3 reads different bytes "
                f"than the core holds at file offset 0x{offset:x}"
            )
    for paddr, want in sorted(expect.items()):
        try:
            got = elf.read(paddr, len(want))
        except vol.exceptions.InvalidAddressException:
            failures.append(f"expected bytes at guest-physical 0x{paddr:x}: not in the image")
            continue
        if got != want:
            failures.append(
                f"expected bytes at guest-physical 0x{paddr:x}: wanted {want[:32]!r}, "
                f"Volatility 3 reads {got[:32]!r}"
            )
    return failures


def _sample_pages(layout: CoreLayout, samples: int) -> list[tuple[int, int]]:
    """(guest-physical address, length) of up to ``samples`` pages, in address order.

    The first and last page of every PT_LOAD (where off-by-one and ordering bugs show),
    then pages evenly spaced over all of guest memory. Deterministic, so two checks of
    one dump compare the same pages.
    """
    loads = [s for s in layout.segments if s.type == PT_LOAD and s.filesz > 0]
    if samples == 0 or not loads:
        return []
    # Number the pages of guest memory 0..total-1, block after block:
    # (first index, page count, page-aligned base, segment).
    spans = []
    total = 0
    for s in loads:
        base = s.paddr - s.paddr % PAGE
        count = -(-(s.paddr + s.filesz - base) // PAGE)
        spans.append((total, count, base, s))
        total += count

    def page(index: int) -> tuple[int, int]:
        for first, count, base, s in spans:
            if index < first + count:
                start = max(s.paddr, base + (index - first) * PAGE)
                return start, min(PAGE, s.paddr + s.filesz - start)
        raise IndexError(index)

    edges = sorted({i for first, count, _, _ in spans for i in (first, first + count - 1)})
    if samples <= len(edges):
        chosen = [edges[k * len(edges) // samples] for k in range(samples)]
    else:
        chosen = list(edges)
        others = total - len(edges)
        extra = min(samples - len(edges), others)
        for k in range(extra):
            # The midpoints of `extra` equal slices of the other pages: distinct, since
            # each slice is at least a page.
            index = (2 * k + 1) * others // (2 * extra)
            for e in edges:  # from rank among the others to page index
                if e > index:
                    break
                index += 1
            chosen.append(index)
    return sorted({page(i) for i in chosen})
