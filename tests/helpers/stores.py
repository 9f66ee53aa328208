"""A record store for outbox tests: a real SQLite store that can be down, or lose the
answer to a write it took."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memdump.errors import RecordStoreError
from memdump.records.base import Stats
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore


class FlakyStore:
    """A real SQLite store that can be 'down', or lose the answer to a write."""

    def __init__(self, path: Path) -> None:
        self.inner = SQLiteRecordStore(path)
        self.down = False
        self.lose_ack = False
        self.writes: list[str] = []

    def add(self, record: DumpRecord) -> bool:
        if self.down:
            raise RecordStoreError("Connection refused", retryable=True)
        new = self.inner.add(record)
        self.writes.append(record.vmid)
        if self.lose_ack:
            self.lose_ack = False
            raise RecordStoreError("timeout reading the response", retryable=True)
        return new

    def list(self, limit: int, offset: int, query: Any = None) -> list[dict[str, Any]]:
        return self.inner.list(limit, offset, query)

    def stats(self) -> Stats:
        return self.inner.stats()

    def close(self) -> None:
        pass


def record_row(settings: Any, dump_path: str) -> dict[str, Any]:
    """The one row of ``settings``' SQLite record store whose dump_path is ``dump_path``."""
    rows = SQLiteRecordStore(settings.records_db).list(100, 0)
    (row,) = [r for r in rows if r["dump_path"] == dump_path]
    return row
