"""tests/helpers/elf_compare, the byte-exact comparison of a live core with a paused dump
(issue 12, item 5), on small synthetic cores: it accepts what may differ (p_offset and
data order, e_ehsize, notes) and fails on what may not (one byte of one PT_LOAD, a
PT_LOAD header, the ELF header, a core shorter than its headers declare)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from memdump.livecore import NT_MEMDUMP_LIVE
from tests.helpers.elf_compare import (
    assert_notes_as_documented,
    compare_stream_with_file,
)

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
RNG = random.Random(12)
# (paddr, bytes): low RAM, a BIOS-like block, and RAM above 4 GiB.
LOADS = [
    (0x0, RNG.randbytes(40_000)),
    (0xFFFF0000, RNG.randbytes(4096)),
    (1 << 32, RNG.randbytes(70_001)),
]


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def core(
    loads: list[tuple[int, bytes]],
    order: list[int],
    *,
    ehsize: int = 64,
    notes: bytes = b"",
    machine: int = 62,
) -> bytes:
    """An ELF64 core: header, PT_NOTE + one PT_LOAD per ``loads`` (in that order), the
    notes, then the loads' data in file order ``order``."""
    phnum = 1 + len(loads)
    note_off = _EHDR.size + phnum * _PHDR.size
    pos = note_off + len(notes)
    offsets = {}
    for i in order:
        offsets[i] = pos
        pos += len(loads[i][1])
    ehdr = _EHDR.pack(
        b"\x7fELF\x02\x01\x01" + bytes(9), 4, machine, 1, 0, 64, 0, 0, ehsize, 56, phnum, 0, 0, 0
    )
    phdrs = _PHDR.pack(4, 0, note_off, 0, 0, len(notes), len(notes), 0)
    for i, (paddr, data) in enumerate(loads):
        phdrs += _PHDR.pack(1, 0, offsets[i], paddr, paddr, len(data), len(data), 0)
    return ehdr + phdrs + notes + b"".join(loads[i][1] for i in order)


PAUSED_NOTES = note(b"CORE", 1, bytes(144)) + note(b"QEMU", 0, bytes(440))
LIVE_NOTES = note(b"MEMDUMP", NT_MEMDUMP_LIVE, b"no vCPU registers\n")


def reader(data: bytes, step: int) -> Callable[[memoryview], int]:
    """readinto over ``data``, at most ``step`` bytes a call (chunk edges everywhere)."""
    pos = 0

    def read(view: memoryview) -> int:
        nonlocal pos
        n = min(len(view), step, len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        return n

    return read


@pytest.fixture
def paused(tmp_path: Path) -> Path:
    path = tmp_path / "paused.elf"
    path.write_bytes(core(LOADS, [0, 1, 2], ehsize=8, notes=PAUSED_NOTES))
    return path


# A marker straddling chunk edges, in the RAM above 4 GiB.
GRAB = {(1 << 32) + 9990: 50}


@pytest.mark.parametrize("step", [997, 1 << 22])
def test_equal_but_for_what_may_differ(paused: Path, step: int) -> None:
    live_core = core(LOADS, [2, 0, 1], notes=LIVE_NOTES)  # sweep order: not by address
    live, ref = compare_stream_with_file(reader(live_core, step), paused, GRAB)
    want = {(1 << 32) + 9990: LOADS[2][1][9990:10040]}
    assert live.grabbed == ref.grabbed == want
    assert live.size == len(live_core)
    assert_notes_as_documented(live, ref)
    assert [n for n, _, _ in ref.notes] == [b"CORE", b"QEMU"]


@pytest.mark.parametrize(("load", "at"), [(0, 0), (1, 4095), (2, 70_000), (2, 12_345)])
def test_one_wrong_byte_fails_and_says_where(paused: Path, load: int, at: int) -> None:
    loads = list(LOADS)
    paddr, data = loads[load]
    loads[load] = (paddr, data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    with pytest.raises(AssertionError, match=f"first at guest-physical {paddr + at:#x}$"):
        compare_stream_with_file(reader(core(loads, [2, 0, 1], notes=LIVE_NOTES), 997), paused)


def test_data_where_the_headers_do_not_say_fails(paused: Path) -> None:
    """The live core's headers point at another segment's data (a wrong layout)."""
    bad = bytearray(core(LOADS, [2, 0, 1], notes=LIVE_NOTES))
    p0, p2 = (_EHDR.size + (1 + i) * _PHDR.size for i in (0, 2))
    off0, off2 = struct.unpack_from("<Q", bad, p0 + 8)[0], struct.unpack_from("<Q", bad, p2 + 8)[0]
    struct.pack_into("<Q", bad, p0 + 8, off2)
    struct.pack_into("<Q", bad, p2 + 8, off0)
    with pytest.raises(AssertionError, match="differs from paused.elf"):
        compare_stream_with_file(reader(bytes(bad), 1 << 22), paused)


@pytest.mark.parametrize(
    "loads",
    [
        [LOADS[0], LOADS[1], ((1 << 32) + 4096, LOADS[2][1])],  # another address
        [LOADS[0], LOADS[2], LOADS[1]],  # another header order
        LOADS[:2],  # a RAM block missing
    ],
    ids=["paddr", "order", "missing"],
)
def test_other_pt_load_headers_fail(paused: Path, loads: list[tuple[int, bytes]]) -> None:
    live_core = core(loads, list(range(len(loads))), notes=LIVE_NOTES)
    # (A missing block changes e_phnum: the ELF header differs first.)
    with pytest.raises(AssertionError, match=r"headers (\(but p_offset\) )?differ"):
        compare_stream_with_file(reader(live_core, 1 << 22), paused)


def test_another_elf_header_fails(paused: Path) -> None:
    live_core = core(LOADS, [2, 0, 1], notes=LIVE_NOTES, machine=3)
    with pytest.raises(AssertionError, match="ELF headers differ"):
        compare_stream_with_file(reader(live_core, 1 << 22), paused)


def test_a_short_stream_fails(paused: Path) -> None:
    live_core = core(LOADS, [2, 0, 1], notes=LIVE_NOTES)
    with pytest.raises(AssertionError, match="the headers declare"):
        compare_stream_with_file(reader(live_core[:-1], 1 << 22), paused)


def test_vcpu_notes_in_a_live_core_fail(paused: Path) -> None:
    """The notes are not compared byte for byte, but they are what the design says."""
    live_core = core(LOADS, [2, 0, 1], notes=PAUSED_NOTES)
    live, ref = compare_stream_with_file(reader(live_core, 1 << 22), paused)
    with pytest.raises(AssertionError):
        assert_notes_as_documented(live, ref)
