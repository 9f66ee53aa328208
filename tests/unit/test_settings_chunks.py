"""The chunked .mem.gz's settings: MEMDUMP_CHUNK_SIZE and MEMDUMP_COMPRESS_THREADS."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from memdump.settings import Settings


def test_defaults_are_64_kib_and_cores_minus_one(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.chunk_size == 64 << 10
    assert s.compression_workers == max(1, (os.cpu_count() or 1) - 1)
    monkeypatch.setattr("memdump.settings.os.cpu_count", lambda: 1)
    assert Settings().compression_workers == 1
    monkeypatch.setattr("memdump.settings.os.cpu_count", lambda: 16)
    assert Settings().compression_workers == 15


def test_environment_sets_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMDUMP_CHUNK_SIZE", str(4 << 20))
    monkeypatch.setenv("MEMDUMP_COMPRESS_THREADS", "3")
    s = Settings()
    assert (s.chunk_size, s.compression_workers) == (4 << 20, 3)


@pytest.mark.parametrize("bad", [3 << 20, 1 << 10, 1 << 30, 0])
def test_a_chunk_size_not_a_power_of_two_in_range_is_refused(bad: int) -> None:
    with pytest.raises(ValidationError):
        Settings(chunk_size=bad)


def test_zero_threads_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(compress_threads=0)
