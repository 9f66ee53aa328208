"""Issue 14 item 3 on the lab: a real capture (the pipeline's chunked .mem.gz) read in place
through memdump's Volatility layer, as `vol -f` stacks it: every seeded marker at its
guest-physical address, inflating only the chunks that hold them; memdump's own check
passes through the layer (no decompressed copy) and fails on a damaged chunk, naming it;
the Linux guest's kernel banner found by memdump's check and by `memdump vol`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memdump import analysis, volatility
from memdump.analysis import analyze
from memdump.capture import capture
from memdump.chunkedgz import read_index
from memdump.hypervisors import open_driver
from memdump.manifest import manifest_path
from memdump.settings import Settings
from tests.helpers.chunked_dumps import chunks, flip_in_member
from tests.helpers.lab import layout

pytestmark = [pytest.mark.lab, pytest.mark.filterwarnings("ignore::DeprecationWarning:volatility3")]

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
LINUX_VM = "vm-chunklayer-linux"  # this module's own guest, removed at the end
LINUX_MIB = 256


def capture_chunked(settings: Settings, vm: str) -> tuple[Any, Path]:
    drv = open_driver(settings.inventory[0], settings.ssh)
    try:
        rec = capture(drv, drv.resolve(vm), settings).record
    finally:
        drv.close()
    dump = Path(rec.dump_path)
    with open(dump, "rb") as f:
        assert read_index(f) is not None, "the pipeline wrote no chunk index"
    return rec, dump


@pytest.fixture
def no_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any) -> Any:
        raise AssertionError("decompressed copy made")

    monkeypatch.setattr(analysis, "_decompress", boom)


def test_lab_dump_markers_through_the_layer(
    settings: Settings, lab_dir: Path, no_copy: None
) -> None:
    rec, dump = capture_chunked(settings, "vm-web-01")
    assert rec.analysis == "passed"
    m = json.loads(manifest_path(dump).read_text())["analysis"]
    assert m["status"] == "passed" and m["layer"] == "Elf64Layer", m
    assert "Elf64Layer over ChunkedGzipLayer" in m["detail"], m

    markers = {
        mk["addr"]: bytes.fromhex(mk["hex"]) for mk in layout(lab_dir, "vm-web-01")["markers"]
    }
    assert len(markers) >= 8
    # As `vol -f DUMP` stacks it: a FileLayer, then every stacker, memdump's first.
    vol = volatility.load()
    ctx = vol.contexts.Context()
    try:
        ctx.config["f.location"] = dump.as_uri()
        ctx.add_layer(vol.physical.FileLayer(ctx, "f", "f"))
        stackers = sorted(
            vol.framework_subclasses(vol.interfaces.automagic.StackerLayerInterface),
            key=lambda s: s.stack_order,
        )
        names = vol.stacker.LayerStacker.stack_layer(ctx, "f", stackers)
        kinds = [type(ctx.layers[n]).__name__ for n in names]
        assert kinds == ["Elf64Layer", "ChunkedGzipLayer", "FileLayer"]
        elf, layer = ctx.layers[names[0]], ctx.layers[names[1]]
        for addr, want in markers.items():
            assert elf.read(addr, len(want)) == want, hex(addr)
        # Random access: the header chunk(s) and the markers' chunks, not the dump.
        assert len(layer.inflated) <= len(markers) + 2 < len(layer.index.chunks) // 4
    finally:
        volatility.destroy_layers(ctx)

    full = analyze(dump, expect=markers, banners=False)
    assert full.status == "passed", full
    wrong = analyze(
        dump, expect={addr + 4096: data for addr, data in markers.items()}, banners=False
    )
    assert wrong.status == "failed", wrong

    # A damaged chunk anywhere fails the check, named with its guest-physical range.
    varied = [c for c in chunks(dump) if c.gz_size > c.raw_size // 2]  # not a run of zeros
    bad = varied[len(varied) // 2]
    flip_in_member(dump, bad)
    broken = analyze(dump, banners=False)
    assert broken.status == "failed", broken
    assert f"chunk {bad.number} " in broken.detail and "guest-physical 0x" in broken.detail


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAB / args[0]), *args[1:]], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def linux_vm(lab_dir: Path) -> Iterator[dict[str, Any]]:
    up = lab("up", "--linux", f"{LINUX_VM}:{LINUX_MIB}")
    try:
        assert up.returncode == 0, f"lab/up --linux failed:\n{up.stderr[-4000:]}"
        yield layout(lab_dir, LINUX_VM)
    finally:
        down = lab("down", "--vm", LINUX_VM)
        assert down.returncode == 0, down.stderr


def test_linux_banner_through_the_layer(
    linux_vm: dict[str, Any], settings: Settings, tmp_path: Path, no_copy: None
) -> None:
    rec, dump = capture_chunked(settings, LINUX_VM)
    assert rec.analysis == "passed"
    m = json.loads(manifest_path(dump).read_text())["analysis"]
    assert "over ChunkedGzipLayer" in m["detail"], m
    assert linux_vm["banner"] in m["banners"], m
    # Found in the stream as it was captured, confirmed through the layer (issue 14, item 6).
    assert "(confirmed from the stream scan)" in m["detail"], m

    # An analyst's `memdump vol -f DUMP banners.Banners`, never through Python's gzip.
    code = (
        "import gzip, sys\n"
        "def no(*a, **k): raise RuntimeError('gzip path used')\n"
        "gzip.GzipFile.read = gzip.GzipFile.seek = no\n"
        "from memdump.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "vol", "-q", "-r", "json", "-f", str(dump), "banners.Banners"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert linux_vm["banner"] in [row["Banner"] for row in json.loads(done.stdout)]
