"""Issue 13 item 5: the Volatility 3 internals memdump.volatility depends on exist, with the
signatures it calls them with, and volatility3 is pinned to the tested release. An
upgrade that moves or reshapes one of them fails here, by name, not at a capture (where
the check would only report "error")."""

from __future__ import annotations

import inspect
import tomllib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from memdump import volatility

REPO = Path(__file__).resolve().parents[2]


def params(fn: Callable[..., Any]) -> list[str]:
    """Parameter names as a caller passes them (no self)."""
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.fixture(scope="module")
def vol() -> Any:
    return volatility.load()


def test_volatility3_is_pinned_to_the_tested_release() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "volatility3"]
    assert any(s.operator == "<" for s in req.specifier), f"no upper bound: {req}"
    assert req.specifier.contains(version("volatility3")), (str(req), version("volatility3"))


def test_framework_interface_and_module_state(vol: Any) -> None:
    import volatility3.schemas
    from volatility3 import framework

    framework.require_interface_version(*volatility.INTERFACE)  # raises if incompatible
    assert params(framework.import_files)[:2] == ["base_module", "ignore_errors"]
    assert params(framework.class_subclasses) == ["cls"]
    # load() points it at os.devnull: the attribute must still be the one Volatility reads.
    assert "cached_validation_filepath" in vars(volatility3.schemas)
    assert isinstance(vol.constants.OFFLINE, bool)
    assert str(vol.constants.PACKAGE_VERSION) == version("volatility3")


def test_layers_and_stacking(vol: Any) -> None:
    assert params(vol.interfaces.configuration.path_join) == ["args"]
    assert params(vol.contexts.Context.add_layer) == ["layer"]
    ctx = vol.contexts.Context()
    assert hasattr(ctx, "config") and hasattr(ctx, "layers")
    for layer in (vol.physical.FileLayer, vol.elf.Elf64Layer):
        assert params(layer)[:3] == ["context", "config_path", "name"]
    stack_layer = inspect.getattr_static(vol.stacker.LayerStacker, "stack_layer")
    assert isinstance(stack_layer, classmethod | staticmethod)
    assert params(vol.stacker.LayerStacker.stack_layer)[:3] == [
        "context",
        "initial_layer",
        "stack_set",
    ]
    stackers = [
        s
        for s in vol.framework_subclasses(vol.interfaces.automagic.StackerLayerInterface)
        if s.__module__.startswith("volatility3.framework.layers.")
    ]
    assert "Elf64Stacker" in {s.__name__ for s in stackers}
    assert all(isinstance(s.stack_order, int) for s in stackers)
    elf = vol.elf.Elf64Layer
    assert params(elf.mapping)[:3] == ["offset", "length", "ignore_errors"]
    assert params(elf.read)[:3] == ["offset", "length", "pad"]
    assert params(elf.scan)[:2] == ["context", "scanner"]
    for name in ("minimum_address", "maximum_address", "destroy"):
        assert hasattr(elf, name), name
    assert issubclass(vol.exceptions.InvalidAddressException, Exception)


def test_the_banners_plugin_memdump_subclasses(vol: Any) -> None:
    from volatility3.framework.layers import scanners
    from volatility3.framework.renderers import TreeGrid, format_hints
    from volatility3.plugins import banners

    stock = banners.Banners
    assert vol.stock_banners_plugin is stock and issubclass(vol.banners_plugin, stock)
    for name in ("locate_banners", "locate_windows_banners"):
        assert isinstance(inspect.getattr_static(stock, name), classmethod), name
        assert params(getattr(stock, name)) == ["context", "layer_name"], name
    # The faster scan only runs if the plugin finds banners through cls.locate_banners,
    # and memdump configures the layer to scan as its "primary" requirement.
    assert "locate_banners" in stock._generator.__code__.co_names
    assert "primary" in {r.name for r in stock.get_requirements()}
    assert params(vol.construct_plugin) == [
        "context",
        "automagics",
        "plugin",
        "base_config_path",
        "progress_callback",
        "open_method",
    ]
    assert params(TreeGrid.populate)[:2] == ["function", "initial_accumulator"]
    # memdump's scanner subclasses RegExScanner: its constructor, the compiled regex it
    # matches with, the chunk size it honours, and how the layer calls it.
    assert params(scanners.RegExScanner)[:1] == ["pattern"]
    scanner = scanners.RegExScanner(rb"x")
    assert hasattr(scanner, "regex") and isinstance(scanner.chunk_size, int)
    assert params(scanners.RegExScanner.__call__) == ["data", "data_offset"]
    assert issubclass(format_hints.Hex, int)
    # The Windows half of memdump's one-pass scan: Volatility's own PDB scanner, its
    # window overlap and chunk size, and the kernel names the stock plugin looks for.
    from volatility3.framework.constants import windows
    from volatility3.framework.symbols.windows import pdbutil

    assert params(pdbutil.PdbSignatureScanner) == ["pdb_names"]
    pdb = pdbutil.PdbSignatureScanner([b"ntoskrnl.pdb"])
    assert isinstance(pdb.overlap, int) and isinstance(pdb.chunk_size, int)
    assert "ntoskrnl" in windows.KERNEL_MODULE_NAMES
    assert "KERNEL_MODULE_NAMES" in stock.locate_windows_banners.__code__.co_names


def test_what_the_chunked_layer_builds_on(vol: Any, tmp_path: Path) -> None:
    """memdump.chunklayer (issue 14 item 3): a DataLayerInterface whose abstract members it
    implements, a StackerLayerInterface called as stack(context, layer_name, callback),
    FileLayer's location and cached size (the stacker fills _maximum_address, which
    FileLayer otherwise computes by seeking to the end: for a .gz, inflating it all), the
    class path ConstructionMagic rebuilds layers from, and `vol`'s entry point."""
    from volatility3 import cli
    from volatility3.framework.configuration import requirements

    data = vol.interfaces.layers.DataLayerInterface
    assert data.__abstractmethods__ <= {
        "maximum_address",
        "minimum_address",
        "is_valid",
        "read",
        "write",
    }
    assert not getattr(vol.chunklayer.ChunkedGzipLayer, "__abstractmethods__", set())
    assert params(data.__init__)[:4] == ["context", "config_path", "name", "metadata"]
    assert params(vol.interfaces.automagic.StackerLayerInterface.stack) == [
        "context",
        "layer_name",
        "progress_callback",
    ]
    stacker = vol.interfaces.automagic.StackerLayerInterface
    assert isinstance(inspect.getattr_static(stacker, "stack"), classmethod)
    # Runs before the file-format stackers (stack_layer tries them in stack_order).
    assert vol.chunklayer.ChunkedGzipStacker.stack_order < vol.elf.Elf64Stacker.stack_order
    core = tmp_path / "f.bin"
    core.write_bytes(b"x" * 100)
    ctx = vol.contexts.Context()
    ctx.config["f.location"] = core.as_uri()
    layer = vol.physical.FileLayer(ctx, "f", "f")
    try:
        assert layer.location == core.as_uri()
        assert layer._maximum_address is None
        layer._maximum_address = 41
        assert layer.maximum_address == 41
    finally:
        layer.destroy()
    ctx.layers.free_layer_name("x")
    assert {"StringRequirement", "BooleanRequirement"} <= set(vars(requirements))
    built = vol.chunklayer.ChunkedGzipLayer.get_requirements()
    assert {r.name for r in built} == {"location", "verify"}
    assert callable(cli.main) and params(cli.main) == []
