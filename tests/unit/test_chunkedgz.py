"""The chunked .mem.gz (memdump.chunkedgz): one gzip file, an index, a Merkle root."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from memdump import chunkedgz
from memdump.errors import ChunkedDumpError, CorruptChunkError
from tests.helpers.merkle import rfc6962 as _rfc6962

C = chunkedgz.MIN_CHUNK_SIZE  # 64 KiB: the smallest chunk keeps these files small


def _raw(size: int, seed: int = 1) -> bytes:
    # Half random, half zero pages: both deflate paths, a realistic ratio.
    out = bytearray(size)
    rnd = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size // 2)
    out[: len(rnd)] = rnd
    return bytes(out)


@pytest.mark.parametrize("size", [1, C - 1, C, C + 1, 3 * C, 5 * C + 4097])
def test_gunzip_gives_the_raw_image_and_the_index_tiles_it(size: int) -> None:
    raw = _raw(size)
    blob = chunkedgz.compress_bytes(raw, chunk_size=C)
    assert gzip.decompress(blob) == raw
    index = chunkedgz.read_index(io.BytesIO(blob))
    assert index is not None
    assert index.raw_size == size and index.chunk_size == C
    assert len(index.chunks) == -(-size // C)
    for n, chunk in enumerate(index.chunks):
        piece = raw[n * C : (n + 1) * C]
        assert (chunk.raw_offset, chunk.raw_size) == (n * C, len(piece))
        assert chunk.sha256 == hashlib.sha256(piece).digest()
        assert chunkedgz.read_chunk(io.BytesIO(blob), chunk) == piece
    assert index.merkle_root == _rfc6962([c.sha256 for c in index.chunks]).hex()
    assert index.summary()["format"] == "memdump-chunked-gzip/1"


def test_the_system_gzip_reads_it_whole(tmp_path: Path) -> None:
    if shutil.which("gzip") is None:
        pytest.fail("gzip(1) is part of every Debian install")
    raw = _raw(4 * C + 5)
    path = tmp_path / "d.mem.gz"
    path.write_bytes(chunkedgz.compress_bytes(raw, chunk_size=C))
    subprocess.run(["gzip", "-t", str(path)], check=True)
    out = subprocess.run(["gzip", "-dc", str(path)], check=True, capture_output=True).stdout
    assert out == raw


@pytest.mark.parametrize("n", range(0, 18))
def test_merkle_root_is_rfc6962_for_every_tree_shape(n: int) -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
    assert chunkedgz.merkle_root(leaves) == _rfc6962(leaves)


def test_merkle_root_by_hand_for_three_chunks() -> None:
    d = [hashlib.sha256(x).digest() for x in (b"a", b"b", b"c")]

    def h(b: bytes) -> bytes:
        return hashlib.sha256(b).digest()

    leaf = [h(b"\x00" + x) for x in d]
    assert chunkedgz.merkle_root(d) == h(b"\x01" + h(b"\x01" + leaf[0] + leaf[1]) + leaf[2])


def test_an_old_single_stream_dump_has_no_index() -> None:
    raw = _raw(3 * C)
    assert chunkedgz.read_index(io.BytesIO(gzip.compress(raw))) is None
    assert chunkedgz.read_index(io.BytesIO(b"")) is None


def test_the_trailer_is_the_last_fixed_size_member() -> None:
    blob = chunkedgz.compress_bytes(_raw(2 * C), chunk_size=C)
    tail = blob[-chunkedgz.TRAILER_SIZE :]
    assert chunkedgz.TRAILER_SIZE == 130
    assert tail[:4] == b"\x1f\x8b\x08\x04" and b"MDGZ" in tail
    assert gzip.decompress(tail) == b""


def test_a_large_index_spans_several_members() -> None:
    # 65520 bytes per index member: 1,200 entries need two.
    raw = bytes(1200 * C)
    blob = chunkedgz.compress_bytes(raw, chunk_size=C)
    index = chunkedgz.read_index(io.BytesIO(blob))
    assert index is not None and len(index.chunks) == 1200
    head = re.compile(rb"\x1f\x8b\x08\x04\x00{5}\xff..MI", re.DOTALL)
    assert len(head.findall(blob, index.chunks[-1].gz_offset)) == 2


def test_a_flipped_byte_in_a_chunk_names_that_chunk() -> None:
    raw = _raw(4 * C)
    blob = bytearray(chunkedgz.compress_bytes(raw, chunk_size=C))
    index = chunkedgz.read_index(io.BytesIO(bytes(blob)))
    assert index is not None
    victim = index.chunks[1]  # random bytes (the first half of _raw)
    blob[victim.gz_offset + victim.gz_size // 2] ^= 0x40
    f = io.BytesIO(bytes(blob))
    assert chunkedgz.read_index(f) is not None  # the index itself is intact
    assert chunkedgz.read_chunk(f, index.chunks[0]) == raw[:C]
    with pytest.raises(CorruptChunkError) as err:
        chunkedgz.read_chunk(f, victim)
    assert err.value.fields["number"] == 1
    assert err.value.fields["raw_offset"] == C
    assert err.value.fields["raw_size"] == C


def test_a_chunk_whose_bytes_do_not_match_its_hash_is_corrupt() -> None:
    # A consistent member (its CRC matches) for other bytes: only the index's SHA-256 can
    # tell, so the check must use it.
    raw = _raw(2 * C)
    blob = chunkedgz.compress_bytes(raw, chunk_size=C)
    index = chunkedgz.read_index(io.BytesIO(blob))
    assert index is not None
    forged = chunkedgz.data_member(1, b"\x01" * C, 1).data
    first = index.chunks[1]
    chunk = chunkedgz.Chunk(1, C, C, first.gz_offset, len(forged), first.sha256)
    with pytest.raises(CorruptChunkError) as err:
        chunkedgz.inflate_member(chunk, forged)
    assert err.value.fields["reason"] == "sha256"
    assert chunkedgz.inflate_member(chunk, forged, check=False) == b"\x01" * C


@pytest.mark.parametrize("where", ["index", "trailer-root", "trailer-index-sha"])
def test_a_tampered_index_or_trailer_is_refused(where: str) -> None:
    blob = bytearray(chunkedgz.compress_bytes(_raw(3 * C), chunk_size=C))
    index = chunkedgz.read_index(io.BytesIO(bytes(blob)))
    assert index is not None
    body = len(blob) - chunkedgz.TRAILER_SIZE + 16  # the MT subfield's payload
    if where == "index":
        at = index.chunks[-1].gz_offset + index.chunks[-1].gz_size + 16 + 20  # 1st entry's sha
        blob[at] ^= 1
    elif where == "trailer-root":
        blob[body + 40 + 32] ^= 1
    else:
        blob[body + 40] ^= 1
    with pytest.raises(ChunkedDumpError):
        chunkedgz.read_index(io.BytesIO(bytes(blob)))


def test_an_index_entry_out_of_place_is_refused() -> None:
    raw = _raw(3 * C)
    blob = chunkedgz.compress_bytes(raw, chunk_size=C)
    index = chunkedgz.read_index(io.BytesIO(blob))
    assert index is not None
    entries = [
        chunkedgz.ENTRY.pack(c.raw_offset, c.raw_size, c.gz_offset, c.gz_size, c.sha256)
        for c in index.chunks
    ]
    swapped = entries[1] + entries[0] + entries[2]
    digests = [index.chunks[i].sha256 for i in (1, 0, 2)]
    with pytest.raises(ChunkedDumpError, match="does not follow"):
        chunkedgz.index_from_entries(
            swapped,
            C,
            3,
            3 * C,
            index.chunks[-1].gz_offset + index.chunks[-1].gz_size,
            hashlib.sha256(swapped).digest(),
            chunkedgz.merkle_root(digests),
        )


def test_a_truncated_file_has_no_trailer() -> None:
    blob = chunkedgz.compress_bytes(_raw(3 * C), chunk_size=C)
    assert chunkedgz.read_index(io.BytesIO(blob[:-1])) is None
    assert chunkedgz.read_index(io.BytesIO(blob[: len(blob) // 2])) is None


def test_random_reads_inflate_only_what_they_touch() -> None:
    raw = _raw(6 * C + 123)
    blob = chunkedgz.compress_bytes(raw, chunk_size=C)
    index = chunkedgz.read_index(io.BytesIO(blob))
    assert index is not None
    reader = chunkedgz.ChunkReader(io.BytesIO(blob), index, cache_chunks=2)
    for off, length in [(0, 10), (C - 3, 6), (2 * C + 5, 3 * C), (6 * C + 100, 100), (0, 7 * C)]:
        assert reader.read(off, length) == raw[off : off + length]
    assert reader.read(len(raw), 10) == b""
    assert index.covering(C - 1, C + 1) == range(0, 2)
    assert index.covering(C, 2 * C) == range(1, 2)
    assert index.covering(len(raw) - 1, len(raw) + 50) == range(6, 7)


def test_a_file_on_disk_is_read_by_offset(tmp_path: Path) -> None:
    raw = _raw(3 * C + 9)
    path = tmp_path / "x.mem.gz"
    path.write_bytes(chunkedgz.compress_bytes(raw, chunk_size=C))
    with path.open("rb") as f:
        index = chunkedgz.read_index(f)
        assert index is not None
        reader = chunkedgz.ChunkReader(f, index)
        assert reader.read(C + 1, C) == raw[C + 1 : 2 * C + 1]
    assert (
        os.path.getsize(path)
        == index.chunks[-1].gz_offset
        + index.chunks[-1].gz_size
        + (16 + len(index.chunks) * chunkedgz.ENTRY.size + 10)
        + chunkedgz.TRAILER_SIZE
    )


def test_chunk_size_must_be_a_power_of_two_in_range() -> None:
    for bad in (chunkedgz.MIN_CHUNK_SIZE // 2, 3 << 20, chunkedgz.MAX_CHUNK_SIZE * 2):
        with pytest.raises(ValueError):
            chunkedgz.IndexBuilder(bad)
    assert struct.calcsize("<QIQI32s") == chunkedgz.ENTRY.size == 56


def test_the_readme_recipe_recomputes_the_merkle_root() -> None:
    # The README's few lines are what an examiner runs: they must give the same root.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Merkle root**") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("\n```", start)]
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    mth = scope["mth"]
    assert callable(mth)
    for n in range(0, 18):
        d = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
        assert mth(d) == chunkedgz.merkle_root(d)


def test_a_member_that_inflates_past_its_chunk_is_stopped_at_the_chunk_size() -> None:
    # A hostile member: 64 MiB of zeros deflate to ~64 KiB; its index entry says 64 KiB raw.
    bomb = chunkedgz.data_member(0, bytes(64 << 20), 1)
    chunk = chunkedgz.Chunk(0, 0, C, 0, len(bomb.data), bomb.sha256)
    bad = bytearray(bomb.data)
    bad[24:28] = C.to_bytes(4, "little")  # the MD subfield's raw size, as the index says
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError) as err:
            chunkedgz.inflate_member(chunk, bytes(bad), check=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.fields["reason"] == "size"
    assert peak < 8 << 20  # not the 64 MiB the member would inflate to


def test_a_member_whose_deflate_data_ends_early_is_corrupt() -> None:
    member = chunkedgz.data_member(0, _raw(C), 1)
    chunk = chunkedgz.Chunk(0, 0, C, 0, len(member.data), member.sha256)
    cut = member.data[: chunkedgz.DATA_HEADER_SIZE + 100] + member.data[-8:]
    with pytest.raises(CorruptChunkError):
        chunkedgz.inflate_member(chunkedgz.Chunk(0, 0, C, 0, len(cut), member.sha256), cut)
    assert chunkedgz.inflate_member(chunk, member.data) == _raw(C)


@pytest.mark.parametrize("size", [4096, 65535, 65536, C, 3 * C + 17])
def test_incompressible_chunks_are_stored_blocks(size: int) -> None:
    raw = hashlib.shake_256(size.to_bytes(4, "little")).digest(size)
    member = chunkedgz.data_member(0, raw, 1)
    body = member.data[chunkedgz.DATA_HEADER_SIZE : -8]
    assert body[0] & 0b110 == 0  # BTYPE 00: stored
    assert len(body) == size + 5 * -(-size // 65535)
    chunk = chunkedgz.Chunk(0, 0, size, 0, len(member.data), member.sha256)
    assert chunkedgz.inflate_member(chunk, member.data) == raw
    assert gzip.decompress(member.data) == raw
    # Compressible chunks stay compressed.
    text = chunkedgz.data_member(0, b"memdump " * (size // 8 + 1), 1)
    assert text.data[chunkedgz.DATA_HEADER_SIZE] & 0b110 != 0


def test_the_index_of_a_4_gib_capture_stays_compact_while_it_is_built() -> None:
    # 65,536 entries (4 GiB at 64 KiB): kept as the 56 bytes each one is stored as, and
    # the Merkle tree as its O(log n) stack; objects per chunk took 3x that and more.
    builder = chunkedgz.IndexBuilder(C)
    tracemalloc.start()
    try:
        for n in range(65_536):
            digest = hashlib.sha256(n.to_bytes(4, "little")).digest()
            builder.add(chunkedgz.Member(b"m" * 40, C, digest))
        held, _ = tracemalloc.get_traced_memory()
        _, index = builder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index.chunks) == 65_536 and index.chunks[-1].raw_offset == 65_535 * C
    assert held < 65_536 * 56 * 1.5  # ~3.5 MiB
    assert peak < 65_536 * 56 * 4.5  # entries, their copy and the index members at the end
    digests = [hashlib.sha256(n.to_bytes(4, "little")).digest() for n in range(65_536)]
    assert index.merkle_root == _rfc6962(digests).hex()


@pytest.mark.parametrize("n", [1, 63, 64, 65, 128, 200])
def test_the_written_index_carries_the_run_roots_read_index_computes(n: int) -> None:
    # The writer's run roots (MerkleTree.run_roots) stand in for read_index's when the
    # capture's check reads the file back with the written index as ``like``.
    assert chunkedgz.SUBTREE == 64
    tree = chunkedgz.MerkleTree()
    leaves = [hashlib.sha256(n.to_bytes(4, "little") + bytes([i % 256])).digest() for i in range(n)]
    for leaf in leaves:
        tree.add(leaf)
    runs = [leaves[i : i + 64] for i in range(0, n, 64)]
    assert tree.run_roots() == b"".join(_rfc6962(run) for run in runs)
    raw = _raw(n * C)
    builder = chunkedgz.IndexBuilder(C)
    parts = []
    for number, off in enumerate(range(0, len(raw), C)):
        member = chunkedgz.data_member(number, raw[off : off + C], 1)
        builder.add(member)
        parts.append(member.data)
    tail, written = builder.finish()
    read = chunkedgz.read_index(io.BytesIO(b"".join(parts) + tail))
    assert read is not None and len(read.subtree_roots) == 32 * len(runs)
    assert written.subtree_roots == read.subtree_roots
