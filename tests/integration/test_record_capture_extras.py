"""The capture-mode extras of a record (issue 12, item 4): capture_mode,
live_fallback_reason and pause_ms round-trip through both record stores (SQLite and
InfluxDB 3 through the real client and the project's test server), and tables from before
these fields are read with them empty (pause_ms: None). Likewise the change extras (issue
14, item 5): chunks_changed (a whole number, 0 included, or null), chunks_compared_with
and chunks_changed_reason."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memdump.records.base import RecordStore
from memdump.records.influxdb3 import InfluxDB3RecordStore
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import InfluxDB3Settings
from tests.helpers.contract import STORED_RECORD_FIELDS
from tests.influxdb3_server import InfluxDB3TestServer


@pytest.fixture(scope="module")
def influx() -> Iterator[InfluxDB3TestServer]:
    srv = InfluxDB3TestServer(host="127.0.0.1", port=0, token="t").start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "influxdb3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, influx: InfluxDB3TestServer
) -> RecordStore:
    if request.param == "sqlite":
        return SQLiteRecordStore(tmp_path / "records.db")
    return InfluxDB3RecordStore(
        InfluxDB3Settings(url=influx.url, token="t", database=f"db{uuid.uuid4().hex}")
    )


def rec(minute: int, vmid: str, **extra: object) -> DumpRecord:
    return DumpRecord(
        datetime(2026, 11, 29, 4, minute, tzinfo=UTC), vmid, vmid, f"{minute:064x}", 1.5,
        100, 1, 2, 3, f"/d/{vmid}.mem.gz", "e" * 64, 200, "lab", **extra,  # type: ignore[arg-type]
    )  # fmt: skip


MODE_FIELDS = ("capture_mode", "live_fallback_reason", "pause_ms")
REASON = "QEMU 5.2 on hv is older than 6.0 (background-snapshot)"


def test_capture_extras_round_trip(store: RecordStore) -> None:
    store.add(rec(1, "live-vm", capture_mode="live", pause_ms=7.25))
    store.add(rec(2, "fallback-vm", capture_mode="paused", live_fallback_reason=REASON,
                  pause_ms=2634.512))  # fmt: skip
    store.add(rec(3, "unknown-pause", capture_mode="paused"))
    rows = {r["vmid"]: r for r in store.list(10, 0)}
    assert all(list(r) == STORED_RECORD_FIELDS for r in rows.values())
    got = {vm: tuple(r[k] for k in MODE_FIELDS) for vm, r in rows.items()}
    assert got == {
        "live-vm": ("live", "", 7.25),
        "fallback-vm": ("paused", REASON, 2634.512),
        "unknown-pause": ("paused", "", None),
    }


def test_sqlite_store_from_before_capture_modes_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "v3.db"
    with sqlite3.connect(db) as c:  # issue 11's schema: locations, no capture mode
        c.execute(
            "CREATE TABLE mem_dumps (time_us INTEGER NOT NULL, dom TEXT NOT NULL, vmid TEXT"
            " NOT NULL, sha256 TEXT NOT NULL, duration_sec REAL NOT NULL, gzip_size_bytes"
            " INTEGER NOT NULL, ctime INTEGER NOT NULL, mtime INTEGER NOT NULL, atime INTEGER"
            " NOT NULL, dump_path TEXT NOT NULL, gz_sha256 TEXT NOT NULL, raw_size_bytes"
            " INTEGER NOT NULL, hypervisor TEXT NOT NULL, manifest_sha256 TEXT NOT NULL"
            " DEFAULT '', analysis TEXT NOT NULL DEFAULT '', deleted_at TEXT NOT NULL"
            " DEFAULT '', collector TEXT NOT NULL DEFAULT '', local_path TEXT NOT NULL DEFAULT"
            " '', local_deleted_at TEXT NOT NULL DEFAULT '', s3_uri TEXT NOT NULL DEFAULT '',"
            " s3_version_id TEXT NOT NULL DEFAULT '', s3_deleted_at TEXT NOT NULL DEFAULT '',"
            " PRIMARY KEY (vmid, time_us, sha256))"
        )
        c.execute(
            "INSERT INTO mem_dumps VALUES (1, 'vm-1', '1', 'a', 1.0, 2, 3, 4, 5, '/d/1.mem.gz',"
            " 'b', 6, 'lab', 'm', 'passed', '', 'col', '/d/1.mem.gz', '', '', '', '')"
        )
    c.close()
    s = SQLiteRecordStore(db)
    s.add(rec(1, "new", capture_mode="live", pause_ms=3.0))
    new, old = s.list(10, 0)
    assert tuple(new[k] for k in MODE_FIELDS) == ("live", "", 3.0)
    assert tuple(old[k] for k in MODE_FIELDS) == ("", "", None)
    assert old["analysis"] == "passed" and old["local_path"] == "/d/1.mem.gz"


def test_influx_table_from_before_capture_modes(influx: InfluxDB3TestServer) -> None:
    from influxdb_client_3 import InfluxDBClient3, Point, WritePrecision

    db = f"db{uuid.uuid4().hex}"
    old = (
        Point("mem_dumps").tag("dom", "vm-1").tag("vmid", "1")
        .field("sha256", "a").field("duration_sec", 1.0).field("gzip_size_bytes", 2)
        .field("ctime", 3).field("mtime", 4).field("atime", 5).field("dump_path", "/d/1.mem.gz")
        .field("gz_sha256", "b").field("raw_size_bytes", 6).field("hypervisor", "lab")
        .field("manifest_sha256", "m").field("analysis", "passed").field("deleted_at", "")
        .field("collector", "col").field("local_path", "/d/1.mem.gz")
        .time(1_000_000_000, WritePrecision.NS)
    )  # fmt: skip
    with InfluxDBClient3(host=influx.url, database=db, token="t") as c:
        c.write(record=old)
    s = InfluxDB3RecordStore(InfluxDB3Settings(url=influx.url, token="t", database=db))
    (row,) = s.list(10, 0)
    assert list(row) == STORED_RECORD_FIELDS
    assert tuple(row[k] for k in MODE_FIELDS) == ("", "", None)
    assert row["analysis"] == "passed" and row["collector"] == "col"
    s.add(rec(1, "new", capture_mode="live", live_fallback_reason="", pause_ms=9.5))
    rows = {r["vmid"]: r for r in s.list(10, 0)}
    assert tuple(rows["new"][k] for k in MODE_FIELDS) == ("live", "", 9.5)
    assert tuple(rows["1"][k] for k in MODE_FIELDS) == ("", "", None)


CHANGE_FIELDS = ("chunks_changed", "chunks_compared_with", "chunks_changed_reason")
NO_PREVIOUS = "no previous capture of this VM in the record store"


def test_change_extras_round_trip(store: RecordStore) -> None:
    store.add(rec(1, "changed", chunks_changed=37, chunks_compared_with="/d/a.mem.gz"))
    store.add(rec(2, "same", chunks_changed=0, chunks_compared_with="/d/b.mem.gz"))
    store.add(rec(3, "first", chunks_changed_reason=NO_PREVIOUS))
    rows = {r["vmid"]: r for r in store.list(10, 0)}
    assert all(list(r) == STORED_RECORD_FIELDS for r in rows.values())
    got = {vm: tuple(r[k] for k in CHANGE_FIELDS) for vm, r in rows.items()}
    assert got == {
        "changed": (37, "/d/a.mem.gz", ""),
        "same": (0, "/d/b.mem.gz", ""),
        "first": (None, "", NO_PREVIOUS),
    }
    # A whole number stays one (not 37.0) in the rows the API and CSV show.
    assert type(rows["changed"]["chunks_changed"]) is int


def test_sqlite_store_from_before_the_change_extras_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "v5.db"
    SQLiteRecordStore(db)
    with sqlite3.connect(db) as c:  # issue 12's table: without the change columns
        for name in CHANGE_FIELDS:
            c.execute(f"ALTER TABLE mem_dumps DROP COLUMN {name}")
        c.execute(
            "INSERT INTO mem_dumps (time_us, dom, vmid, sha256, duration_sec, gzip_size_bytes,"
            " ctime, mtime, atime, dump_path, gz_sha256, raw_size_bytes, hypervisor) VALUES"
            " (1, 'vm-1', '1', 'a', 1.0, 2, 3, 4, 5, '/d/1.mem.gz', 'b', 6, 'lab')"
        )
    c.close()
    s = SQLiteRecordStore(db)
    s.add(rec(1, "new", chunks_changed=5, chunks_compared_with="/d/x.mem.gz"))
    new, old = s.list(10, 0)
    assert tuple(new[k] for k in CHANGE_FIELDS) == (5, "/d/x.mem.gz", "")
    assert tuple(old[k] for k in CHANGE_FIELDS) == (None, "", "")
