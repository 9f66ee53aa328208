"""Issue 14 item 3: memdump's Volatility 3 layer reads a chunked .mem.gz in place (only the
chunks a read covers are inflated, through the index), Volatility's ELF layer stacks on it
as on a raw image, `-f dump.mem.gz` picks it through its stacker, and `memdump vol` is
Volatility's command line with it loaded. Older single-stream dumps keep Volatility's own
gzip path."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memdump import chunkedgz, volatility
from memdump.errors import CorruptChunkError
from tests.helpers.chunked_dumps import (
    SMALL_CHUNK,
    chunk_at,
    chunks,
    flip_in_member,
    write_chunked,
    write_single_stream,
)
from tests.helpers.elfgen import make_core, mixed_bytes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:volatility3")

REPO = Path(__file__).resolve().parents[2]
BANNER = b"Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) #1 SMP Debian\n\x00"
MARKER = b"MEMDUMP-MARKER-chunked-7d0e"
MARKER_PADDR = 0x100000 + 3 * SMALL_CHUNK + 100  # well inside the RAM above 1 MiB


def image() -> bytes:
    low = bytearray(mixed_bytes(640 << 10, seed=1))
    low[0x9000 : 0x9000 + len(BANNER)] = BANNER
    high = bytearray(mixed_bytes(3 << 20, seed=2))
    at = MARKER_PADDR - 0x100000
    high[at : at + len(MARKER)] = MARKER
    return make_core([(0, bytes(low)), (0x100000, bytes(high))])


@pytest.fixture(scope="module")
def raw() -> bytes:
    return image()


@pytest.fixture
def dump(tmp_path: Path, raw: bytes) -> Path:
    return write_chunked(tmp_path / "vm-a_20260101T000000Z.mem.gz", raw)


@pytest.fixture
def vol() -> Any:
    return volatility.load()


@pytest.fixture
def ctx(vol: Any) -> Any:
    c = vol.contexts.Context()
    yield c
    volatility.destroy_layers(c)


def chunked_layer(vol: Any, ctx: Any, path: Path, verify: bool = False) -> Any:
    ctx.config["t.location"] = path.as_uri()
    ctx.config["t.verify"] = verify
    layer = vol.chunklayer.ChunkedGzipLayer(ctx, "t", "t")
    ctx.add_layer(layer)
    return layer


def test_reads_equal_the_raw_image(vol: Any, ctx: Any, dump: Path, raw: bytes) -> None:
    layer = chunked_layer(vol, ctx, dump)
    assert (layer.minimum_address, layer.maximum_address) == (0, len(raw) - 1)
    rnd = random.Random(14)
    spans = [(0, 64), (SMALL_CHUNK - 3, 6), (len(raw) - 5, 5), (0, len(raw))]
    spans += [(o, rnd.randrange(1, 40 * SMALL_CHUNK)) for o in rnd.sample(range(len(raw)), 60)]
    for offset, length in spans:
        length = min(length, len(raw) - offset)
        assert layer.read(offset, length) == raw[offset : offset + length], (offset, length)
    assert layer.is_valid(len(raw) - 1) and not layer.is_valid(len(raw) - 1, 2)


def test_outside_the_image_raises_or_pads(vol: Any, ctx: Any, dump: Path, raw: bytes) -> None:
    layer = chunked_layer(vol, ctx, dump)
    for offset, length in ((len(raw) - 2, 4), (len(raw), 1), (-1, 2)):
        with pytest.raises(vol.exceptions.InvalidAddressException):
            layer.read(offset, length)
    assert layer.read(len(raw) - 2, 5, pad=True) == raw[-2:] + bytes(3)
    assert layer.read(len(raw) + 10, 4, pad=True) == bytes(4)


def test_a_read_inflates_only_the_chunks_it_covers(vol: Any, ctx: Any, dump: Path) -> None:
    layer = chunked_layer(vol, ctx, dump)
    n = len(chunks(dump))
    assert n > 40
    layer.read(5 * SMALL_CHUNK + 100, 4096)
    assert layer.inflated == {5}
    layer.read(7 * SMALL_CHUNK - 10, 20)  # across an edge
    assert layer.inflated == {5, 6, 7}
    layer.read(10 * SMALL_CHUNK, 8 * SMALL_CHUNK)  # a scan window, inflated on threads
    assert layer.inflated == {5, 6, 7, *range(10, 18)}


def test_verify_names_the_damaged_chunk(vol: Any, ctx: Any, dump: Path, raw: bytes) -> None:
    bad = chunk_at(dump, 9 * SMALL_CHUNK)
    flip_in_member(dump, bad)
    layer = chunked_layer(vol, ctx, dump, verify=True)
    assert layer.read(0, 4096) == raw[:4096]  # the other chunks still read
    with pytest.raises(CorruptChunkError) as exc:
        layer.read(9 * SMALL_CHUNK + 5, 10, pad=True)  # never zeros for a damaged chunk
    assert exc.value.fields["number"] == bad.number
    assert exc.value.fields["raw_offset"] == 9 * SMALL_CHUNK


def test_a_single_stream_dump_is_not_a_chunked_layer(
    vol: Any, ctx: Any, tmp_path: Path, raw: bytes
) -> None:
    old = write_single_stream(tmp_path / "old.mem.gz", raw)
    with pytest.raises(vol.exceptions.LayerException, match="not a chunked"):
        chunked_layer(vol, ctx, old)


def test_elf_layer_stacks_on_it(vol: Any, ctx: Any, dump: Path, raw: bytes) -> None:
    names = volatility.stack_chunked(vol, ctx, dump, verify=False)
    assert [type(ctx.layers[n]).__name__ for n in names] == ["Elf64Layer", "ChunkedGzipLayer"]
    elf = ctx.layers[names[0]]
    assert elf.read(MARKER_PADDR, len(MARKER)) == MARKER
    assert volatility.banners(vol, ctx, names[0]) == [BANNER.rstrip(b"\n\x00").decode()]


def stack_like_vol(vol: Any, ctx: Any, path: Path) -> list[str]:
    """What `vol -f PATH` does: a FileLayer on the location, then every stacker."""
    ctx.config["f.location"] = path.as_uri()
    ctx.add_layer(vol.physical.FileLayer(ctx, "f", "f"))
    stackers = sorted(
        vol.framework_subclasses(vol.interfaces.automagic.StackerLayerInterface),
        key=lambda s: s.stack_order,
    )
    names: list[str] = vol.stacker.LayerStacker.stack_layer(ctx, "f", stackers)
    return [type(ctx.layers[n]).__name__ for n in names]


def test_stacker_picks_the_chunked_layer_for_dash_f(
    vol: Any, ctx: Any, dump: Path, tmp_path: Path, raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_single_stream(tmp_path / "old.mem.gz", raw)
    old_ctx = vol.contexts.Context()
    try:
        assert stack_like_vol(vol, old_ctx, old) == ["Elf64Layer", "FileLayer"]
    finally:
        volatility.destroy_layers(old_ctx)
    # The chunked dump is never read through gzip: not even for the FileLayer's size,
    # which LayerStacker logs after stacking (the whole stream inflated, otherwise).
    import gzip

    def no_gzip(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("read through Volatility's gzip path")

    monkeypatch.setattr(gzip.GzipFile, "read", no_gzip)
    monkeypatch.setattr(gzip.GzipFile, "seek", no_gzip)
    assert stack_like_vol(vol, ctx, dump) == ["Elf64Layer", "ChunkedGzipLayer", "FileLayer"]
    assert ctx.layers["f"].maximum_address == len(raw) - 1
    top = ctx.layers[next(n for n in ctx.layers if n.startswith("Elf64Layer"))]
    assert top.read(MARKER_PADDR, len(MARKER)) == MARKER
    # Volatility rebuilds stacked layers from their configuration (ConstructionMagic).
    config = ctx.layers[next(n for n in ctx.layers if n.startswith("ChunkedGzip"))]
    assert config.build_configuration()["class"] == "memdump.chunklayer.ChunkedGzipLayer"


def run_memdump_vol(home: Path, *args: str, forbid_gzip: bool) -> subprocess.CompletedProcess[str]:
    """`memdump vol ARGS` in its own process (Volatility's CLI sets process-wide state),
    optionally with Python's gzip reader made to fail."""
    code = (
        "import gzip, sys\n"
        "def no(*a, **k): raise RuntimeError('gzip path used')\n"
        + ("gzip.GzipFile.read = gzip.GzipFile.seek = no\n" if forbid_gzip else "")
        + "from memdump.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # HOME: Volatility keeps its symbol cache under ~/.cache.
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", code, "vol", "-q", "-r", "csv", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_memdump_vol_reads_a_chunked_dump_in_place(dump: Path, tmp_path: Path, raw: bytes) -> None:
    want = BANNER.rstrip(b"\n\x00").decode()
    done = run_memdump_vol(tmp_path, "-f", str(dump), "banners.Banners", forbid_gzip=True)
    assert done.returncode == 0, done.stderr
    assert want in done.stdout
    # The same guard breaks Volatility's own path: the chunked run did not take it.
    old = write_single_stream(tmp_path / "old.mem.gz", raw)
    guarded = run_memdump_vol(tmp_path, "-f", str(old), "banners.Banners", forbid_gzip=True)
    assert want not in guarded.stdout
    plain = run_memdump_vol(tmp_path, "-f", str(old), "banners.Banners", forbid_gzip=False)
    assert plain.returncode == 0 and want in plain.stdout  # old dumps still open


def test_memdump_vol_passes_everything_through(tmp_path: Path) -> None:
    done = run_memdump_vol(tmp_path, "-h", forbid_gzip=False)
    assert done.returncode == 0
    assert "--single-location" in done.stdout  # Volatility's own help


def test_a_scan_reads_ahead_without_raising_for_what_it_was_not_asked(
    vol: Any, ctx: Any, dump: Path, raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan window's read inflates the next window's chunks ahead, once each; a
    damaged chunk among those raises only when a read asks for it."""
    import memdump.chunkedgz

    bad = chunk_at(dump, 13 * SMALL_CHUNK)
    flip_in_member(dump, bad)
    inflated: list[int] = []
    real = memdump.chunkedgz.read_chunk

    def spy(f: Any, chunk: Any, *, check: bool = True) -> bytes:
        inflated.append(chunk.number)
        return real(f, chunk, check=check)

    monkeypatch.setattr(memdump.chunkedgz, "read_chunk", spy)
    layer = chunked_layer(vol, ctx, dump, verify=True)
    window = 4 * SMALL_CHUNK
    assert layer.read(8 * SMALL_CHUNK, window) == raw[8 * SMALL_CHUNK : 12 * SMALL_CHUNK]
    assert layer.inflated == {8, 9, 10, 11}
    for ahead in list(layer._ahead.values()):
        ahead.exception()  # wait; chunk 13's error stays in its future
    assert sorted(inflated) == list(range(8, 16))  # 12-15 read ahead
    assert layer.read(12 * SMALL_CHUNK, 100) == raw[12 * SMALL_CHUNK : 12 * SMALL_CHUNK + 100]
    assert sorted(inflated) == list(range(8, 16))  # from the cache
    with pytest.raises(CorruptChunkError):
        layer.read(12 * SMALL_CHUNK, window)
    at = 17 * SMALL_CHUNK
    assert layer.read(at, window) == raw[at : at + window]


def test_a_page_inflates_its_chunk_only_as_far_as_it_goes(
    vol: Any, ctx: Any, dump: Path, raw: bytes
) -> None:
    from memdump.chunkedgz import DATA_HEADER_SIZE
    from memdump.chunklayer import _MEMBER_HEAD

    assert _MEMBER_HEAD.size == DATA_HEADER_SIZE
    layer = chunked_layer(vol, ctx, dump)  # analysts' default: no verify
    # A compressed chunk (zero and stored ones are not inflated: test_chunklayer_reads).
    number = next(
        c.number
        for c in chunks(dump)[20:]
        if c.gz_size < c.raw_size // 2 and c.sha256 != hashlib.sha256(bytes(c.raw_size)).digest()
    )
    base = number * SMALL_CHUNK
    assert layer.read(base + 100, 50) == raw[base + 100 : base + 150]
    done = len(layer._prefixes[number].data)
    assert 150 <= done < SMALL_CHUNK  # a prefix, not the chunk
    assert layer.read(base + 30000, 4096) == raw[base + 30000 : base + 34096]  # goes on
    assert layer.read(base + 10, 10) == raw[base + 10 : base + 20]  # from what it has
    assert layer.read(base + SMALL_CHUNK - 8, 8) == raw[base + SMALL_CHUNK - 8 : base + SMALL_CHUNK]
    assert len(layer._prefixes[number].data) == SMALL_CHUNK


@pytest.mark.parametrize("where", ["header", "deflate"])
def test_a_damaged_member_raises_without_verify(vol: Any, ctx: Any, dump: Path, where: str) -> None:
    from memdump.chunkedgz import DATA_HEADER_SIZE

    bad = chunk_at(dump, 6 * SMALL_CHUNK)
    blob = bytearray(dump.read_bytes())
    if where == "header":
        blob[bad.gz_offset + 16] ^= 0x01  # the chunk number in the MD subfield
    else:
        blob[bad.gz_offset + DATA_HEADER_SIZE] = 0x07  # BFINAL, BTYPE 11: reserved
    dump.write_bytes(bytes(blob))
    layer = chunked_layer(vol, ctx, dump)
    with pytest.raises(CorruptChunkError) as exc:
        layer.read(6 * SMALL_CHUNK + 10, 10)
    assert exc.value.fields["number"] == bad.number
    assert ("header" if where == "header" else "deflate") in str(exc.value)


def _flip_trailer_root(path: Path) -> None:
    """One bit of the Merkle root the trailer holds (its body's last 32 bytes)."""
    end = path.stat().st_size - len(chunkedgz._EMPTY_DEFLATE) - chunkedgz._TAIL.size
    with open(path, "r+b") as f:
        f.seek(end - 1)
        last = f.read(1)[0]
        f.seek(end - 1)
        f.write(bytes([last ^ 1]))


def test_an_index_hint_spares_the_layer_hashing_again_but_not_checking(
    vol: Any, ctx: Any, dump: Path, raw: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(dump, "rb") as f:
        index = chunkedgz.read_index(f)
    assert index is not None
    hashed: list[int] = []
    run_root = chunkedgz._run_root
    monkeypatch.setattr(chunkedgz, "_run_root", lambda run: hashed.append(1) or run_root(run))
    with chunkedgz.index_hint(dump, index):
        layer = chunked_layer(vol, ctx, dump)
    assert hashed == []  # the check's index given: no run hashed again
    assert layer.read(MARKER_PADDR - 0x100000, 64) == raw[MARKER_PADDR - 0x100000 :][:64]
    # Another file's index as the hint: this file's own chunks are hashed.
    other = write_chunked(tmp_path / "vm-b_20260101T000000Z.mem.gz", raw[::-1])
    ctx.config["v.location"] = other.as_uri()
    with chunkedgz.index_hint(other, index):
        vol.chunklayer.ChunkedGzipLayer(ctx, "v", "v")  # opened: its own root checked
    assert hashed
    # A root the chunks do not give is refused with the right index as the hint.
    _flip_trailer_root(dump)
    with chunkedgz.index_hint(dump, index), pytest.raises(vol.exceptions.LayerException):
        ctx.config["u.location"] = dump.as_uri()
        vol.chunklayer.ChunkedGzipLayer(ctx, "u", "u")
