import pytest

from memdump.elfcore import PT_LOAD, parse_core
from memdump.errors import InvalidDumpError
from tests.helpers.elfgen import make_core


def test_layout_and_size() -> None:
    core = make_core([(0, b"a" * 640), (0x100000, b"b" * 4096)])
    layout = parse_core(core)
    assert layout is not None
    assert layout.file_size == len(core)
    assert layout.memory_bytes == 640 + 4096
    off = layout.offset_of(0x100000 + 10)
    assert off is not None and core[off : off + 1] == b"b"
    assert layout.offset_of(0x5000) is None
    assert [s.type for s in layout.segments].count(PT_LOAD) == 2


def test_needs_more_bytes() -> None:
    core = make_core([(0, b"x" * 100)] * 3)
    assert parse_core(core[:10]) is None
    assert parse_core(core[:70]) is None  # header but not all program headers


def test_pn_xnum() -> None:
    core = make_core([(i * 4096, bytes([i]) * 16) for i in range(5)], xnum=True)
    layout = parse_core(core)
    assert layout is not None and layout.file_size == len(core)
    assert len(layout.segments) == 6


@pytest.mark.parametrize(
    "head",
    [b"\x00" * 64, b"\x7fELF\x01\x01" + b"\x00" * 58, b"\x7fELF\x02\x02" + b"\x00" * 58],
)
def test_not_a_core(head: bytes) -> None:
    with pytest.raises(InvalidDumpError):
        parse_core(head)


def test_executable_is_not_a_core() -> None:
    core = bytearray(make_core([(0, b"x")]))
    core[16] = 2  # ET_EXEC
    with pytest.raises(InvalidDumpError):
        parse_core(bytes(core))


def test_real_qemu_layout_counts_the_trailing_shstrtab() -> None:
    core = make_core([(0, b"m" * 1000)])
    layout = parse_core(core[:4096])
    assert layout is not None and layout.file_size == len(core)
    assert layout.sections and layout.sections[0][0] + 11 == len(core)


def test_section_headers_far_away_are_refused() -> None:
    core = bytearray(make_core([(0, b"m" * 10)]))
    core[40:48] = (1 << 40).to_bytes(8, "little")  # e_shoff
    with pytest.raises(InvalidDumpError):
        parse_core(bytes(core))
