"""Issue 14, item 5: what changed between two chunked dumps, from their indexes alone:
``memdump diff`` (guest-physical ranges, chunk granularity, through the PT_LOADs, merged
into runs) and the count against the previous capture of the same VM (since_previous),
which says why whenever it cannot count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memdump import chunkedgz
from memdump.changes import diff, since_previous, stored_for
from memdump.errors import InvalidDumpError, RecordStoreError
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.verify_dumps import (
    CHUNK,
    HIGH,
    KiB,
    core,
    file_offset,
    guest_of,
    guest_ram,
    write_dump,
)

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(dump_dir=tmp_path / "dumps", data_dir=tmp_path / "data")


def _changed(raw: bytes, paddrs: list[int]) -> bytes:
    out = bytearray(raw)
    for p in paddrs:
        out[file_offset(raw, p)] ^= 0xFF
    return bytes(out)


def _expected(raw: bytes, paddrs: list[int]) -> list[tuple[int, int]]:
    """The guest ranges of the chunks holding ``paddrs``, merged, worked out here."""
    numbers = sorted({file_offset(raw, p) // CHUNK for p in paddrs})
    ranges = sorted(r for n in numbers for r in guest_of(raw, n * CHUNK, (n + 1) * CHUNK))
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def test_diff_lists_the_changed_guest_ranges_merged_into_runs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = core(guest_ram(1))
    # Two neighbouring chunks (one run), one alone further up, one in the low block.
    paddrs = [HIGH + 0x10, HIGH + 0x10 + CHUNK, HIGH + 0x90000, 0x30000]
    a = write_dump(settings.dump_dir, raw)
    b = write_dump(settings.dump_dir, _changed(raw, paddrs))
    inflated: list[int] = []
    real = chunkedgz.ChunkReader.chunk

    def counting(self: chunkedgz.ChunkReader, number: int) -> bytes:
        inflated.append(number)
        return real(self, number)

    monkeypatch.setattr(chunkedgz.ChunkReader, "chunk", counting)
    d = diff(stored_for(str(a.path), settings), stored_for(str(b.path), settings))
    assert len(d.changed) == 4
    assert list(d.ranges) == _expected(raw, paddrs)
    # Chunk 8 holds the low block's end and the high block's start (two guest ranges); it
    # and its neighbour 9 make one run in the high block: 4 chunks, 4 ranges, not 5.
    assert len(d.ranges) == 4 and d.ranges[2][0] == HIGH < HIGH + 0x10 + CHUNK < d.ranges[2][1]
    # Only the chunk with the ELF headers is inflated (the same in both: read once).
    assert set(inflated) == {0}
    assert d.to_dict()["ranges"][0]["start"] == hex(d.ranges[0][0])


def test_diff_of_identical_dumps_is_empty_and_headers_outside_memory_are_said(
    settings: Settings,
) -> None:
    raw = core(guest_ram(1))
    a = write_dump(settings.dump_dir, raw)
    b = write_dump(settings.dump_dir, raw)
    d = diff(stored_for(str(a.path), settings), stored_for(str(b.path), settings))
    assert d.changed == () and d.ranges == () and d.outside == ()
    # A changed note (CPU state) lies in no PT_LOAD: reported as such, not as memory.
    notes = bytearray(raw)
    notes[file_offset(raw, 0) - 10] ^= 1
    c = write_dump(settings.dump_dir, bytes(notes))
    d = diff(stored_for(str(a.path), settings), stored_for(str(c.path), settings))
    assert d.changed == (0,)
    assert d.outside == ((0, file_offset(raw, 0)),)
    assert list(d.ranges) == guest_of(raw, 0, CHUNK)


def test_diff_refuses_what_it_cannot_compare(settings: Settings) -> None:
    raw = core(guest_ram(1))
    a = stored_for(str(write_dump(settings.dump_dir, raw).path), settings)
    bigger = stored_for(
        str(write_dump(settings.dump_dir, core(guest_ram(1, high=832 * KiB))).path), settings
    )
    other_chunks = stored_for(
        str(write_dump(settings.dump_dir, raw, chunk_size=2 * CHUNK).path), settings
    )
    old = stored_for(str(write_dump(settings.dump_dir, raw, chunked=False).path), settings)
    with pytest.raises(InvalidDumpError, match="raw image sizes differ"):
        diff(a, bigger)
    with pytest.raises(InvalidDumpError, match="chunk sizes differ"):
        diff(a, other_chunks)
    with pytest.raises(InvalidDumpError, match="single-stream"):
        diff(old, a)


def test_cli_diff(settings: Settings, tmp_path: Path) -> None:
    raw = core(guest_ram(1))
    a = write_dump(settings.dump_dir, raw)
    b = write_dump(settings.dump_dir, _changed(raw, [HIGH + 0x90000]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDUMP_")}
    env.update(MEMDUMP_DATA_DIR=str(settings.data_dir), MEMDUMP_DUMP_DIR=str(settings.dump_dir))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "memdump.cli", "diff", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )

    ((lo, hi),) = _expected(raw, [HIGH + 0x90000])
    out = run(str(a.path), str(b.path))
    assert out.returncode == 1, out
    lines = out.stdout.splitlines()
    assert lines[0].startswith("# 1 of ") and lines[1:] == [f"{lo:#014x} {hi:#014x} {hi - lo}"]
    out = run("--json", str(a.path), str(a.path))
    assert out.returncode == 0 and json.loads(out.stdout)["ranges"] == [], out
    old = write_dump(settings.dump_dir, raw, chunked=False)
    out = run(str(old.path), str(a.path))
    assert out.returncode == 2 and "single-stream" in out.stderr, out


# -- since the previous capture (the chain's count) ------------------------------------------


def _store(settings: Settings) -> SQLiteRecordStore:
    return SQLiteRecordStore(settings.records_db)


def test_chunks_changed_since_the_previous_capture_of_the_same_vm(settings: Settings) -> None:
    raw = core(guest_ram(1))
    store = _store(settings)
    first = write_dump(settings.dump_dir, raw, when=T0)
    # The same vmid on another hypervisor is another VM, and newer: never compared with.
    elsewhere = write_dump(
        settings.dump_dir, core(guest_ram(7)), hypervisor="hv2", when=T0 + timedelta(days=1)
    )
    store.add(first.record)
    store.add(elsewhere.record)
    new = write_dump(settings.dump_dir, _changed(raw, [HIGH + 0x10, 0x30000]))
    c = since_previous(settings, "hv", "vm1", new.path)
    assert (c.chunks_changed, c.reason) == (2, "")
    assert c.chunk_count == -(-len(raw) // CHUNK)
    assert (
        c.compared_with == str(first.path) and c.compared_with_timestamp == first.row["timestamp"]
    )
    section = c.manifest_section()
    assert section["previous"] == {
        "dump_path": str(first.path),
        "timestamp": first.row["timestamp"],
    }
    assert section["chunks_changed"] == 2 and section["reason"] is None
    same = write_dump(settings.dump_dir, raw)
    assert since_previous(settings, "hv", "vm1", same.path).chunks_changed == 0


def test_no_count_without_a_comparable_previous_capture_and_why(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = core(guest_ram(1))
    new = write_dump(settings.dump_dir, raw)
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "no previous capture" in c.reason
    assert c.manifest_section()["previous"] is None

    store = _store(settings)
    old = write_dump(settings.dump_dir, raw, chunked=False, when=T0)
    store.add(old.record)
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "single-stream" in c.reason
    assert c.compared_with == str(old.path)

    other = write_dump(settings.dump_dir, raw, chunk_size=2 * CHUNK, when=T0 + timedelta(hours=1))
    store.add(other.record)
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "chunk sizes differ" in c.reason

    bigger = write_dump(
        settings.dump_dir, core(guest_ram(1, high=832 * KiB)), when=T0 + timedelta(hours=2)
    )
    store.add(bigger.record)
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "raw image sizes differ" in c.reason

    gone = write_dump(settings.dump_dir, raw, when=T0 + timedelta(hours=3))
    store.add(gone.record)
    gone.path.unlink()
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "no readable copy" in c.reason and "is gone" in c.reason

    store.mark_deleted(gone.row, T0 + timedelta(days=30))
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "deleted by retention" in c.reason

    def down(settings: Settings) -> SQLiteRecordStore:
        raise RecordStoreError("connection refused", retryable=True)

    # It only reads: through the read-only reader.
    monkeypatch.setattr("memdump.records.open_reader", down)
    c = since_previous(settings, "hv", "vm1", new.path)
    assert c.chunks_changed is None and "record store could not be read" in c.reason
    assert c.chunk_count == -(-len(raw) // CHUNK)


def test_a_single_stream_new_dump_is_not_counted(settings: Settings) -> None:
    new = write_dump(settings.dump_dir, core(guest_ram(1)), chunked=False)
    c = since_previous(settings, "hv", "vm1", new.path)
    assert (c.chunks_changed, c.chunk_count) == (None, None)
    assert "not a chunked" in c.reason


def test_an_index_is_read_with_two_ranged_reads(settings: Settings) -> None:
    """What an S3 dump costs (memdump.stored.RangedFile over ranged GETs): the trailer and
    the index members, nothing of the data members."""
    from memdump.stored import RangedFile

    made = write_dump(settings.dump_dir, core(guest_ram(1)))
    blob = made.path.read_bytes()
    reads: list[tuple[int, int]] = []

    def read_range(start: int, length: int) -> bytes:
        reads.append((start, length))
        return blob[start : start + length]

    index = chunkedgz.read_index(RangedFile(len(blob), read_range))  # type: ignore[arg-type]
    assert index is not None and len(index.chunks) == -(-len(made.raw) // CHUNK)
    index_at = index.chunks[-1].gz_offset + index.chunks[-1].gz_size
    assert reads == [(len(blob) - 130, 130), (index_at, len(blob) - 130 - index_at)]
