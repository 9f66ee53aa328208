"""Issue 14 items 3 and 6: memdump's post-capture Volatility check reads a chunked .mem.gz
through memdump's chunked layer, without a decompressed temporary copy, with the same
results as on the single-stream dump of the same image (layer, guest bytes, sampled
pages, banners, expected values), and a damaged chunk anywhere still fails the check,
named with its guest-physical range. Single-stream dumps keep the old path."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from memdump import analysis
from memdump.analysis import analyze
from memdump.chunkedgz import TRAILER_SIZE
from memdump.elfcore import parse_core
from tests.helpers.audit import audited, written
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

BANNER = (
    b"Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian "
    b"12.2.0-14) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)\n\x00"
)
MARKER = b"MEMDUMP-MARKER-vm-web-01-4f1c2a"
MARKER_PADDR = 0x123456
HIGH = 0x100000


def image(edge_banner: bool = False) -> bytes:
    low = bytearray(mixed_bytes(640 << 10, seed=1))
    low[0x9000 : 0x9000 + len(BANNER)] = BANNER
    high = bytearray(mixed_bytes(4 << 20, seed=2))
    high[0x80000:0x380000] = bytes(3 << 20)
    at = MARKER_PADDR - HIGH
    high[at : at + len(MARKER)] = MARKER
    if edge_banner:  # a second banner across a chunk edge of the file
        core = make_core([(0, bytes(low)), (HIGH, bytes(high))])
        layout = parse_core(core)
        assert layout is not None
        edge = -(-(layout.segments[-1].offset + 0x40000) // SMALL_CHUNK) * SMALL_CHUNK
        paddr = HIGH + edge - layout.segments[-1].offset - 20
        other = b"Linux version 6.6.6-edge (across a chunk edge) #1\n\x00"
        high[paddr - HIGH : paddr - HIGH + len(other)] = other
    return make_core([(0, bytes(low)), (HIGH, bytes(high))])


@pytest.fixture
def dump_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dumps"
    d.mkdir()
    return d


@pytest.fixture
def good(dump_dir: Path) -> Path:
    return write_chunked(dump_dir / "vm-web-01_20260101T000000Z.mem.gz", image())


def leftovers(directory: Path, dump: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p != dump)


@pytest.fixture
def no_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked path must never decompress the dump into a temporary copy."""

    def boom(*_a: Any) -> Any:
        raise AssertionError("decompressed copy made")

    monkeypatch.setattr(analysis, "_decompress", boom)


def test_chunked_dump_passes_in_place(good: Path, no_copy: None) -> None:
    a = analyze(good, expect={MARKER_PADDR: MARKER})
    assert a.status == "passed", a.detail
    assert a.layer == "Elf64Layer"
    assert "Elf64Layer over ChunkedGzipLayer" in a.detail
    assert a.physical_bytes == (640 << 10) + (4 << 20)
    assert a.pages_checked == 32
    assert a.banners == [BANNER.rstrip(b"\n\x00").decode()]
    assert "1 expected values" in a.detail
    assert leftovers(good.parent, good) == []


@pytest.mark.parametrize("banners", [True, False])
def test_same_results_as_the_single_stream_dump(
    dump_dir: Path, banners: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = image(edge_banner=True)
    old = analyze(write_single_stream(dump_dir / "old.mem.gz", raw), banners=banners)
    new_dump = write_chunked(dump_dir / "new.mem.gz", raw)
    sampled: list[list[tuple[int, int]]] = []
    real = analysis._sample_pages

    def spy(*args: Any) -> list[tuple[int, int]]:
        sampled.append(real(*args))
        return sampled[-1]

    monkeypatch.setattr(analysis, "_sample_pages", spy)
    new = analyze(new_dump, banners=banners)
    old_again = analyze(dump_dir / "old.mem.gz", banners=banners)
    assert old.status == new.status == "passed", (old.detail, new.detail)
    for field in ("layer", "physical_bytes", "pages_checked", "banners", "volatility_version"):
        assert getattr(new, field) == getattr(old, field), field
    assert "over ChunkedGzipLayer" in new.detail and "over FileLayer" in old.detail
    assert sampled[0] == sampled[1]  # the same pages compared
    assert old_again.banners == old.banners
    if banners:
        assert len(new.banners) == 2 and "across a chunk edge" in new.banners[1]


@pytest.mark.parametrize("banners", [True, False])
def test_a_damaged_chunk_nobody_reads_still_fails(
    dump_dir: Path, banners: bool, no_copy: None
) -> None:
    raw = image()
    dump = write_chunked(dump_dir / "x.mem.gz", raw)
    layout = parse_core(raw)
    assert layout is not None
    # A chunk inside the big block (no sampled page: samples=2 takes the blocks' first
    # pages; no banner), of random bytes: a flip in a run of zeros' deflate data can
    # still inflate to zeros (a changed match distance).
    seg = layout.segments[-1]
    bad = next(
        c
        for c in chunks(dump)
        if c.raw_offset >= seg.offset + 0x380000
        and len(set(raw[c.raw_offset : c.raw_offset + c.raw_size])) == 256
    )
    flip_in_member(dump, bad)
    a = analyze(dump, samples=2, banners=banners)
    assert a.status == "failed", a.detail
    assert a.layer == "Elf64Layer"  # Volatility opened it; the chunk pass found it
    assert "gzip" in a.detail and f"chunk {bad.number} " in a.detail
    lo = seg.paddr + bad.raw_offset - seg.offset
    assert f"guest-physical 0x{lo:x}-0x{lo + bad.raw_size:x}" in a.detail
    assert leftovers(dump_dir, dump) == []


def test_a_damaged_chunk_under_a_sampled_page_fails(dump_dir: Path) -> None:
    raw = image()
    dump = write_chunked(dump_dir / "x.mem.gz", raw)
    layout = parse_core(raw)
    assert layout is not None
    offset = layout.offset_of(MARKER_PADDR)
    assert offset is not None
    flip_in_member(dump, chunk_at(dump, offset))
    a = analyze(dump, banners=False, expect={MARKER_PADDR: MARKER})
    assert a.status == "failed" and "is corrupt" in a.detail


def test_a_damaged_index_fails(dump_dir: Path) -> None:
    dump = write_chunked(dump_dir / "x.mem.gz", image())
    blob = bytearray(dump.read_bytes())
    index_at = chunks(dump)[-1].gz_offset + chunks(dump)[-1].gz_size
    blob[index_at + 40] ^= 0x01  # inside the first index entry
    dump.write_bytes(bytes(blob))
    a = analyze(dump)
    assert a.status == "failed"
    assert "chunked gzip" in a.detail and "index" in a.detail
    assert a.layer is None


@pytest.mark.parametrize(("cut", "why"), [(5000, "cut short"), (-4096, "followed by extra data")])
def test_image_size_against_the_elf_headers(dump_dir: Path, cut: int, why: str) -> None:
    raw = image()
    body = raw[: len(raw) - cut] if cut > 0 else raw + bytes(-cut)
    a = analyze(write_chunked(dump_dir / "x.mem.gz", body), banners=False)
    assert a.status == "failed" and why in a.detail and str(len(raw)) in a.detail
    assert "in the chunked image" in a.detail  # read through the index, not gunzipped


def test_not_an_elf_core(dump_dir: Path) -> None:
    a = analyze(write_chunked(dump_dir / "x.mem.gz", b"not a memory image\n" * 10000))
    assert a.status == "failed" and "not an ELF core" in a.detail and a.layer is None


def test_wrong_expectation_fails(good: Path) -> None:
    a = analyze(good, expect={MARKER_PADDR + 1: MARKER}, banners=False)
    assert a.status == "failed" and "0x123457" in a.detail
    assert a.layer == "Elf64Layer"


def test_nothing_is_written(good: Path) -> None:
    analyze(good, samples=1, banners=False)  # first use in this process done
    with audited() as events:
        a = analyze(good, expect={MARKER_PADDR: MARKER})
    assert a.status == "passed", a.detail
    opened = [args for event, args in events if event == "open"]
    assert any(str(args[0]) == str(good.absolute()) for args in opened)  # it did read
    assert not [e for e in events if e[0].startswith("socket.")]
    assert written(events) == []


def test_trailer_only_damage_is_not_mistaken_for_an_old_dump(dump_dir: Path) -> None:
    """A broken trailer version is refused (not read as a single stream)."""
    dump = write_chunked(dump_dir / "x.mem.gz", image())
    blob = bytearray(dump.read_bytes())
    version_at = len(blob) - TRAILER_SIZE + 16 + 4  # after the MT subfield header and magic
    assert blob[version_at - 4 : version_at] == b"MDGZ"
    struct.pack_into("<B", blob, version_at, 9)
    dump.write_bytes(bytes(blob))
    a = analyze(dump)
    assert a.status == "failed" and "version 9" in a.detail
