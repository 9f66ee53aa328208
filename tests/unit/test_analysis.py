"""memdump.analysis on synthetic QEMU-style cores (tests/helpers/elfgen.py): Volatility 3 must
stack its ELF layer and read the same bytes memdump's parser locates."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from isal import isal_zlib

from memdump import analysis, volatility
from memdump.analysis import PAGE, Analysis, analyze
from memdump.elfcore import parse_core
from tests.helpers.audit import audited, written
from tests.helpers.elfgen import PHDR, make_core, mixed_bytes

# memdump.analysis installs this filter process-wide on first use, but pytest restores the
# warning filters after each test, and which test first validates a symbol file with
# jsonschema depends on the user's ~/.cache/volatility3 (a cached hash skips validation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:volatility3")

DEBIAN_BANNER = (
    b"Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian "
    b"12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC "
    b"Debian 6.1.119-1 (2024-11-22)\n\x00"
)
MARKER = b"MEMDUMP-MARKER-vm-web-01-4f1c2a"
MARKER_PADDR = 0x123456  # inside the second RAM block, not page aligned


def gz(data: bytes) -> bytes:
    comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def ram() -> list[tuple[int, bytes]]:
    """Two RAM blocks as a small x86 guest has them: low memory and RAM above 1 MiB,
    with a banner, a marker and a 3 MiB run of zeros (holes in the decompressed copy)."""
    low = bytearray(mixed_bytes(640 << 10, seed=1))
    low[0x9000 : 0x9000 + len(DEBIAN_BANNER)] = DEBIAN_BANNER
    high = bytearray(mixed_bytes(4 << 20, seed=2))
    high[0x80000:0x380000] = bytes(3 << 20)
    at = MARKER_PADDR - 0x100000
    high[at : at + len(MARKER)] = MARKER
    return [(0, bytes(low)), (0x100000, bytes(high))]


def write_dump(directory: Path, core: bytes, name: str = "vm-web-01_20250101T000000Z") -> Path:
    path = directory / f"{name}.mem.gz"
    path.write_bytes(gz(core))
    return path


@pytest.fixture
def dump_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dumps"
    d.mkdir()
    return d


@pytest.fixture
def good(dump_dir: Path) -> Path:
    return write_dump(dump_dir, make_core(ram()))


def leftovers(directory: Path, dump: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p != dump)


# -- a good dump -----------------------------------------------------------------------


def test_good_core_passes(good: Path) -> None:
    a = analyze(good)
    assert a.status == "passed", a.detail
    assert a.layer == "Elf64Layer"
    assert a.physical_bytes == (640 << 10) + (4 << 20)
    assert a.pages_checked == 32
    assert a.banners == [DEBIAN_BANNER.rstrip(b"\n\x00").decode()]
    assert a.volatility_version.startswith("2.")
    assert "Elf64Layer over FileLayer" in a.detail
    assert 0 < a.seconds < 30
    d = a.to_dict()
    assert d["status"] == "passed" and d["banners"] == a.banners
    assert Analysis(**d) == a
    assert leftovers(good.parent, good) == []


def test_physical_bytes_equal_memdumps_reading(dump_dir: Path) -> None:
    core = make_core([(0, b"a" * 5000), (0x10000, b"b" * 3 * PAGE), (0x40000000, b"c" * 100)])
    layout = parse_core(core)
    assert layout is not None
    a = analyze(write_dump(dump_dir, core), banners=False)
    assert a.status == "passed", a.detail
    assert a.physical_bytes == layout.memory_bytes == 5000 + 3 * PAGE + 100
    assert a.banners == []
    # Fewer distinct pages than asked for: each is checked once.
    assert a.pages_checked == 2 + 3 + 1


def test_expected_marker_read_back(good: Path) -> None:
    a = analyze(good, expect={MARKER_PADDR: MARKER, 0x9000: b"Linux version 6.1.0"})
    assert a.status == "passed", a.detail
    assert "2 expected values" in a.detail


@pytest.mark.parametrize(
    ("expect", "why"),
    [
        ({MARKER_PADDR: b"MEMDUMP-MARKER-vm-db-01-000000"}, "0x123456"),
        ({MARKER_PADDR + 1: MARKER}, "0x123457"),
        ({0xA0000: b"x"}, "not in the image"),  # the VGA hole between the two blocks
        ({0x100000 + (4 << 20) - 2: b"abcd"}, "not in the image"),  # runs off the end
    ],
)
def test_wrong_expectation_fails(good: Path, expect: dict[int, bytes], why: str) -> None:
    a = analyze(good, expect=expect, banners=False)
    assert a.status == "failed"
    assert why in a.detail
    assert a.layer == "Elf64Layer"  # it did open; the content is wrong
    assert leftovers(good.parent, good) == []


def test_no_banner_is_not_a_failure(dump_dir: Path) -> None:
    a = analyze(write_dump(dump_dir, make_core([(0, mixed_bytes(1 << 20, seed=5))])))
    assert a.status == "passed", a.detail
    assert a.banners == []


# -- sampling --------------------------------------------------------------------------


def test_samples_cover_both_ends_of_every_block() -> None:
    core = make_core(
        [(0, bytes(640 << 10)), (0x100000, bytes(8 << 20)), (0x1_0000_0000, bytes(PAGE + 1))]
    )
    layout = parse_core(core)
    assert layout is not None
    pages = analysis._sample_pages(layout, 32)
    assert pages == analysis._sample_pages(layout, 32)  # deterministic
    assert len(pages) == 32 and pages == sorted(pages)
    starts = [p for p, _ in pages]
    for first, last in [(0, 0x9F000), (0x100000, 0x8FF000), (0x1_0000_0000, 0x1_0000_1000)]:
        assert first in starts and last in starts
    assert (0x1_0000_1000, 1) in pages  # a partial last page is read as far as it goes
    middle = [p for p in starts if 0x100000 < p < 0x8FF000]
    assert len(middle) > 20  # the rest spread over the big block
    assert analysis._sample_pages(layout, 0) == []
    assert len(analysis._sample_pages(layout, 4)) == 4  # fewer samples than block ends


def test_samples_zero_checks_no_pages(good: Path) -> None:
    a = analyze(good, samples=0, banners=False)
    assert a.status == "passed" and a.pages_checked == 0


# -- corruption --------------------------------------------------------------------------


def test_flipped_byte_in_gzip_fails(dump_dir: Path) -> None:
    dump = write_dump(dump_dir, make_core(ram()))
    blob = bytearray(dump.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    dump.write_bytes(blob)
    a = analyze(dump)
    assert a.status == "failed"
    assert "gzip" in a.detail
    assert leftovers(dump_dir, dump) == []


def test_flipped_byte_in_memory_needs_a_reference(dump_dir: Path) -> None:
    """A bit flipped before compression leaves a well-formed image: only a known value
    (or the capture's SHA-256) can tell."""
    core = bytearray(make_core(ram()))
    layout = parse_core(bytes(core))
    assert layout is not None
    off = layout.offset_of(MARKER_PADDR)
    assert off is not None
    core[off] ^= 0x20
    dump = write_dump(dump_dir, bytes(core))
    assert analyze(dump, banners=False).status == "passed"
    a = analyze(dump, banners=False, expect={MARKER_PADDR: MARKER})
    assert a.status == "failed" and "0x123456" in a.detail


def test_truncated_gzip_fails(dump_dir: Path) -> None:
    dump = write_dump(dump_dir, make_core(ram()))
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    a = analyze(dump)
    assert a.status == "failed"
    assert "not a valid gzip stream" in a.detail
    assert leftovers(dump_dir, dump) == []


def test_core_cut_short_inside_valid_gzip_fails(dump_dir: Path) -> None:
    core = make_core(ram())
    a = analyze(write_dump(dump_dir, core[: len(core) - 5000]))
    assert a.status == "failed"
    assert "cut short" in a.detail and str(len(core)) in a.detail


def test_core_with_trailing_data_fails(dump_dir: Path) -> None:
    a = analyze(write_dump(dump_dir, make_core(ram()) + b"\x00" * 4096))
    assert a.status == "failed" and "extra data" in a.detail


@pytest.mark.parametrize(
    ("content", "compress", "why"),
    [
        (b"just some text, not a memory image\n" * 1000, True, "not an ELF core"),
        (b"\x7fELF\x01\x01\x01" + bytes(100), True, "not an ELF core"),  # 32-bit
        (b"\x7fELF", True, "too short"),
        (b"", True, "too short"),
        (make_core([(0, b"x" * PAGE)]), False, "not a valid gzip stream"),  # not gzipped
    ],
)
def test_not_an_elf_core_fails(dump_dir: Path, content: bytes, compress: bool, why: str) -> None:
    dump = dump_dir / "x.mem.gz"
    dump.write_bytes(gz(content) if compress else content)
    a = analyze(dump)
    assert a.status == "failed"
    assert why in a.detail
    assert a.layer is None
    assert leftovers(dump_dir, dump) == []


def test_volatility_disagreeing_with_the_headers_fails(dump_dir: Path) -> None:
    """A PT_LOAD whose memory size differs from its file size: Volatility skips it,
    memdump counts it. Neither reading is 'wrong', but the image is not what we think."""
    core = bytearray(make_core([(0, mixed_bytes(65536, 1)), (0x100000, mixed_bytes(65536, 2))]))
    phoff = struct.unpack_from("<Q", core, 32)[0]
    struct.pack_into("<Q", core, phoff + 2 * PHDR.size + 40, 2 * 65536)  # p_memsz, 2nd LOAD
    a = analyze(write_dump(dump_dir, bytes(core)), banners=False)
    assert a.status == "failed"
    assert "maps 65536 bytes" in a.detail and "131072" in a.detail


def test_unsorted_blocks_fail(dump_dir: Path) -> None:
    # Volatility's ELF layer bisects its segments as the file lists them.
    core = make_core([(0x100000, mixed_bytes(65536, 1)), (0, mixed_bytes(65536, 2))])
    a = analyze(write_dump(dump_dir, core), banners=False)
    assert a.status == "failed"


def test_no_memory_fails(dump_dir: Path) -> None:
    a = analyze(write_dump(dump_dir, make_core([])))
    assert a.status == "failed"
    assert "no memory image format" in a.detail and "No ELF segments" in a.detail


def test_missing_file_is_an_error(dump_dir: Path) -> None:
    a = analyze(dump_dir / "nope.mem.gz")
    assert a.status == "error"
    assert "not found" in a.detail
    assert list(dump_dir.iterdir()) == []


def test_no_room_for_the_copy_is_an_error(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    def tiny(path: Any) -> Any:
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, 0, 0, 1, *tuple(st)[5:]))

    monkeypatch.setattr(os, "statvfs", tiny)  # the module analysis calls it through
    a = analyze(good)
    assert a.status == "error" and "not enough space" in a.detail
    assert leftovers(good.parent, good) == []


# -- the temporary copy ------------------------------------------------------------------


def _locked(directory: Path) -> bool:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Look at the temporary copy just before Volatility opens it."""
    found: dict[str, Any] = {}
    real = analysis._stack

    def spy(vol: Any, ctx: Any, core: Path, layout: Any, progress: Any) -> Any:
        st = core.stat()
        found.update(
            core=core,
            file_mode=stat.S_IMODE(st.st_mode),
            dir_mode=stat.S_IMODE(core.parent.stat().st_mode),
            size=st.st_size,
            allocated=st.st_blocks * 512,
            offline=vol.constants.OFFLINE,
            locked=_locked(core.parent),
        )
        return real(vol, ctx, core, layout, progress)

    monkeypatch.setattr(analysis, "_stack", spy)
    yield found


def test_temp_copy_is_private_sparse_and_removed(good: Path, seen: dict[str, Any]) -> None:
    a = analyze(good)
    assert a.status == "passed", a.detail
    core: Path = seen["core"]
    assert core.parent.parent == good.parent  # default work_dir: the dump's directory
    assert seen["file_mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert core.parent.name.startswith(analysis.TEMP_PREFIX)
    assert seen["locked"]  # a cleaner can see it is in use
    assert seen["size"] == len(make_core(ram()))
    # The two whole MiBs of the file inside the zero run were skipped, not written.
    assert seen["allocated"] <= seen["size"] + PAGE - (2 << 20)
    assert not core.parent.exists()
    assert leftovers(good.parent, good) == []


def test_relative_paths(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(good.parent.parent)
    a = analyze(Path(good.parent.name) / good.name, work_dir=Path(good.parent.name))
    assert a.status == "passed", a.detail
    assert leftovers(good.parent, good) == []


def test_work_dir_and_removal_after_failure(
    good: Path, tmp_path: Path, seen: dict[str, Any]
) -> None:
    work = tmp_path / "scratch dir %41 #1"  # the copy is opened through a file:// URI
    work.mkdir()
    a = analyze(good, work_dir=work, expect={MARKER_PADDR: b"wrong"})
    assert a.status == "failed"
    assert seen["core"].parent.parent == work
    assert list(work.iterdir()) == []
    assert leftovers(good.parent, good) == []


def test_temp_dir_removed_when_volatility_crashes(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: Any) -> Any:
        raise RuntimeError("volatility blew up")

    monkeypatch.setattr(analysis, "_cross_check", boom)
    a = analyze(good)
    assert a.status == "error" and "volatility blew up" in a.detail
    assert leftovers(good.parent, good) == []


def test_concurrent_checks(dump_dir: Path) -> None:
    """Captures run as threads of one worker; each check has its own context."""
    from concurrent.futures import ThreadPoolExecutor

    from volatility3.framework import constants

    dumps = [write_dump(dump_dir, make_core(ram()), name=f"vm-{i}_x") for i in range(3)]
    bad = write_dump(dump_dir, make_core([]), name="vm-bad_x")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: analyze(p, expect={MARKER_PADDR: MARKER}), dumps + [bad]))
    assert [r.status for r in results] == ["passed"] * 3 + ["failed"]
    assert all(r.banners == results[0].banners != [] for r in results[:3])
    assert constants.OFFLINE is False
    assert sorted(p.name for p in dump_dir.iterdir()) == sorted(p.name for p in dumps + [bad])


# -- volatility as a library -------------------------------------------------------------


def test_offline_while_running_only(good: Path, seen: dict[str, Any]) -> None:
    from volatility3.framework import constants

    assert analyze(good, banners=False).status == "passed"
    assert seen["offline"] is True
    assert constants.OFFLINE is False  # its urllib opener would refuse everyone's http


def test_no_network_and_no_writes_outside_the_temp_dir(good: Path) -> None:
    analyze(good, samples=1, banners=False)  # first use in this process done
    with audited() as events:
        a = analyze(good, expect={MARKER_PADDR: MARKER})
    assert a.status == "passed", a.detail
    assert not [e for e in events if e[0].startswith("socket.")]
    urls = [str(e[1][0]) for e in events if e[0] == "urllib.Request"]
    assert urls and all(u.startswith("file:") for u in urls)
    writes = [(e, path) for e, path in written(events) if good.parent not in Path(path).parents]
    assert writes == []
    # The hook does see writes: our own temporary copy.
    assert any(str(args[0]).endswith("core.elf") for event, args in events if event == "open")


def test_volatility_debug_logging_is_quiet(good: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(1)
    assert analyze(good).status == "passed"
    assert [r for r in caplog.records if r.name.startswith("volatility3")] == []


# -- banners ---------------------------------------------------------------------------


def test_fast_banners_match_the_stock_plugin(tmp_path: Path) -> None:
    """Our prefix-search variant must find what Volatility's own plugin finds."""
    size = (16 << 20) + (2 << 20)  # more than one 16 MiB scan chunk
    mem = bytearray(size)
    banners_at = {
        0x1000: DEBIAN_BANNER,
        0x5000: b"Darwin Kernel Version 23.1.0: Mon Oct  9 21:27:24 PDT 2023\x00",
        0x7000: b"Linux version 5.10.0-8-amd64 with a bad char \x01 in it\x00",  # rejected
        0x9000: b"Linux version 5.10.0 has no terminator" + b"x" * 0x1000,  # rejected
        0xB000: b"Linux version 6 no dotted number\x00",  # no regex match
        0xD000: b"Linux version 4.19.0-1 (first) #1\x00Linux version 4.19.0-2 (second)\x00",
        (16 << 20) - 20: b"Linux version 6.6.6-chunk (across the chunk edge) #1\n\x00",
        (16 << 20) + 0x3000: DEBIAN_BANNER,  # a duplicate
        # Windows kernels' PDB records (CodeView RSDS: GUID, age, name), found in the same
        # pass and listed after the others; one in the second 16 MiB scan window.
        0x20000: b"RSDS" + bytes(range(16)) + struct.pack("<I", 3) + b"ntkrnlmp.pdb\x00",
        (16 << 20) + 0x6000: b"RSDS"
        + bytes(range(1, 17))
        + struct.pack("<I", 1)
        + b"ntoskrnl.pdb\x00",
        0x30000: b"RSDS" + bytes(16) + struct.pack("<I", 1) + b"notakernel.pdb\x00",  # no
    }
    for at, text in banners_at.items():
        mem[at : at + len(text)] = text
    core = tmp_path / "core.elf"
    core.write_bytes(make_core([(0, bytes(mem[: 1 << 20])), (2 << 20, bytes(mem[1 << 20 :]))]))
    layout = parse_core(core.read_bytes())
    assert layout is not None
    vol = volatility.load()
    ctx = vol.contexts.Context()
    name = analysis._stack(vol, ctx, core, layout, analysis._Progress())
    try:
        fast = volatility.banners(vol, ctx, name)
        stock = volatility.banners(vol, ctx, name, stock=True)
    finally:
        for layer in list(ctx.layers):
            ctx.layers[layer].destroy()
    assert fast == stock
    fast_windows = [b for b in fast if ".pdb|" in b]
    stock_windows = [b for b in stock if ".pdb|" in b]
    assert fast[: len(fast) - len(fast_windows)] == [
        DEBIAN_BANNER.rstrip(b"\n\x00").decode(),
        "Darwin Kernel Version 23.1.0: Mon Oct  9 21:27:24 PDT 2023",
        "Linux version 4.19.0-1 (first) #1",
        "Linux version 4.19.0-2 (second)",
        "Linux version 6.6.6-chunk (across the chunk edge) #1",
    ]
    assert [b.split("|")[0] for b in fast_windows] == ["ntkrnlmp.pdb", "ntoskrnl.pdb"]
    assert fast_windows == stock_windows


def test_banner_at_the_end_of_a_block(dump_dir: Path) -> None:
    # The stock plugin raises here (it reads 4 KiB past the banner); ours pads.
    banner = b"Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) #1 SMP\n\x00"
    block = bytearray(2 * PAGE)
    block[-len(banner) :] = banner
    a = analyze(write_dump(dump_dir, make_core([(0, bytes(block)), (0x100000, bytes(PAGE))])))
    assert a.status == "passed", a.detail
    assert a.banners == [banner.rstrip(b"\n\x00").decode()]


def test_banners_plugin_crash_is_an_error_unless_the_dump_failed(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: Any, **_kw: Any) -> list[str]:
        raise RuntimeError("plugin bug")

    monkeypatch.setattr(volatility, "banners", boom)
    a = analyze(good)
    assert a.status == "error" and "plugin bug" in a.detail
    assert a.layer == "Elf64Layer" and a.pages_checked == 32
    b = analyze(good, expect={MARKER_PADDR: b"wrong"})
    assert b.status == "failed" and "0x123456" in b.detail
    assert analyze(good, banners=False).status == "passed"
