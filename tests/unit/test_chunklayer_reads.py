"""Issue 14 item 3 (and its target "random 4 KiB pages within 5x of the raw ELF"): the
chunked layer's page reads without ``verify`` read no more of a chunk than they need: an
all-zero chunk (its index SHA-256 says so) is not inflated, a stored chunk is read in
place, a compressed one is inflated only as far as the read goes, and a page across a
chunk edge reads the two ends it needs. The bytes are exactly the raw image's wherever a
read starts or ends, damage is still reported (member header, stored block headers,
deflate data, inflating past the chunk's size), and ``verify`` still checks every chunk it
reads against its SHA-256, zero chunks included."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memdump import volatility
from memdump.chunkedgz import DATA_HEADER_SIZE, read_index
from memdump.errors import CorruptChunkError
from tests.helpers.chunked_craft import STORED_MAX, member, stored_blocks, write_members

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:volatility3")

C = 64 << 10  # the format's smallest chunk


def text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [b"page", b"cache", b"kernel", b"memdump", b"forensic", b"task_struct", b"0x7f"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choice(words) for _ in range(8)) + b" %d\n" % rnd.randrange(10**6)
    return bytes(out[:n])


def randbytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def open_layer() -> Iterator[Callable[..., Any]]:
    """Opens memdump's chunked layer on a path (``verify`` as given), each in the one
    Volatility context of the test, destroyed (files closed) at its end."""
    vol = volatility.load()
    ctx = vol.contexts.Context()

    def open_(path: Path, verify: bool = False) -> Any:
        name = ctx.layers.free_layer_name("t")
        ctx.config[f"{name}.location"] = path.as_uri()
        ctx.config[f"{name}.verify"] = verify
        layer = vol.chunklayer.ChunkedGzipLayer(ctx, name, name)
        ctx.add_layer(layer)
        return layer

    yield open_
    volatility.destroy_layers(ctx)


def kinds(path: Path) -> list[str]:
    with open(path, "rb") as f:
        index = read_index(f)
    assert index is not None
    out = []
    for c in index.chunks:
        if c.sha256 == hashlib.sha256(bytes(c.raw_size)).digest():
            out.append("zero")
        elif c.gz_size - DATA_HEADER_SIZE - 8 > c.raw_size:
            out.append("stored")
        else:
            out.append("compressed")
    return out


# Chunks of each kind side by side (every pair of neighbours occurs), the last one short.
PLAN = ["stored", "compressed", "zero", "stored", "zero", "compressed", "compressed", "stored"]


def plan_bytes(chunk_size: int, last: int) -> bytes:
    parts = []
    for n, kind in enumerate(PLAN):
        size = chunk_size if n < len(PLAN) - 1 else last
        parts.append(
            randbytes(size, n)
            if kind == "stored"
            else bytes(size)
            if kind == "zero"
            else text(size, n)
        )
    return b"".join(parts)


@pytest.fixture(params=[C, 4 * C], ids=["64KiB", "256KiB"])
def planned(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, bytes, int]:
    chunk_size: int = request.param
    raw = plan_bytes(chunk_size, chunk_size - 5000)
    path = write_members(
        tmp_path / "plan.mem.gz",
        chunk_size,
        [raw[i : i + chunk_size] for i in range(0, len(raw), chunk_size)],
    )
    assert kinds(path) == PLAN
    return path, raw, chunk_size


def edge_spans(chunk_size: int, size: int) -> list[tuple[int, int]]:
    """Reads starting/ending at every kind of edge: chunk starts and ends, stored block
    boundaries inside a chunk (every 65,535 bytes), across chunks, the image's end."""
    spans = []
    for n in range(len(PLAN)):
        base = n * chunk_size
        spans += [(base, 1), (base, 4096), (base + chunk_size - 1, 1)]
        spans += [(base + chunk_size - 4096, 4096), (base + chunk_size - 2048, 4096)]
        for b in range(STORED_MAX, chunk_size, STORED_MAX):
            spans += [(base + b - 3, 6), (base + b, 1), (base + b - 1, 1), (base + b - 100, 4096)]
        spans += [(base + b - 10, 2 * STORED_MAX + 20) for b in (STORED_MAX,)]
    spans += [(size - 4096, 4096), (size - 1, 1), (0, size)]
    return [(o, min(n, size - o)) for o, n in spans if 0 <= o < size]


def test_reads_at_every_edge_are_exact_fresh_and_warm(
    open_layer: Callable[..., Any], planned: tuple[Path, bytes, int]
) -> None:
    path, raw, chunk_size = planned
    warm = open_layer(path)
    for offset, length in edge_spans(chunk_size, len(raw)):
        want = raw[offset : offset + length]
        # A fresh layer: the read is the first into its chunk (a stored chunk's block
        # headers up to it are read first); the warm one has read others before.
        assert open_layer(path).read(offset, length) == want, (offset, length)
        assert warm.read(offset, length) == want, (offset, length)
    checked = open_layer(path, verify=True)
    for offset, length in edge_spans(chunk_size, len(raw))[::3]:
        assert checked.read(offset, length) == raw[offset : offset + length]


def test_random_pages_match_the_image(
    open_layer: Callable[..., Any], planned: tuple[Path, bytes, int]
) -> None:
    path, raw, _ = planned
    layer = open_layer(path)
    rnd = random.Random(14)
    for _ in range(300):
        offset = rnd.randrange(len(raw) - 4096)
        assert layer.read(offset, 4096) == raw[offset : offset + 4096], offset


class _Spy:
    """Counts inflaters made by the layer and whole chunks read the checked way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from isal import isal_zlib as real_isal

        import memdump.chunkedgz

        self.inflaters = 0
        self.whole: list[int] = []
        real_chunk = memdump.chunkedgz.ChunkReader.chunk
        spy = self

        class CountingIsal:
            def __getattr__(self, name: str) -> Any:
                return getattr(real_isal, name)

            def decompressobj(self, *a: Any) -> Any:
                spy.inflaters += 1
                return real_isal.decompressobj(*a)

        def chunk(reader: Any, number: int) -> bytes:
            spy.whole.append(number)
            return real_chunk(reader, number)

        monkeypatch.setattr("memdump.chunklayer.isal_zlib", CountingIsal())
        monkeypatch.setattr(memdump.chunkedgz.ChunkReader, "chunk", chunk)


def test_zero_and_stored_pages_are_not_inflated(
    open_layer: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = plan_bytes(C, C)
    path = write_members(tmp_path / "p.mem.gz", C, [raw[i : i + C] for i in range(0, len(raw), C)])
    spy = _Spy(monkeypatch)
    layer = open_layer(path)
    for n, kind in enumerate(PLAN):
        if kind != "compressed":
            at = n * C + 12288
            assert layer.read(at, 4096) == raw[at : at + 4096]
            assert layer.read(n * C + C - 3, 3) == raw[n * C + C - 3 : n * C + C]
    assert (spy.inflaters, spy.whole) == (0, [])
    at = 1 * C + 100  # compressed: inflated, as far as the read goes
    assert layer.read(at, 4096) == raw[at : at + 4096]
    assert (spy.inflaters, spy.whole) == (1, [])


def test_a_page_across_a_chunk_edge_reads_the_two_ends_only(
    open_layer: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ELF's segments need not start on a page boundary of the file: then 1 page in 16
    (at 64 KiB chunks) crosses a chunk edge. Without verify it is not read as two whole
    chunks, checked (that is the verify path)."""
    raw = plan_bytes(C, C)
    path = write_members(tmp_path / "p.mem.gz", C, [raw[i : i + C] for i in range(0, len(raw), C)])
    spy = _Spy(monkeypatch)
    layer = open_layer(path)
    for edge in range(C, len(raw), C):
        at = edge - 1000
        assert layer.read(at, 4096) == raw[at : at + 4096], edge
    assert spy.whole == []
    checked = open_layer(path, verify=True)
    assert checked.read(3 * C - 1000, 4096) == raw[3 * C - 1000 : 3 * C + 3096]
    assert sorted(spy.whole) == [2, 3]


def test_a_compressed_chunk_goes_on_or_starts_again(
    open_layer: Callable[..., Any], tmp_path: Path
) -> None:
    """A compressed chunk is inflated (and its member read) only as far as a read needs;
    a later read further in goes on from there, or, once the chunk is no longer among the
    last few read (its inflater dropped), starts again from the member: same bytes."""
    raw = b"".join(text(C, n) for n in range(6))
    path = write_members(tmp_path / "t.mem.gz", C, [raw[i : i + C] for i in range(0, len(raw), C)])
    assert set(kinds(path)) == {"compressed"}
    layer = open_layer(path)
    assert layer.read(100, 50) == raw[100:150]
    part = layer._prefixes[0]
    assert 150 <= len(part.data) < C and not part.complete
    assert part._at < part.chunk.gz_size // 2  # read only a part of the member
    assert layer.read(30000, 4096) == raw[30000:34096]  # goes on
    assert layer.read(10, 10) == raw[10:20]  # from what it has
    for n in (1, 2, 3):  # other chunks: chunk 0's inflater is dropped
        assert layer.read(n * C + 5, 10) == raw[n * C + 5 : n * C + 15]
    assert part._inflater is None and not part.complete
    assert layer.read(C - 8, 8) == raw[C - 8 : C]  # from the start of the member again
    assert part.complete and len(part.data) == C
    assert layer.read(0, C) == raw[:C]


def test_a_stored_chunk_laid_out_otherwise_is_inflated(
    open_layer: Callable[..., Any], tmp_path: Path
) -> None:
    """A member of a stored chunk's size whose blocks are not the writer's (two of 32 KiB:
    valid deflate, the same size) is read by inflating it, not by position."""
    raw = randbytes(2 * C, 7)
    odd = member(1, raw[C:], stored_blocks(raw[C:], [C // 2, C // 2]))
    path = write_members(tmp_path / "odd.mem.gz", C, [raw[:C], odd])
    assert kinds(path) == ["stored", "stored"]
    layer = open_layer(path)
    for offset in (C, C + C // 2 - 2, 2 * C - 4096, C + 40000):
        assert layer.read(offset, 10) == raw[offset : offset + 10]
    assert open_layer(path).read(2 * C - 100, 100) == raw[-100:]


def test_a_damaged_stored_block_header_is_reported(
    open_layer: Callable[..., Any], tmp_path: Path
) -> None:
    """Stored 256 KiB chunk, five blocks; block 2's header damaged (its NLEN): a read that
    needs it raises, naming the chunk; a read before it returns the bytes (as a partial
    inflate does without verify); with verify any read of the chunk raises."""
    size = 4 * C
    raw = randbytes(2 * size, 3)
    path = write_members(tmp_path / "s.mem.gz", size, [raw[:size], raw[size:]])
    with open(path, "rb") as f:
        index = read_index(f)
    assert index is not None
    chunk = index.chunks[1]
    blob = bytearray(path.read_bytes())
    blob[chunk.gz_offset + DATA_HEADER_SIZE + 2 * (STORED_MAX + 5) + 3] ^= 0x01
    path.write_bytes(bytes(blob))
    assert open_layer(path).read(size + 100, 4096) == raw[size + 100 : size + 4196]
    for offset in (size + 3 * STORED_MAX, size + 2 * STORED_MAX - 10):
        with pytest.raises(CorruptChunkError) as exc:
            open_layer(path).read(offset, 4096)
        assert exc.value.fields["number"] == 1
    with pytest.raises(CorruptChunkError):
        open_layer(path, verify=True).read(size + 100, 4096)


def test_a_truncated_stored_chunk_is_reported(
    open_layer: Callable[..., Any], tmp_path: Path
) -> None:
    raw = randbytes(2 * C, 4)
    path = write_members(tmp_path / "s.mem.gz", C, [raw[:C], raw[C:]])
    layer = open_layer(path)
    with open(path, "r+b") as f:  # the second member's bytes, gone (the index read before)
        f.truncate(C + 2 * DATA_HEADER_SIZE + 100)
    with pytest.raises(CorruptChunkError) as exc:
        layer.read(C + 8192, 4096)
    assert exc.value.fields["number"] == 1


def test_a_zero_chunk_is_what_its_index_says_and_verify_checks_it(
    open_layer: Callable[..., Any], tmp_path: Path
) -> None:
    """The documented choice: without verify, a chunk whose index SHA-256 is that of
    zeros reads as zeros without inflating (the index is checked against the trailer and
    the Merkle root when opened: those are the bytes the dump attests); its member header
    is still checked. With verify it is inflated and checked like any chunk, so a member
    that does not hold what the index says is reported."""
    ones = b"\x01" * C
    liar = member(1, ones, zlib.compress(ones, 1)[2:-4], claims=bytes(C))
    path = write_members(tmp_path / "z.mem.gz", C, [text(C, 1), liar, bytes(C)])
    assert kinds(path) == ["compressed", "zero", "zero"]
    assert open_layer(path).read(C + 5, 4096) == bytes(4096)
    with pytest.raises(CorruptChunkError) as exc:
        open_layer(path, verify=True).read(C + 5, 4096)
    assert exc.value.fields["number"] == 1
    assert open_layer(path, verify=True).read(2 * C + 5, 10) == bytes(10)
    # A damaged member header is reported without verify too.
    with open(path, "rb") as f:
        index = read_index(f)
    assert index is not None
    blob = bytearray(path.read_bytes())
    blob[index.chunks[2].gz_offset + 16] ^= 0x01  # the chunk number in the MD subfield
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptChunkError) as exc:
        open_layer(path).read(2 * C + 5, 10)
    assert exc.value.fields["number"] == 2


def test_inflating_past_the_chunk_size_stops_early(
    open_layer: Callable[..., Any], tmp_path: Path
) -> None:
    """A member whose deflate data inflates to 64 MiB for a 64 KiB chunk (a decompression
    bomb, CRC and size fields claiming 64 KiB) is reported without inflating it all."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate = bomb.compress(bytes(64 << 20)) + bomb.flush()
    fake = member(0, text(C, 2), deflate)
    path = write_members(tmp_path / "b.mem.gz", C, [fake, text(C, 3)])
    layer = open_layer(path)
    tracemalloc.start()
    try:
        for offset in (100, C - 4096):
            with pytest.raises(CorruptChunkError):
                layer.read(offset, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert layer.read(C + 10, 10) == text(C, 3)[10:20]
