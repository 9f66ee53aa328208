"""Records the store could not take are kept here and written later, in order; never
dropped. A local SQLite file (under data_dir), separate from any record store.

``DurableRecorder.record()`` is what the record task calls: it writes through to the
store when it can, otherwise queues; queued records are replayed first, so the store
receives them in capture order. Stores are idempotent on ``DumpRecord.key`` (vmid +
timestamp + sha256), so a replay after a write whose answer was lost stays one record.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memdump.errors import MemdumpError, RecordStoreError
from memdump.fsperm import private_dir, private_file
from memdump.records.base import RecordStore
from memdump.records.model import DumpRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
"""


@dataclass(frozen=True)
class OutboxState:
    depth: int
    oldest_queued_at: float | None
    last_error: str | None


class Outbox:
    def __init__(self, path: Path) -> None:
        self._path = path
        private_dir(path.parent)
        private_file(path)  # 0600, and so its -wal/-shm
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def put(self, record: DumpRecord, error: str) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO outbox (key, record, queued_at, last_error)"
                " VALUES (?, ?, ?, ?)",
                (record.key, json.dumps(record.full_dict()), time.time(), error[:2000]),
            )

    def pending(self) -> list[tuple[int, DumpRecord]]:
        with self._db() as db:
            rows = db.execute("SELECT seq, record FROM outbox ORDER BY seq").fetchall()
        return [(seq, DumpRecord.from_dict(json.loads(rec))) for seq, rec in rows]

    def done(self, seq: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def failed(self, seq: int, error: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error[:2000], seq),
            )

    def state(self) -> OutboxState:
        with self._db() as db:
            return _state(db)


class OutboxReader:
    """The outbox's state, read-only (the API's /outbox and /status): the records waiting
    there are evidence, and the API has no business removing them. Nothing is created:
    no file yet means nothing waits."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def state(self) -> OutboxState:
        from memdump.records.sqlite import read_only

        if not self._path.exists():
            return OutboxState(0, None, None)
        try:
            with read_only(self._path, 30) as db:
                return _state(db)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # made, its schema not yet written
                return OutboxState(0, None, None)
            raise


def _state(db: sqlite3.Connection) -> OutboxState:
    depth, oldest = db.execute("SELECT COUNT(*), MIN(queued_at) FROM outbox").fetchone()
    row = db.execute("SELECT last_error FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
    return OutboxState(depth, oldest, row[0] if row else None)


class DurableRecorder:
    """Write-through to ``store`` with ``outbox`` as the safety net."""

    def __init__(self, store: RecordStore, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox
        self.last_error = ""

    def record(self, record: DumpRecord) -> bool:
        """True if the record is in the store now, False if it waits in the outbox.
        Raises only if even the outbox cannot take it (local disk failure)."""
        if self.replay() > 0:
            # Older records are still waiting: keep the order, queue behind them.
            self.outbox.put(record, f"queued behind earlier records: {self.last_error}")
            return self.replay() == 0
        try:
            self.store.add(record)
            return True
        except MemdumpError as exc:
            self.outbox.put(record, str(exc))
            return False

    def replay(self) -> int:
        """Write queued records in order until one fails; returns how many remain."""
        pending = self.outbox.pending()
        for i, (seq, rec) in enumerate(pending):
            try:
                self.store.add(rec)
            except MemdumpError as exc:
                self.last_error = str(exc)
                self.outbox.failed(seq, self.last_error)
                return len(pending) - i
            self.outbox.done(seq)
        return 0


__all__ = ["DurableRecorder", "Outbox", "OutboxState", "RecordStoreError"]
