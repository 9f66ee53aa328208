"""Issue 11 item 15: ELF headers longer than 1 MiB (many PT_LOADs) are parsed from the
contiguous prefix of the stream, whatever the chunking."""

import hashlib
from pathlib import Path

import pytest
from isal import igzip

from memdump.elfcore import parse_core
from memdump.errors import InvalidDumpError, ShortDumpError
from memdump.pipeline import write_dump
from tests.helpers.elfgen import make_core


class ChunkedSource:
    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.pos = data, chunk, 0
        self.aborted = False

    def readinto(self, view: memoryview) -> int:
        out = self.data[self.pos : self.pos + min(self.chunk, len(view))]
        self.pos += len(out)
        view[: len(out)] = out
        return len(out)

    def close_ok(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture(scope="module")
def big_header_core() -> bytes:
    # 100,000 PT_LOADs: ~5.3 MiB of program headers, more than one 4 MiB pipeline buffer.
    blocks = [(i * 4096, i.to_bytes(4, "little") * 4) for i in range(100_000)]
    core = make_core(blocks, xnum=True)  # past 65535 headers: the count is in section 0
    layout = parse_core(core)
    assert layout is not None and layout.header_end > 5 << 20
    assert layout.file_size == len(core)
    return core


@pytest.mark.parametrize("chunk", [65_537, 1 << 20, (4 << 20) - 1, 16 << 20])
def test_headers_past_one_mebibyte_parse(
    tmp_path: Path, big_header_core: bytes, chunk: int
) -> None:
    res = write_dump(ChunkedSource(big_header_core, chunk), tmp_path, "big.mem.gz")
    assert res.raw_bytes == len(big_header_core)
    assert res.raw_sha256 == hashlib.sha256(big_header_core).hexdigest()
    assert igzip.decompress(res.path.read_bytes()) == big_header_core


@pytest.mark.parametrize("cut", [1, 100_000, 3 << 20])
def test_short_big_header_core_still_fails(
    tmp_path: Path, big_header_core: bytes, cut: int
) -> None:
    src = ChunkedSource(big_header_core[:-cut], 1 << 20)
    with pytest.raises(ShortDumpError) as ei:
        write_dump(src, tmp_path, "big.mem.gz")
    assert ei.value.fields["bytes_expected"] in (len(big_header_core), None)
    assert src.aborted
    assert list(tmp_path.iterdir()) == []


def test_no_length_found_is_bounded(tmp_path: Path) -> None:
    # An expected_size that never finds a length cannot make the header buffer grow
    # without bound.
    src = ChunkedSource(bytes(70 << 20), 8 << 20)
    with pytest.raises(InvalidDumpError):
        write_dump(src, tmp_path, "x.gz", expected_size=lambda _: None)
    assert src.aborted
