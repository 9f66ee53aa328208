import errno
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from isal import igzip

from memdump import chunkedgz
from memdump.errors import (
    CaptureTimeoutError,
    DumpFailedError,
    InvalidDumpError,
    ShortDumpError,
    StorageError,
    StreamInterruptedError,
)
from memdump.pipeline import write_dump
from tests.helpers.elfgen import make_core, mixed_bytes
from tests.helpers.sources import FakeSource


@pytest.fixture
def core() -> bytes:
    return make_core([(0, mixed_bytes(640 * 1024, 3)), (1 << 20, mixed_bytes(3 << 20, 4))])


def _only_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_roundtrip_hashes_mode_and_progress(tmp_path: Path, core: bytes) -> None:
    seen: list[tuple[int, int | None]] = []
    res = write_dump(
        FakeSource(core), tmp_path / "d", "101_1.mem.gz", progress=lambda d, t: seen.append((d, t))
    )
    assert res.path == tmp_path / "d" / "101_1.mem.gz"
    raw = igzip.decompress(res.path.read_bytes())
    assert raw == core
    assert res.raw_bytes == len(core)
    assert res.raw_sha256 == hashlib.sha256(core).hexdigest()
    assert res.gz_sha256 == hashlib.sha256(res.path.read_bytes()).hexdigest()
    assert res.gz_bytes == res.path.stat().st_size
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert _only_files(tmp_path / "d") == ["101_1.mem.gz"]
    assert seen[-1] == (len(core), len(core))


def test_compresses(tmp_path: Path) -> None:
    core = make_core([(0, bytes(4 << 20))])
    res = write_dump(FakeSource(core), tmp_path, "z.mem.gz")
    assert res.gz_bytes < len(core) // 50


@pytest.mark.parametrize("cut", [0, 10, 200, 1_000_000])
def test_short_stream_leaves_nothing(tmp_path: Path, core: bytes, cut: int) -> None:
    src = FakeSource(core[:cut])
    with pytest.raises(ShortDumpError):
        write_dump(src, tmp_path, "x.mem.gz")
    assert _only_files(tmp_path) == []
    assert src.aborted


def test_longer_than_declared_is_refused(tmp_path: Path, core: bytes) -> None:
    with pytest.raises(ShortDumpError):
        write_dump(FakeSource(core + b"extra"), tmp_path, "x.mem.gz")
    assert _only_files(tmp_path) == []


def test_not_elf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDumpError):
        write_dump(FakeSource(b"error: domain not found\n" * 10), tmp_path, "x.mem.gz")
    assert _only_files(tmp_path) == []


def test_producer_failure_wins_over_length(tmp_path: Path, core: bytes) -> None:
    err = DumpFailedError("virsh said no", stderr="boom")
    with pytest.raises(DumpFailedError):
        write_dump(FakeSource(core[:5000], close_error=err), tmp_path, "x.mem.gz")
    assert _only_files(tmp_path) == []


def test_producer_failure_after_full_length(tmp_path: Path, core: bytes) -> None:
    # Every byte arrived but the producer reports failure: still not a dump.
    with pytest.raises(DumpFailedError):
        write_dump(FakeSource(core, close_error=DumpFailedError("rc 1")), tmp_path, "x.mem.gz")
    assert _only_files(tmp_path) == []


def test_interrupted_stream(tmp_path: Path, core: bytes) -> None:
    src = FakeSource(core, fail_at=600_000)
    with pytest.raises(StreamInterruptedError):
        write_dump(src, tmp_path, "x.mem.gz")
    assert _only_files(tmp_path) == [] and src.aborted


def test_deadline(tmp_path: Path, core: bytes) -> None:
    src = FakeSource(core, chunk=100_000, delay=0.05)
    with pytest.raises(CaptureTimeoutError) as ei:
        write_dump(src, tmp_path, "x.mem.gz", deadline=time.monotonic() + 0.2)
    assert src.aborted and _only_files(tmp_path) == []
    assert ei.value.fields["bytes_done"] > 0


def test_never_overwrites_existing_dump(tmp_path: Path, core: bytes) -> None:
    (tmp_path / "x.mem.gz").write_bytes(b"evidence")
    with pytest.raises(StorageError):
        write_dump(FakeSource(core), tmp_path, "x.mem.gz")
    assert (tmp_path / "x.mem.gz").read_bytes() == b"evidence"
    assert _only_files(tmp_path) == ["x.mem.gz"]


def test_disk_full(tmp_path: Path, core: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    written = {"n": 0}

    def full_write(fd: int, data: bytes) -> int:
        written["n"] += 1
        if written["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("memdump.pipeline.os.write", full_write)
    src = FakeSource(core, chunk=50_000)
    with pytest.raises(StorageError) as ei:
        write_dump(src, tmp_path, "x.mem.gz", level=0)
    assert "no space" in str(ei.value)
    assert src.aborted and _only_files(tmp_path) == []


def test_unwritable_dir(tmp_path: Path, core: bytes) -> None:
    (tmp_path / "f").write_text("a file, not a dir")
    src = FakeSource(core)
    with pytest.raises(StorageError):
        write_dump(src, tmp_path / "f", "x.mem.gz")
    assert src.aborted


class BlockingSource(FakeSource):
    """Sends the headers, then blocks like a stalled SSH read until aborted."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, chunk=4096)
        import threading

        self.unblock = threading.Event()

    def readinto(self, view: memoryview) -> int:
        if self.pos == 0:
            return super().readinto(view)
        self.unblock.wait(60)
        raise StreamInterruptedError("channel closed", op="stream")

    def abort(self) -> None:
        super().abort()
        self.unblock.set()


def test_deadline_interrupts_a_blocked_read(tmp_path: Path, core: bytes) -> None:
    src = BlockingSource(core)
    t0 = time.monotonic()
    with pytest.raises(CaptureTimeoutError):
        write_dump(src, tmp_path, "x.mem.gz", deadline=time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 5
    assert src.aborted and _only_files(tmp_path) == []


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("chunk_size", [64 << 10, 1 << 20, 8 << 20])
def test_the_dump_is_chunked_and_indexed_whatever_the_workers(
    tmp_path: Path, core: bytes, threads: int, chunk_size: int
) -> None:
    # Members are written in raw order however the workers finish; chunk sizes below,
    # equal to and above the reader's 4 MiB buffers.
    src = FakeSource(core, chunk=70_001)
    res = write_dump(src, tmp_path, "c.mem.gz", chunk_size=chunk_size, threads=threads)
    blob = res.path.read_bytes()
    assert igzip.decompress(blob) == core
    with res.path.open("rb") as f:
        index = chunkedgz.read_index(f)
        assert index is not None and index == res.chunks
        assert index.raw_size == len(core) and index.chunk_size == chunk_size
        assert len(index.chunks) == -(-len(core) // chunk_size)
        for chunk in index.chunks:
            want = core[chunk.raw_offset : chunk.raw_offset + chunk_size]
            assert chunkedgz.read_chunk(f, chunk) == want
    assert res.gz_bytes == len(blob)


def test_a_worker_error_fails_the_dump_and_leaves_nothing(
    tmp_path: Path, core: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = chunkedgz.data_member

    def failing(number: int, raw: bytes | memoryview, level: int) -> chunkedgz.Member:
        calls["n"] += 1
        if number == 2:
            raise MemoryError("worker out of memory")
        return real(number, raw, level)

    monkeypatch.setattr("memdump.pipeline.data_member", failing)
    src = FakeSource(core, chunk=50_000)
    with pytest.raises(MemoryError):
        write_dump(src, tmp_path, "w.mem.gz", chunk_size=64 << 10, threads=2)
    assert src.aborted and _only_files(tmp_path) == []
    assert calls["n"] >= 3


def test_the_producer_end_is_waited_for_once_the_file_is_whole_and_on_disk(
    tmp_path: Path, core: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hypervisor script's tail (its exit, a live capture's checks of QEMU) runs beside
    # the last buffers' hashing, compression and fsync, not after them; its verdict still
    # comes before the length check and the commit.
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    class Source(FakeSource):
        def close_ok(self) -> None:
            part = tmp_path / "o.mem.gz.part"
            events.append(f"close_ok part={part.exists()} final={(tmp_path / 'o.mem.gz').exists()}")
            super().close_ok()

    monkeypatch.setattr("memdump.pipeline.os.fsync", fsync)
    res = write_dump(Source(core), tmp_path, "o.mem.gz")
    # (then _commit's fsync of the directory)
    assert events[:2] == ["fsync", "close_ok part=True final=False"]
    assert igzip.decompress(res.path.read_bytes()) == core
