"""Kernel banner candidates found in the stream (memdump.bannerscan), and the post-capture
check that confirms them instead of scanning the whole image (issue 14, item 6)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from memdump import analysis, bannerscan, volatility
from memdump.analysis import analyze
from memdump.bannerscan import BannerScan
from memdump.pipeline import write_dump
from tests.helpers.elfgen import make_core
from tests.helpers.sources import FakeSource

PDB = b"RSDS" + bytes(range(16)) + struct.pack("<I", 3) + b"ntkrnlmp.pdb\x00"


def _feed(data: bytes, size: int) -> BannerScan:
    scan = BannerScan()
    for at in range(0, len(data), size):
        piece = bytearray(data[at : at + size])
        scan.feed(piece, len(piece), at)
    return scan


@pytest.mark.parametrize("size", [7, 64, 100, 4096, 1 << 20])
def test_every_match_is_found_once_whatever_the_buffers(size: int) -> None:
    data = bytearray(300_000)
    where = {
        10: b"Linux version 6.1.0",
        5_000: b"Darwin Kernel Version 23.1.0",
        65_530: b"Linux version 5.10.0",  # across 64 KiB and 4 KiB buffers
        99_990: PDB,  # across 100-byte buffers
        200_000: b"Linux version 4.19.0",
        299_950: b"RSDS" + bytes(20) + b"ntoskrnl.pdb\x00",
    }
    for at, text in where.items():
        data[at : at + len(text)] = text
    other = b"RSDS" + bytes(20) + b"notakern.pdb\x00"  # not a kernel name
    data[150_000 : 150_000 + len(other)] = other
    scan = _feed(bytes(data), size)
    assert scan.unix == [10, 5_000, 65_530, 200_000]
    assert scan.windows == [99_990, 299_950]
    assert not scan.overflow


def test_too_many_candidates_give_up_rather_than_miss_one() -> None:
    data = b"Linux version " * (bannerscan.MAX_CANDIDATES + 1)
    scan = _feed(data, 1 << 20)
    assert scan.overflow and len(scan.unix) == bannerscan.MAX_CANDIDATES


def test_buffers_must_come_in_order() -> None:
    scan = BannerScan()
    scan.feed(bytearray(10), 10, 0)
    with pytest.raises(ValueError):
        scan.feed(bytearray(10), 10, 20)


def test_the_pdb_names_are_volatilitys() -> None:
    vol = volatility.load()
    assert [n.decode() for n in bannerscan.KERNEL_PDB_NAMES] == vol.kernel_module_names


DEBIAN = b"Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) #1 SMP Debian\n\x00"


def _planted() -> bytes:
    mem = bytearray(6 << 20)
    plants = {
        0x1000: DEBIAN,
        0x5000: b"Darwin Kernel Version 23.1.0: Mon Oct  9 21:27:24 PDT 2023\x00",
        0x7000: b"Linux version 5.10.0-8-amd64 with a bad char \x01 in it\x00",  # rejected
        0xB000: b"Linux version 6 no dotted number\x00",  # no regex match
        (4 << 20) - 6: b"Linux version 6.6.6-edge (across the pipeline buffers) #1\n\x00",
        (5 << 20) + 0x3000: DEBIAN,  # a duplicate
        0x20000: PDB,
        (4 << 20) + 0x6000: b"RSDS"
        + bytes(range(1, 17))
        + struct.pack("<I", 1)
        + b"ntoskrnl.pdb\x00",
    }
    for at, text in plants.items():
        mem[at : at + len(text)] = text
    return make_core([(0, bytes(mem[: 1 << 20])), (2 << 20, bytes(mem[1 << 20 :]))])


def test_the_check_from_stream_candidates_lists_what_the_full_scan_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = _planted()
    scan = BannerScan()
    res = write_dump(FakeSource(core), tmp_path, "p.mem.gz", chunk_size=64 << 10, scan=scan)
    assert len(scan.unix) >= 5 and len(scan.windows) == 2
    full = analyze(res.path)
    read_back: list[int] = []
    real = analysis._check_chunks
    monkeypatch.setattr(
        analysis, "_check_chunks", lambda f, i, done: read_back.append(1) or real(f, i, done)
    )
    quick = analyze(res.path, stream_scan=scan, hashed_as_written=True)
    assert full.status == quick.status == "passed", (full.detail, quick.detail)
    assert quick.banners == full.banners
    assert quick.banners[0] == DEBIAN.rstrip(b"\n\x00").decode()
    assert "Linux version 6.6.6-edge (across the pipeline buffers) #1" in quick.banners
    assert [b for b in quick.banners if ".pdb|" in b] == [
        b for b in full.banners if ".pdb|" in b
    ] and len([b for b in full.banners if ".pdb|" in b]) == 2
    assert read_back == []  # the chunks nobody read were hashed as they were written
    assert "(confirmed from the stream scan)" in quick.detail
    assert "stream scan" not in full.detail


def test_an_overflowing_stream_scan_falls_back_to_the_full_scan(tmp_path: Path) -> None:
    core = _planted()
    scan = BannerScan()
    res = write_dump(FakeSource(core), tmp_path, "o.mem.gz", chunk_size=64 << 10, scan=scan)
    scan.overflow = True
    scan.unix.clear()
    assert analyze(res.path, stream_scan=scan).banners == analyze(res.path).banners


def test_the_native_search_is_used_here_and_finds_what_bytes_find_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libc's memmem runs without the GIL: a silent fallback to bytes.find would give the
    # CPU of every capture back to the scan.
    assert bannerscan._memmem is not None
    rnd = random.Random(14)
    data = bytearray(rnd.randbytes(3 << 20))
    for at in sorted(rnd.sample(range(len(data) - 64), 40)):
        data[at : at + len(PDB)] = rnd.choice(
            (PDB, b"Linux version 6.1", b"Darwin Kernel Version 2", b"RSDS", b"Linux versio")
        )
    native = _feed(bytes(data), 1 << 20)
    monkeypatch.setattr(bannerscan, "_memmem", None)
    python = _feed(bytes(data), 1 << 20)
    assert native.unix == python.unix and native.windows == python.windows
    assert len(native.unix) >= 5 and len(native.windows) >= 3


def test_a_buffer_full_of_rsds_without_a_kernel_name_still_finds_the_one_that_is() -> None:
    data = bytearray(b"RSDS" * ((1 << 20) // 4))
    data[-len(PDB) - 8 : -8] = PDB
    scan = _feed(bytes(data), 1 << 20)
    assert scan.windows == [len(data) - len(PDB) - 8] and not scan.overflow
