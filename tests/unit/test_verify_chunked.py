"""Issue 14, item 4: verify of a chunked .mem.gz checks its index and Merkle root against
the manifest and every chunk's SHA-256 (in parallel), and a failure names the first bad
chunk with its raw and guest-physical ranges; ``guest_range`` (``memdump verify --range``)
checks only the chunks holding a range. Old single-stream dumps verify as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memdump import chunkedgz
from memdump.chunkedgz import read_index
from memdump.cli.maintenance import parse_range
from memdump.errors import InvalidDumpError
from memdump.manifest import manifest_path
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.signing import trusting
from tests.helpers.verify_dumps import (
    CHUNK,
    HIGH,
    Made,
    core,
    file_offset,
    flip,
    guest_of,
    guest_ram,
    write_dump,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Manifests signed by a trusted key (issue 15): `verified` needs one.
    return trusting(Settings(dump_dir=tmp_path / "dumps", data_dir=tmp_path / "data"), tmp_path)


@pytest.fixture
def made(settings: Settings) -> Made:
    return write_dump(settings.dump_dir, core(guest_ram(1)), settings=settings)


def _member_of(made: Made, paddr: int) -> chunkedgz.Chunk:
    """The index entry of the chunk holding guest-physical ``paddr``."""
    with open(made.path, "rb") as f:
        index = read_index(f)
    assert index is not None
    return index.chunks[file_offset(made.raw, paddr) // CHUNK]


def _guest_of(made: Made, number: int) -> list[list[str]]:
    """Guest-physical ranges of chunk ``number``, worked out from the PT_LOADs here."""
    lo, hi = number * CHUNK, min((number + 1) * CHUNK, len(made.raw))
    return [[hex(a), hex(b)] for a, b in guest_of(made.raw, lo, hi)]


def test_a_chunked_dump_verifies_with_its_index_and_merkle_root(
    made: Made, settings: Settings
) -> None:
    v = verify(made.row, settings, threads=3)
    assert v.status == "verified", v
    chunks = v.checks["chunks"]
    assert chunks["ok"] and chunks["bad"] == 0
    assert chunks["checked"] == chunks["chunk_count"] == -(-len(made.raw) // CHUNK)
    assert v.checks["manifest.chunks.merkle_root"]["ok"]
    assert v.checks["manifest.chunks.index_sha256"]["ok"]
    assert all(c["ok"] for c in v.checks.values() if "ok" in c), v.checks


def test_a_flipped_byte_names_the_first_bad_chunk_and_its_guest_range(
    made: Made, settings: Settings
) -> None:
    late = _member_of(made, HIGH + 0x70000)
    early = _member_of(made, HIGH + 0x20000)
    assert early.number < late.number
    flip(made.path, late.gz_offset + late.gz_size // 2)
    flip(made.path, early.gz_offset + early.gz_size // 2)
    v = verify(made.row, settings, threads=2)
    assert v.status == "mismatch"
    first = v.checks["chunks"]["first_bad"]
    assert first["number"] == early.number and v.checks["chunks"]["bad"] == 2
    assert first["raw_range"] == [hex(early.raw_offset), hex(early.raw_offset + CHUNK)]
    assert first["guest_ranges"] == _guest_of(made, early.number)
    lo, hi = first["guest_ranges"][0]
    assert f"chunk {early.number} is corrupt" in v.detail
    assert f"guest-physical {lo}-{hi}" in v.detail and "2 bad chunks in all" in v.detail
    assert not v.checks["gz_sha256"]["ok"]


def test_a_bad_first_chunk_is_named_with_the_headers_read_unchecked(
    made: Made, settings: Settings
) -> None:
    first = _member_of(made, 0)
    assert first.number == 0
    # A byte in the CRC32 of the member: the data inflates, the chunk fails its check.
    flip(made.path, first.gz_offset + first.gz_size - 8)
    v = verify(made.row, settings)
    bad = v.checks["chunks"]["first_bad"]
    assert v.status == "mismatch" and bad["number"] == 0 and bad["reason"] == "crc"
    assert bad["guest_ranges"] == _guest_of(made, 0)


def test_an_index_that_does_not_match_the_manifest_is_a_mismatch(
    made: Made, settings: Settings
) -> None:
    # A consistent file whose index the manifest does not vouch for (another Merkle root).
    mpath = manifest_path(made.path)
    doc = json.loads(mpath.read_text())
    doc["output"]["chunks"]["merkle_root"] = "00" * 32
    mpath.unlink()
    from memdump import manifest

    _, sha = manifest.write(made.path, doc)
    row = {**made.row, "manifest_sha256": sha}
    v = verify(row, settings)
    assert v.status == "mismatch" and "Merkle root" in v.detail, v
    assert not v.checks["manifest.chunks.merkle_root"]["ok"]
    # The record's own Merkle root (where it has one) is checked the same way.
    assert verify({**made.row, "merkle_root": "11" * 32}, settings).status == "mismatch"


def test_a_damaged_index_is_reported_and_the_hashes_still_computed(
    made: Made, settings: Settings
) -> None:
    with open(made.path, "rb") as f:
        index = read_index(f)
    assert index is not None
    index_at = index.chunks[-1].gz_offset + index.chunks[-1].gz_size
    flip(made.path, index_at + 40)  # inside the first index member's entries
    v = verify(made.row, settings)
    assert v.status == "mismatch" and "chunk index" in v.detail, v
    assert v.checks["chunks"]["ok"] is False
    # The image itself is intact: only the stored bytes differ.
    assert v.checks["sha256"]["ok"] and not v.checks["gz_sha256"]["ok"]


def test_range_checks_only_the_chunks_holding_it(
    made: Made, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _member_of(made, HIGH + 0x70000)
    flip(made.path, bad.gz_offset + bad.gz_size // 2)
    inflated: list[int] = []
    real = chunkedgz.inflate_member

    def counting(chunk: chunkedgz.Chunk, member: bytes, *, check: bool = True) -> bytes:
        inflated.append(chunk.number)
        return real(chunk, member, check=check)

    monkeypatch.setattr("memdump.verify.inflate_member", counting)
    monkeypatch.setattr("memdump.changes.ChunkReader.chunk", _counting_reader(inflated))
    v = verify(made.row, settings, guest_range=(HIGH, HIGH + 0x1000))
    assert v.status == "verified", v
    want = _member_of(made, HIGH).number
    assert sorted(set(inflated)) == [0, want]  # the ELF headers' chunk and the range's
    assert v.checks["chunks"]["chunks_checked"] == [[0, 0], [want, want]]
    assert "2 of" in v.detail and "Merkle root" in v.detail

    v = verify(made.row, settings, guest_range=(HIGH + 0x70000, HIGH + 0x70001))
    assert v.status == "mismatch"
    assert v.checks["chunks"]["first_bad"]["number"] == bad.number
    assert v.checks["chunks"]["first_bad"]["guest_ranges"] == _guest_of(made, bad.number)


def _counting_reader(seen: list[int]):  # type: ignore[no-untyped-def]
    real = chunkedgz.ChunkReader.chunk

    def chunk(self: chunkedgz.ChunkReader, number: int) -> bytes:
        seen.append(number)
        return real(self, number)

    return chunk


def test_range_needs_the_index_vouched_for_by_the_manifest(settings: Settings) -> None:
    made = write_dump(
        settings.dump_dir, core(guest_ram(2)), with_chunks_section=False, settings=settings
    )
    v = verify(made.row, settings, guest_range=(HIGH, HIGH + 1))
    assert v.status == "mismatch" and "cannot be checked against the record" in v.detail


def test_range_outside_guest_memory_and_old_dumps_are_refused(
    made: Made, settings: Settings
) -> None:
    with pytest.raises(InvalidDumpError, match="in no PT_LOAD"):
        verify(made.row, settings, guest_range=(0x90000, 0xA0000))  # the hole below HIGH
    old = write_dump(settings.dump_dir, core(guest_ram(3)), chunked=False, settings=settings)
    with pytest.raises(InvalidDumpError, match="single-stream"):
        verify(old.row, settings, guest_range=(HIGH, HIGH + 1))


def test_an_old_single_stream_dump_verifies_as_before(settings: Settings) -> None:
    old = write_dump(settings.dump_dir, core(guest_ram(4)), chunked=False, settings=settings)
    v = verify(old.row, settings)
    assert v.status == "verified" and "chunks" not in v.checks, v
    flip(old.path, old.path.stat().st_size // 2)
    v = verify(old.row, settings)
    assert v.status == "mismatch" and "gz_sha256" in v.detail


def test_parse_range() -> None:
    assert parse_range("0x100000:0x200000") == (0x100000, 0x200000)
    assert parse_range("4096:8192") == (4096, 8192)
    for bad in ("0x10", "0x20:0x10", "a:b", "5:5"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_cli_verify_range(made: Made, settings: Settings) -> None:
    from memdump.records.model import DumpRecord
    from memdump.records.sqlite import SQLiteRecordStore

    row = dict(made.row)
    rec = DumpRecord.from_dict(
        {
            k: row.get(k, v)
            for k, v in {
                **{f: "" for f in ("collector", "local_path", "s3_uri")},
                "timestamp": row["timestamp"],
                "dom": row["dom"],
                "vmid": row["vmid"],
                "sha256": row["sha256"],
                "duration_sec": 1.0,
                "gzip_size_bytes": row["gzip_size_bytes"],
                "ctime": 1,
                "mtime": 1,
                "atime": 1,
                "dump_path": row["dump_path"],
                "gz_sha256": row["gz_sha256"],
                "raw_size_bytes": row["raw_size_bytes"],
                "hypervisor": row["hypervisor"],
                "manifest_sha256": row["manifest_sha256"],
            }.items()
        }
    )
    SQLiteRecordStore(settings.records_db).add(rec)
    bad = _member_of(made, HIGH + 0x70000)
    flip(made.path, bad.gz_offset + bad.gz_size // 2)
    env = {
        "MEMDUMP_DATA_DIR": str(settings.data_dir),
        "MEMDUMP_DUMP_DIR": str(settings.dump_dir),
        "MEMDUMP_TRUSTED_KEYS": str(settings.trusted_keys),
    }
    cli = [sys.executable, "-m", "memdump.cli", "verify", str(made.path)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *extra], env={**_base_env(), **env}, cwd=REPO, capture_output=True, text=True
        )

    out = run("--range", f"{HIGH:#x}:{HIGH + 0x1000:#x}")
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "verified", out
    out = run("--range", f"{HIGH + 0x70000}:{HIGH + 0x70010}")  # decimal
    assert out.returncode == 1, out
    assert json.loads(out.stdout)["checks"]["chunks"]["first_bad"]["number"] == bad.number
    out = run()
    assert out.returncode == 1 and f"chunk {bad.number} is corrupt" in out.stdout, out
    out = run("--range", "0x20:0x10")
    assert out.returncode == 2 and "START must be below END" in out.stderr, out


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MEMDUMP_")}


def test_verify_threads_come_from_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from memdump.verify import verify_threads

    monkeypatch.setenv("MEMDUMP_VERIFY__THREADS", "3")
    assert verify_threads(Settings()) == 3
    monkeypatch.delenv("MEMDUMP_VERIFY__THREADS")
    monkeypatch.setattr("memdump.verify.os.cpu_count", lambda: 6)
    assert verify_threads(Settings()) == 6 and verify_threads() == 6
