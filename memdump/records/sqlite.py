"""The embedded record store: one SQLite file (WAL), the default when nothing else is set."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
_NAMES = ("time_us",) + API_FIELDS[1:]
_COLUMNS = ", ".join(_NAMES)
# What a column an older store lacks reads as (its DEFAULT in _SCHEMA).
_DEFAULTS = {name: "NULL" if name in NUMERIC_LATER_FIELDS else "''" for name in LATER_FIELDS}


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


@contextmanager
def read_only(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """A connection that cannot write (``mode=ro`` and ``query_only``) and creates no
    file; sqlite3.OperationalError when there is none to open."""
    db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=timeout)
    try:
        db.execute("PRAGMA query_only = ON")
        yield db
    finally:
        db.close()


class _Reads:
    """The queries, over whatever connection the subclass opens (``_conn``)."""

    def _conn(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _missing(self) -> frozenset[str]:
        """Columns the table lacks (read as their defaults)."""
        return frozenset()

    def _value(self, name: str) -> str:
        """The column, or the default it would hold where the table lacks it."""
        return _DEFAULTS[name] if name in self._missing() else name

    def _column(self, name: str) -> str:
        value = self._value(name)
        return name if value == name else f"{value} AS {name}"

    def list(
        self, limit: int, offset: int, query: RecordQuery | None = None
    ) -> list[dict[str, Any]]:
        where, params = _where(query or RecordQuery())
        try:
            with self._conn() as db:
                rows = db.execute(
                    f"SELECT {', '.join(map(self._column, _NAMES))} FROM mem_dumps{where}"  # noqa: S608
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

    def stats(self) -> Stats:
        try:
            deleted = self._value("deleted_at")
            with self._conn() as db:
                n, vms, size, avg, last = db.execute(
                    "SELECT COUNT(*), COUNT(DISTINCT vmid),"  # noqa: S608 - fixed fragments
                    f" COALESCE(SUM(CASE WHEN {deleted} = '' THEN gzip_size_bytes END), 0),"
                    " COALESCE(AVG(duration_sec), 0), MAX(time_us) FROM mem_dumps"
                ).fetchone()
        except sqlite3.Error as exc:
            raise RecordStoreError(f"cannot read stats: {exc}", retryable=True) from exc
        return Stats(n, vms, size, round(avg, 3), None if last is None else _iso_from_us(last))


class SQLiteRecordReader(_Reads):
    """The store read-only, for the API (memdump.records.open_reader): SQLite's
    ``mode=ro`` and ``query_only``, so no statement through it can write; it creates
    nothing (no file, no schema: until a collector made the store, there are no records)
    and changes no schema (columns an older store lacks read as their defaults)."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self._path = path
        self._timeout = timeout
        self._lacks: frozenset[str] | None = None  # None: not known yet, or lacking some

    def _conn(self) -> AbstractContextManager[sqlite3.Connection]:
        return read_only(self._path, self._timeout)

    def _missing(self) -> frozenset[str]:
        # Asked again until the table has every column (it only ever gains some).
        if self._lacks is not None and not self._lacks:
            return self._lacks
        with self._conn() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(mem_dumps)")}
        self._lacks = frozenset(_ADDED).difference(have)
        return self._lacks

    def list(
        self, limit: int, offset: int, query: RecordQuery | None = None
    ) -> list[dict[str, Any]]:
        return super().list(limit, offset, query) if self._made() else []

    def stats(self) -> Stats:
        return super().stats() if self._made() else Stats(0, 0, 0, 0.0, None)

    def _made(self) -> bool:
        """Whether a collector has made the store yet (the file and its table)."""
        if self._lacks is not None:
            return True
        if not self._path.exists():
            return False
        try:
            with self._conn() as db:
                return bool(
                    db.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mem_dumps'"
                    ).fetchone()
                )
        except sqlite3.Error as exc:
            raise RecordStoreError(
                f"cannot read record store {self._path}: {exc}", retryable=True
            ) from exc

    def close(self) -> None:
        pass


class SQLiteRecordStore(_Reads):
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

    def close(self) -> None:
        pass
