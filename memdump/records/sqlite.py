"""The embedded record store: one SQLite file (WAL), the default when nothing else is set."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memdump.errors import RecordStoreError
from memdump.fsperm import private_dir, private_file
from memdump.records.base import RecordQuery, Stats
from memdump.records.model import (
    API_FIELDS,
    INTEGER_LATER_FIELDS,
    LATER_FIELDS,
    NUMERIC_LATER_FIELDS,
    DumpRecord,
    iso_utc,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mem_dumps (
    time_us INTEGER NOT NULL,          -- dump timestamp, microseconds since the epoch (UTC)
    dom TEXT NOT NULL,
    vmid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    duration_sec REAL NOT NULL,
    gzip_size_bytes INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    atime INTEGER NOT NULL,
    dump_path TEXT NOT NULL,
    gz_sha256 TEXT NOT NULL,
    raw_size_bytes INTEGER NOT NULL,
    hypervisor TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL DEFAULT '',
    analysis TEXT NOT NULL DEFAULT '',
    deleted_at TEXT NOT NULL DEFAULT '',
    collector TEXT NOT NULL DEFAULT '',
    local_path TEXT NOT NULL DEFAULT '',
    local_deleted_at TEXT NOT NULL DEFAULT '',
    s3_uri TEXT NOT NULL DEFAULT '',
    s3_version_id TEXT NOT NULL DEFAULT '',
    s3_deleted_at TEXT NOT NULL DEFAULT '',
    capture_mode TEXT NOT NULL DEFAULT '',
    live_fallback_reason TEXT NOT NULL DEFAULT '',
    pause_ms REAL,                     -- NULL: unknown (records older than the field)
    chunks_changed INTEGER,            -- NULL: not compared (chunks_changed_reason says why)
    chunks_compared_with TEXT NOT NULL DEFAULT '',
    chunks_changed_reason TEXT NOT NULL DEFAULT '',
    s3_lock_mode TEXT NOT NULL DEFAULT '',
    s3_lock_until TEXT NOT NULL DEFAULT '',
    record_signature TEXT NOT NULL DEFAULT '',  -- memdump.recordsig; '' in older records
    PRIMARY KEY (vmid, time_us, sha256)
);
CREATE INDEX IF NOT EXISTS mem_dumps_time ON mem_dumps (time_us DESC);
CREATE INDEX IF NOT EXISTS mem_dumps_path ON mem_dumps (dump_path);
"""
# Columns added after the first release, with their definitions (added on open).
_ADDED = {
    name: "INTEGER"
    if name in INTEGER_LATER_FIELDS
    else "REAL"
    if name in NUMERIC_LATER_FIELDS
    else "TEXT NOT NULL DEFAULT ''"
    for name in LATER_FIELDS
}
# Per-location deletion marks retention may set (memdump.locations).
_LOCATION_MARKS = {"local": "local_deleted_at", "s3": "s3_deleted_at"}
_COLUMNS = ", ".join(("time_us",) + API_FIELDS[1:])


def _us(ts: datetime) -> int:
    delta = ts.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _iso_from_us(us: int) -> str:
    return iso_utc(datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000))


def _where(q: RecordQuery) -> tuple[str, list[Any]]:
    """WHERE clause from fixed fragments; every value is a bound parameter."""
    parts: list[str] = []
    params: list[Any] = []
    if q.since is not None:
        parts.append("time_us >= ?")
        params.append(_us(q.since))
    if q.until is not None:
        parts.append("time_us < ?")
        params.append(_us(q.until))
    for column in ("vmid", "dom", "dump_path"):
        value = getattr(q, column)
        if value is not None:
            parts.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


class SQLiteRecordStore:
    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self._path = path
        self._timeout = timeout
        try:
            private_dir(path.parent)
            private_file(path)  # 0600, and so its -wal/-shm
            with self._conn() as db:
                db.execute("PRAGMA journal_mode=WAL")
                have = {row[1] for row in db.execute("PRAGMA table_info(mem_dumps)")}
                for name, ddl in _ADDED.items():
                    if have and name not in have:  # a store from before the column
                        db.execute(f"ALTER TABLE mem_dumps ADD COLUMN {name} {ddl}")
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise RecordStoreError(
                f"cannot open record store {path}: {exc}", path=str(path)
            ) from exc

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per call: safe from any thread, and SQLite opens fast.
        db = sqlite3.connect(self._path, timeout=self._timeout)
        try:
            with db:
                yield db
        finally:
            db.close()

    def add(self, record: DumpRecord) -> bool:
        d = record.api_dict()
        row = (_us(record.timestamp), *(d[k] for k in API_FIELDS[1:]))
        try:
            with self._conn() as db:
                cur = db.execute(
                    f"INSERT OR IGNORE INTO mem_dumps ({_COLUMNS})"  # noqa: S608 - fixed names
                    f" VALUES ({','.join('?' * len(row))})",
                    row,
                )
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot write record: {exc}", retryable=True) from exc

    def list(
        self, limit: int, offset: int, query: RecordQuery | None = None
    ) -> list[dict[str, Any]]:
        where, params = _where(query or RecordQuery())
        try:
            with self._conn() as db:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM mem_dumps{where}"  # noqa: S608 - fixed fragments
                    " ORDER BY time_us DESC, vmid LIMIT ? OFFSET ?",
                    (*params, limit, offset),
                ).fetchall()
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot read records: {exc}", retryable=True) from exc
        out = []
        for row in rows:
            d = dict(zip(API_FIELDS, row, strict=True))
            d["timestamp"] = _iso_from_us(row[0])
            out.append(d)
        return out

    def mark_deleted(self, record: dict[str, Any], when: datetime) -> None:
        ts = datetime.fromisoformat(str(record["timestamp"])).replace(tzinfo=UTC)
        try:
            with self._conn() as db:
                db.execute(
                    "UPDATE mem_dumps SET deleted_at = ? WHERE vmid = ? AND time_us = ?"
                    " AND sha256 = ?",
                    (iso_utc(when), record["vmid"], _us(ts), record["sha256"]),
                )
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot update record: {exc}", retryable=True) from exc

    def mark_location_deleted(self, record: dict[str, Any], kind: str, when: datetime) -> None:
        """Retention deleted one copy (``kind``: "local" or "s3") of this record's dump."""
        column = _LOCATION_MARKS[kind]
        ts = datetime.fromisoformat(str(record["timestamp"])).replace(tzinfo=UTC)
        try:
            with self._conn() as db:
                db.execute(
                    f"UPDATE mem_dumps SET {column} = ? WHERE vmid = ?"  # noqa: S608 - fixed
                    " AND time_us = ? AND sha256 = ?",
                    (iso_utc(when), record["vmid"], _us(ts), record["sha256"]),
                )
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot update record: {exc}", retryable=True) from exc

    def stats(self) -> Stats:
        try:
            with self._conn() as db:
                n, vms, size, avg, last = db.execute(
                    "SELECT COUNT(*), COUNT(DISTINCT vmid),"
                    " COALESCE(SUM(CASE WHEN deleted_at = '' THEN gzip_size_bytes END), 0),"
                    " COALESCE(AVG(duration_sec), 0), MAX(time_us) FROM mem_dumps"
                ).fetchone()
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot read stats: {exc}", retryable=True) from exc
        return Stats(n, vms, size, round(avg, 3), None if last is None else _iso_from_us(last))

    def close(self) -> None:
        pass
