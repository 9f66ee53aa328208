"""Issue 11 item 9: /verify inflates in bounded steps (a mostly-zero dump inflates ~1000:1)
and its hashes are the same as before, for one or several gzip members."""

from __future__ import annotations

import gzip
import hashlib
import os
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from isal import isal_zlib

from memdump import verify as verify_mod
from memdump.settings import Settings
from memdump.verify import _hash_stream, verify

MiB = 1 << 20


def _gzip(raw: bytes, level: int = 9) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def _record(path: Path, raw: bytes, gz: bytes, manifest_sha256: str = "") -> dict[str, Any]:
    return {
        "dump_path": str(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "gz_sha256": hashlib.sha256(gz).hexdigest(),
        "gzip_size_bytes": len(gz),
        "raw_size_bytes": len(raw),
        "manifest_sha256": manifest_sha256,
    }


def _verify_peak(record: dict[str, Any], settings: Settings) -> tuple[Any, int]:
    """verify()'s result and its tracemalloc peak."""
    tracemalloc.start()
    try:
        result = verify(record, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_peak_memory_stays_bounded_on_a_bomb() -> None:
    raw_size = 64 * MiB
    gz = _gzip(bytes(raw_size))  # ~64 KiB: one read chunk holds all of it
    assert len(gz) < MiB
    tracemalloc.start()
    try:
        gz_sha, raw_sha, gz_n, raw_n, error = _hash_stream(_chunks(gz, 4 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error == "" and raw_n == raw_size and gz_n == len(gz)
    assert raw_sha == hashlib.sha256(bytes(raw_size)).hexdigest()
    # One inflate step (1 MiB) and its bookkeeping, not the 64 MiB the chunk inflates to.
    assert peak < 8 * MiB, f"peak {peak} bytes while verifying {raw_size} raw bytes"


class _Recording:
    """A decompressor that records every max_length it is called with."""

    seen: list[int] = []

    def __init__(self, **kwargs: Any) -> None:
        self._d = isal_zlib.decompressobj(**kwargs)

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        _Recording.seen.append(max_length)
        out: bytes = self._d.decompress(data, max_length)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._d, name)


def test_every_inflate_call_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    class Shim:
        error = isal_zlib.error

        @staticmethod
        def decompressobj(**kwargs: Any) -> _Recording:
            return _Recording(**kwargs)

    monkeypatch.setattr(verify_mod, "isal_zlib", Shim)
    _Recording.seen = []
    raw = bytes(8 * MiB) + os.urandom(MiB)
    *_, raw_n, error = _hash_stream(_chunks(_gzip(raw), 4 * MiB))
    assert error == "" and raw_n == len(raw)
    assert _Recording.seen and all(0 < n <= 4 * MiB for n in _Recording.seen)


@pytest.mark.parametrize("chunk", [997, 64 * 1024, 4 * MiB])
def test_hashes_unchanged_across_members_and_chunkings(chunk: int) -> None:
    # Three members (the format allows concatenation), one of them a long zero run whose
    # output fills whole steps, so output pending at a step boundary is exercised.
    parts = [os.urandom(300_000), bytes(3 * MiB + 17), b"tail" * 1000]
    gz = b"".join(_gzip(p, level) for p, level in zip(parts, (1, 9, 6), strict=True))
    raw = b"".join(parts)
    gz_sha, raw_sha, gz_n, raw_n, error = _hash_stream(_chunks(gz, chunk))
    assert error == ""
    assert (gz_sha, raw_sha) == (hashlib.sha256(gz).hexdigest(), hashlib.sha256(raw).hexdigest())
    assert (gz_n, raw_n) == (len(gz), len(raw))


def test_exact_step_multiple_ends_cleanly() -> None:
    raw = bytes(2 * MiB)  # output ends exactly on a step boundary
    *_, raw_n, error = _hash_stream(iter([_gzip(raw)]))
    assert error == "" and raw_n == len(raw)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda gz: gz[:-9], "truncated"),
        (lambda gz: gz + b"\0" * 16, "not a valid gzip stream"),
        (lambda gz: gz[:20] + bytes(b ^ 0xFF for b in gz[20:40]) + gz[40:], "not a valid"),
        (lambda gz: b"", "truncated"),
    ],
)
def test_broken_streams_are_reported(damage: Any, message: str) -> None:
    gz = damage(_gzip(os.urandom(200_000) + bytes(2 * MiB)))
    gz_sha, raw_sha, gz_n, _, error = _hash_stream(_chunks(gz, 65536))
    assert message in error and raw_sha is None
    assert gz_sha == hashlib.sha256(gz).hexdigest() and gz_n == len(gz)


def test_verify_of_a_bomb_dump_is_verified(tmp_path: Path) -> None:
    """Through verify(): a 64 MiB all-zero dump (what an idle VM looks like) verifies."""
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir(mode=0o700)
    raw = bytes(64 * MiB)
    gz = gzip.compress(raw, compresslevel=9, mtime=0)
    path = dump_dir / "101_1699520400.mem.gz"
    path.write_bytes(gz)
    settings = Settings(data_dir=tmp_path, dump_dir=dump_dir)
    result, peak = _verify_peak(_record(path, raw, gz), settings)
    # The hashes agree; a record without a manifest has no signature (issue 15): unsigned.
    assert result.status == "unsigned", result.detail
    assert all(c["ok"] for c in result.checks.values() if c.get("ok") is not None), result
    assert peak < 16 * MiB


def test_a_huge_manifest_is_a_mismatch_read_only_to_its_cap(tmp_path: Path) -> None:
    """A manifest is a few KiB: a 64 MiB one is refused after reading 1 MiB + 1 byte."""
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir(mode=0o700)
    raw = b"memory" * 1000
    gz = gzip.compress(raw, mtime=0)
    path = dump_dir / "101_1699520400.mem.gz"
    path.write_bytes(gz)
    huge = b" " * (64 * MiB)
    (dump_dir / "101_1699520400.manifest.json").write_bytes(huge)
    settings = Settings(data_dir=tmp_path, dump_dir=dump_dir)
    result, peak = _verify_peak(_record(path, raw, gz, hashlib.sha256(huge).hexdigest()), settings)
    assert result.status == "mismatch"
    assert "manifest is larger than" in result.detail
    assert peak < 16 * MiB
