"""Volatility 3 as a library: everything memdump uses of it, and only here.

memdump.analysis asks "does this dump open as an image Volatility can analyse"; this
module is how it talks to Volatility: importing and configuring it once per process
(``load``), its OFFLINE switch (``offline``), stacking a file with its file-format
stackers (``stack_file``), and its banners plugin, with a faster scan (``banners``).
Some of this reaches past Volatility's plugin interface (``LayerStacker.stack_layer``,
the stackers' ``stack_order``, ``schemas.cached_validation_filepath``, a subclass of
``RegExScanner`` and of the ``Banners`` plugin): pyproject.toml pins volatility3 to the
tested minor release, and tests/unit/test_volatility_api.py checks that each of these
exists with the signature used here, so an upgrade fails in that test, not at a capture.

memdump.chunklayer (the layer that reads a chunked ``.mem.gz`` in place, and its stacker)
is Volatility code too: it is imported here, by ``load()``, and by ``memdump vol``, never
at import time of anything else; ``stack_chunked`` opens a dump through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# The framework interface memdump is written against (major must match, minor at least).
INTERFACE = (2, 0, 0)

# Volatility's banners plugin (framework/plugins/banners.py) looks for this pattern; see
# _FastBanners for why we scan for its literal prefixes first.
_BANNER_PATTERN = rb"(Linux version|Darwin Kernel Version) [0-9]+\.[0-9]+\.[0-9]+"
_BANNER_PREFIXES = (b"Linux version ", b"Darwin Kernel Version ")
_BANNER_CHARS = frozenset(
    b" #()+,;/-.0123456789:@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
)
_MAX_BANNERS = 32
# RSDS, GUID and age, the longest kernel module name with ".pdb", NUL.
_PDB_SIGNATURE_MAX = 4 + 20 + 64 + 1

_VOL_LOCK = threading.Lock()
_VOL: SimpleNamespace | None = None
_OFFLINE_USERS = 0
_OFFLINE_SAVED = False


def load() -> SimpleNamespace:
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
        from volatility3.framework.constants import windows as windows_constants
        from volatility3.framework.layers import elf, physical, scanners
        from volatility3.framework.plugins import construct_plugin
        from volatility3.framework.renderers import format_hints
        from volatility3.framework.symbols.windows import pdbutil
        from volatility3.plugins import banners

        from memdump import chunklayer

        framework.require_interface_version(*INTERFACE)
        # Stackers register themselves on import; LayerStacker.__call__ would do this.
        framework.import_files(volatility3.framework.layers, True)

        # Volatility records validated symbol files in CACHE_PATH (in the user's home) on
        # first use; keep its in-memory cache but write the file to nowhere. Nothing else
        # we call writes to CACHE_PATH (downloads are off, see offline(); no symbol
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
            chunklayer=chunklayer,
            construct_plugin=construct_plugin,
            banners_plugin=_fast_banners_class(
                banners.Banners,
                scanners.RegExScanner,
                pdbutil.PdbSignatureScanner,
                [f"{n}.pdb".encode() for n in windows_constants.KERNEL_MODULE_NAMES],
                format_hints.Hex,
            ),
            stock_banners_plugin=banners.Banners,
            pdb_scanner=pdbutil.PdbSignatureScanner,
            pdb_names=[f"{n}.pdb".encode() for n in windows_constants.KERNEL_MODULE_NAMES],
            kernel_module_names=list(windows_constants.KERNEL_MODULE_NAMES),
        )
        return _VOL


@contextlib.contextmanager
def offline(vol: SimpleNamespace) -> Iterator[None]:
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


def stack_file(vol: SimpleNamespace, ctx: Any, path: Path) -> list[str]:
    """Open ``path`` as a file layer of ``ctx`` and let Volatility's file-format stackers
    recognise it: the names of the layers, the top first, the file layer last."""
    base = "memdump_file"
    ctx.config[vol.interfaces.configuration.path_join(base, "location")] = path.as_uri()
    ctx.add_layer(vol.physical.FileLayer(ctx, base, base))
    return _stack_formats(vol, ctx, base)


def stack_chunked(vol: SimpleNamespace, ctx: Any, path: Path, *, verify: bool) -> list[str]:
    """Open the chunked ``.mem.gz`` ``path`` as memdump's chunked layer (``verify``: check
    every chunk it inflates against the index) and stack the file-format layers on it,
    as ``stack_file`` does on a raw image. Raises Volatility's LayerException when the
    file is not a chunked dump or its index is damaged."""
    base = "memdump_chunked"
    config = vol.interfaces.configuration.path_join
    ctx.config[config(base, "location")] = path.as_uri()
    ctx.config[config(base, "verify")] = verify
    ctx.add_layer(vol.chunklayer.ChunkedGzipLayer(ctx, base, base))
    return _stack_formats(vol, ctx, base)


def _stack_formats(vol: SimpleNamespace, ctx: Any, base: str) -> list[str]:
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
    return names


def run_cli(argv: list[str]) -> int:
    """Volatility 3's command line (``vol``) with ``argv``, memdump's chunked layer and
    its stacker loaded (they register as subclasses on import), so ``-f`` on a chunked
    ``.mem.gz`` stacks Volatility's layers on it; the exit status.

    Not ``load()``: that configures Volatility for memdump's own check (quiet logging,
    no symbol cache file); an analyst's ``vol`` keeps its usual behaviour (``-v``, cache).
    """
    from volatility3 import cli

    import memdump.chunklayer  # noqa: F401  (registers ChunkedGzipStacker)

    saved = sys.argv
    sys.argv = ["memdump vol", *argv]  # Volatility's parser reads sys.argv itself
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # what SystemExit would have printed
        return 1
    finally:
        sys.argv = saved
    return 0


def destroy_layers(ctx: Any) -> None:
    """Close what ``ctx`` opened (a FileLayer holds its file open)."""
    for name in list(ctx.layers):
        with contextlib.suppress(Exception):
            ctx.layers[name].destroy()


def why_not_elf(vol: SimpleNamespace, ctx: Any, base: str) -> str:
    """The ELF layer's own complaint, which stack_layer only logs (at level 7)."""
    name = "memdump_elf_probe"
    ctx.config[vol.interfaces.configuration.path_join(name, "base_layer")] = base
    try:
        vol.elf.Elf64Layer(ctx, name, name)
    except Exception as exc:
        return f" (Elf64Layer: {exc})"
    return ""


def banners(vol: SimpleNamespace, ctx: Any, layer_name: str, stock: bool = False) -> list[str]:
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


def banners_at(
    vol: SimpleNamespace, ctx: Any, layer_name: str, unix: list[int], windows: list[int]
) -> list[str]:
    """What ``banners`` lists, from candidate guest-physical offsets instead of a scan of
    the whole layer (memdump.bannerscan found them in the stream): each is confirmed at its
    address through the layer with the plugin's own rules (the version regex, the banner
    read up to its NUL and its characters; Volatility's PdbSignatureScanner on the
    signature's bytes), and listed in the plugin's order: Linux/macOS by address, then
    Windows by address."""
    layer = ctx.layers[layer_name]
    regex = re.compile(_BANNER_PATTERN)
    found: list[str] = []

    def add(text: str) -> None:
        text = text.strip()
        if text and text not in found and len(found) < _MAX_BANNERS:
            found.append(text)

    for offset in sorted(set(unix)):
        data = layer.read(offset, 0xFFF, pad=True)
        if not regex.match(data):
            continue
        end = data.find(b"\x00")
        if end > 0:
            text = data[:end].strip()
            if all(c in _BANNER_CHARS for c in text):
                add(text.decode("latin-1"))
    scanner = vol.pdb_scanner(vol.pdb_names)
    for offset in sorted(set(windows)):
        data = layer.read(offset, _PDB_SIGNATURE_MAX, pad=True)
        for guid, age, pdb_name, at in scanner(data, offset):
            if at == offset:
                add(f"{pdb_name.decode('latin-1')}|{guid}|{age}")
    return found


def _fast_banners_class(
    banners_cls: Any, regex_scanner: Any, pdb_scanner: Any, pdb_names: list[bytes], hex_hint: Any
) -> Any:
    """Volatility's Banners plugin with a faster scan for the Linux/macOS part, and one
    pass over the image instead of two.

    The stock plugin scans with a regex that starts with an alternation, which Python's
    re engine cannot search for quickly: ~250 MiB/s whatever the data (4 s per GiB,
    four times as long as decompressing). Every match starts with one of two literals,
    which bytes.find locates at >2 GiB/s; the regex then only runs where one occurs.
    Same matches, same filtering afterwards (tests compare with the stock plugin), one
    deliberate difference: the banner is read padded, where the stock plugin raises for
    a banner within 4 KiB of the end of a RAM block.

    The stock plugin then scans the whole image a second time for Windows kernels' PDB
    signatures. Here Volatility's own PdbSignatureScanner runs on the same windows of
    the same single scan (the window overlap is its larger one; the Linux hits in the
    overlap are still left to the next window), and its hits are reported after the
    Linux/macOS ones, formatted as the stock plugin does: the same rows in the same
    order, and a chunked dump (or a decompressed copy) is read once, not twice.
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

    class _OnePassScanner(regex_scanner):  # type: ignore[misc]
        """Yields ("unix", offset) and ("windows", (guid, age, pdb_name, offset))."""

        def __init__(self) -> None:
            super().__init__(_BANNER_PATTERN)
            self.unix = _PrefixRegExScanner()
            self.windows = pdb_scanner(pdb_names)
            self.unix.chunk_size = self.windows.chunk_size = self.chunk_size
            self.overlap = max(self.unix.overlap, self.windows.overlap)

        def __call__(self, data: bytes, data_offset: int) -> Iterator[tuple[str, Any]]:
            for offset in self.unix(data, data_offset):
                yield "unix", offset
            for hit in self.windows(data, data_offset):
                yield "windows", hit

    class _FastBanners(banners_cls):  # type: ignore[misc]
        @classmethod
        def locate_banners(cls, context: Any, layer_name: str) -> Iterator[tuple[Any, str]]:
            layer = context.layers[layer_name]
            windows = []
            for kind, hit in layer.scan(context=context, scanner=_OnePassScanner()):
                if kind == "windows":
                    windows.append(hit)
                    continue
                data = layer.read(hit, 0xFFF, pad=True)
                end = data.find(b"\x00")
                if end > 0:
                    text = data[:end].strip()
                    if all(c in _BANNER_CHARS for c in text):
                        yield hex_hint(hit), text.decode("latin-1")
            # As Banners.locate_windows_banners formats them.
            for guid, age, pdb_name, offset in windows:
                yield hex_hint(offset), f"{pdb_name.decode('latin-1')}|{guid}|{age}"

    return _FastBanners
