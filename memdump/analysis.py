"""Post-capture check: does a ``.mem.gz`` open as an analysis-ready image in Volatility 3?

A capture is verified byte for byte on the way in (SHA-256, length from the ELF
headers); this asks the other question an analyst cares about: will the forensic tool
read it? The dump is decompressed to a private, sparse temporary file (Volatility needs
random access), Volatility's own stacking machinery recognises it (it must stack its ELF
layer), and sampled guest-physical pages read through that layer are compared with the
bytes memdump's own ELF parser (memdump.elfcore) locates in the file. Two independent
readings of the same headers that agree are the evidence.

Volatility is used as a library, which brings process-wide state (module constants, a
urllib opener, loggers); ``_volatility()`` sets that up once. Nothing here may touch the
network or write outside the temporary directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

from isal import igzip, igzip_threaded, isal_zlib

from memdump.elfcore import PT_LOAD, CoreLayout, parse_core
from memdump.errors import InvalidDumpError

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

# Volatility's banners plugin (framework/plugins/banners.py) looks for this pattern; see
# _FastBanners for why we scan for its literal prefixes first.
_BANNER_PATTERN = rb"(Linux version|Darwin Kernel Version) [0-9]+\.[0-9]+\.[0-9]+"
_BANNER_PREFIXES = (b"Linux version ", b"Darwin Kernel Version ")
_BANNER_CHARS = frozenset(
    b" #()+,;/-.0123456789:@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
)
_MAX_BANNERS = 32
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
) -> Analysis:
    """Check that ``dump`` (a ``.mem.gz``) is an image Volatility 3 can analyse.

    Never raises for a bad dump: "failed" says what is wrong with it, "error" that the
    check could not run (missing file, no room for the temporary copy, ...).
    """
    if samples < 0:
        raise ValueError("samples must be >= 0")
    started = time.monotonic()
    progress = _Progress()
    status: Status = "passed"
    try:
        vol = _volatility()
    except Exception as exc:  # an unusable volatility3 install is not the dump's fault
        return _result("error", f"volatility3 unavailable: {exc}", progress, started, "")
    version = str(vol.constants.PACKAGE_VERSION)
    try:
        with _offline(vol):
            detail = _check(vol, dump, samples, banners, work_dir, expect or {}, progress)
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
) -> str:
    if not dump.is_file():
        raise _CheckError(f"dump not found: {dump}")
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
        elf = ctx.layers[elf_name]
        failures: list[str] = []
        with progress.timed("pages"):
            failures += _cross_check(vol, elf, core, layout, samples, expect, progress)
        banner_error: Exception | None = None
        if banners:
            # Even when the pages disagree, the banners tell a human what the image is.
            with progress.timed("banners"):
                try:
                    progress.banners = _banners(vol, ctx, elf_name)
                except Exception as exc:  # a plugin bug must not hide a failed check
                    banner_error = exc
        if failures:
            more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
            raise _Failed(failures[0] + more)
        if banner_error is not None:
            log.error("banners plugin crashed on %s", dump, exc_info=banner_error)
            raise _CheckError(
                f"banners plugin crashed: {type(banner_error).__name__}: {banner_error}"
            )
        times = ", ".join(f"{k} {v:.2f}s" for k, v in progress.timings.items())
        return (
            f"{progress.summary}; {progress.physical_bytes} bytes of guest memory; "
            f"{progress.pages_checked} sampled pages and {len(expect)} expected values "
            f"match memdump's reading; {len(progress.banners)} banner(s) ({times})"
        )
    finally:
        if ctx is not None:
            for name in list(ctx.layers):
                with contextlib.suppress(Exception):
                    ctx.layers[name].destroy()  # closes the FileLayer's handle
        try:
            shutil.rmtree(tmp)
        except OSError as exc:
            log.warning("could not remove analysis temp dir %s: %s", tmp, exc)
        finally:
            os.close(lock)


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


# -- volatility ------------------------------------------------------------------------

_VOL_LOCK = threading.Lock()
_VOL: SimpleNamespace | None = None
_OFFLINE_USERS = 0
_OFFLINE_SAVED = False


def _volatility() -> SimpleNamespace:
    """Import and configure volatility3 once per process.

    Imported lazily: most memdump processes never analyse, and importing
    volatility3.framework.constants creates ``~/.cache/volatility3`` (its CACHE_PATH,
    computed and created at import; an empty directory, see below for its contents).
    """
    global _VOL
    with _VOL_LOCK:
        if _VOL is not None:
            return _VOL
        vol_log = logging.getLogger("volatility3")
        if vol_log.level == logging.NOTSET:
            # Its debug chatter (imports, stacking attempts, schema validation) is noise
            # to us; warnings still get through. An application's own setting wins.
            vol_log.setLevel(logging.WARNING)
        import volatility3.framework.layers
        import volatility3.schemas
        from volatility3 import framework
        from volatility3.framework import constants, contexts, exceptions, interfaces
        from volatility3.framework.automagic import stacker
        from volatility3.framework.layers import elf, physical, scanners
        from volatility3.framework.plugins import construct_plugin
        from volatility3.framework.renderers import format_hints
        from volatility3.plugins import banners

        framework.require_interface_version(2, 0, 0)
        # Stackers register themselves on import; LayerStacker.__call__ would do this.
        framework.import_files(volatility3.framework.layers, True)

        # Volatility records validated symbol files in CACHE_PATH (in the user's home) on
        # first use; keep its in-memory cache but write the file to nowhere. Nothing else
        # we call writes to CACHE_PATH (downloads are off, see _offline; no symbol
        # automagic runs).
        volatility3.schemas.cached_validation_filepath = os.devnull
        # jsonschema warns (DeprecationWarning) about the $schema of Volatility's own
        # symbol files on every first validation; nothing for us or the user to act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="volatility3")

        _VOL = SimpleNamespace(
            constants=constants,
            contexts=contexts,
            exceptions=exceptions,
            interfaces=interfaces,
            framework_subclasses=framework.class_subclasses,
            stacker=stacker,
            physical=physical,
            elf=elf,
            construct_plugin=construct_plugin,
            banners_plugin=_fast_banners_class(
                banners.Banners, scanners.RegExScanner, format_hints.Hex
            ),
            stock_banners_plugin=banners.Banners,
        )
        return _VOL


@contextlib.contextmanager
def _offline(vol: SimpleNamespace) -> Iterator[None]:
    """Volatility's OFFLINE switch, on while any analysis runs.

    Nothing we call should fetch anything (symbol downloads only happen in automagic we
    do not run), this makes sure. It is not left on: Volatility installs its urllib
    opener process-wide and that opener refuses http(s) for everyone while OFFLINE is
    set (the test harness and the stack supervisor use urllib).
    """
    global _OFFLINE_USERS, _OFFLINE_SAVED
    with _VOL_LOCK:
        if _OFFLINE_USERS == 0:
            _OFFLINE_SAVED = vol.constants.OFFLINE
            vol.constants.OFFLINE = True
        _OFFLINE_USERS += 1
    try:
        yield
    finally:
        with _VOL_LOCK:
            _OFFLINE_USERS -= 1
            if _OFFLINE_USERS == 0:
                vol.constants.OFFLINE = _OFFLINE_SAVED


def _stack(
    vol: SimpleNamespace, ctx: Any, core: Path, layout: CoreLayout, progress: _Progress
) -> str:
    """Let Volatility recognise the file in ``ctx``; returns the ELF layer's name."""
    base = "memdump_file"
    ctx.config[vol.interfaces.configuration.path_join(base, "location")] = core.as_uri()
    ctx.add_layer(vol.physical.FileLayer(ctx, base, base))
    # File-format stackers only (ELF, LiME, QEMU, crash dump, ...): the OS stackers
    # (LinuxIntelStacker & co.) hunt for page tables and need kernel symbols, which is
    # analysis proper, not "does the image open".
    stackers = sorted(
        (
            s
            for s in vol.framework_subclasses(vol.interfaces.automagic.StackerLayerInterface)
            if s.__module__.startswith("volatility3.framework.layers.")
        ),
        key=lambda s: s.stack_order,
    )
    names: list[str] = vol.stacker.LayerStacker.stack_layer(ctx, base, stackers)
    progress.summary = " over ".join(type(ctx.layers[n]).__name__ for n in names)
    if len(names) < 2:
        why = _why_not_elf(vol, ctx, base)
        if len(layout.segments) >= _PN_XNUM:
            why += "; it has more than 65534 program headers (PN_XNUM), Volatility 3 reads e_phnum"
        raise _Failed(f"Volatility 3 recognises no memory image format in this file{why}")
    first = ctx.layers[names[-2]]  # stack_layer lists top first, the file last
    progress.layer = type(first).__name__
    if type(first) is not vol.elf.Elf64Layer:
        raise _Failed(f"Volatility 3 reads this file as {progress.layer}, not as an ELF core")
    return names[-2]


def _why_not_elf(vol: SimpleNamespace, ctx: Any, base: str) -> str:
    """The ELF layer's own complaint, which stack_layer only logs (at level 7)."""
    name = "memdump_elf_probe"
    ctx.config[vol.interfaces.configuration.path_join(name, "base_layer")] = base
    try:
        vol.elf.Elf64Layer(ctx, name, name)
    except Exception as exc:
        return f" (Elf64Layer: {exc})"
    return ""


def _cross_check(
    vol: SimpleNamespace,
    elf: Any,
    core: Path,
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
    with open(core, "rb", buffering=0) as f:
        for paddr, length in _sample_pages(layout, samples):
            progress.pages_checked += 1
            # Sampled from the PT_LOADs themselves, so memdump always has an offset.
            offset = cast(int, layout.offset_of(paddr))
            ours = os.pread(f.fileno(), length, offset)
            try:
                theirs = elf.read(paddr, length)
            except vol.exceptions.InvalidAddressException as exc:
                failures.append(f"Volatility 3 cannot read guest-physical 0x{paddr:x}: {exc}")
                continue
            if theirs != ours:
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


# -- banners ---------------------------------------------------------------------------


def _banners(vol: SimpleNamespace, ctx: Any, layer_name: str, stock: bool = False) -> list[str]:
    """Run the banners plugin on ``layer_name``; distinct banners in the order found."""
    plugin_cls = vol.stock_banners_plugin if stock else vol.banners_plugin
    base = "memdump_plugins"
    ctx.config[vol.interfaces.configuration.path_join(base, plugin_cls.__name__, "primary")] = (
        layer_name
    )
    plugin = vol.construct_plugin(ctx, [], plugin_cls, base, None, None)

    def visit(node: Any, found: list[str]) -> list[str]:
        text = str(node.values[1]).strip()
        if text and text not in found and len(found) < _MAX_BANNERS:
            found.append(text)
        return found

    found: list[str] = []
    plugin.run().populate(visit, found)
    return found


def _fast_banners_class(banners_cls: Any, regex_scanner: Any, hex_hint: Any) -> Any:
    """Volatility's Banners plugin with a faster scan for the Linux/macOS part.

    The stock plugin scans with a regex that starts with an alternation, which Python's
    re engine cannot search for quickly: ~250 MiB/s whatever the data (4 s per GiB,
    four times as long as decompressing). Every match starts with one of two literals,
    which bytes.find locates at >2 GiB/s; the regex then only runs where one occurs.
    Same matches, same filtering afterwards (tests compare with the stock plugin), one
    deliberate difference: the banner is read padded, where the stock plugin raises for
    a banner within 4 KiB of the end of a RAM block. The Windows part is the stock one.
    """

    class _PrefixRegExScanner(regex_scanner):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(_BANNER_PATTERN)

        def __call__(self, data: bytes, data_offset: int) -> Iterator[int]:
            starts: list[int] = []
            for prefix in _BANNER_PREFIXES:
                at = data.find(prefix)
                # Like RegExScanner, leave hits in the overlap to the next chunk.
                while 0 <= at < self.chunk_size:
                    starts.append(at)
                    at = data.find(prefix, at + 1)
            for at in sorted(starts):
                if self.regex.match(data, at):
                    yield at + data_offset

    class _FastBanners(banners_cls):  # type: ignore[misc]
        @classmethod
        def locate_banners(cls, context: Any, layer_name: str) -> Iterator[tuple[Any, str]]:
            layer = context.layers[layer_name]
            for offset in layer.scan(context=context, scanner=_PrefixRegExScanner()):
                data = layer.read(offset, 0xFFF, pad=True)
                end = data.find(b"\x00")
                if end > 0:
                    text = data[:end].strip()
                    if all(c in _BANNER_CHARS for c in text):
                        yield hex_hint(offset), text.decode("latin-1")
            yield from cls.locate_windows_banners(context, layer_name)

    return _FastBanners
