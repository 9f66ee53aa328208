"""The change extras of a record (issue 14, item 5): chunks_changed (a whole number, 0
included, or null), chunks_compared_with and chunks_changed_reason round-trip through both
record stores (SQLite and InfluxDB 3 through the real client and the project's test
server), and a SQLite table from before them is upgraded (old rows: null and empty)."""

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
from tests.helpers.contract import API_RECORD_FIELDS
from tests.influxdb3_server import InfluxDB3TestServer

FIELDS = ("chunks_changed", "chunks_compared_with", "chunks_changed_reason")
NO_PREVIOUS = "no previous capture of this VM in the record store"


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


def test_change_extras_round_trip(store: RecordStore) -> None:
    store.add(rec(1, "changed", chunks_changed=37, chunks_compared_with="/d/a.mem.gz"))
    store.add(rec(2, "same", chunks_changed=0, chunks_compared_with="/d/b.mem.gz"))
    store.add(rec(3, "first", chunks_changed_reason=NO_PREVIOUS))
    rows = {r["vmid"]: r for r in store.list(10, 0)}
    assert all(list(r) == API_RECORD_FIELDS for r in rows.values())
    got = {vm: tuple(r[k] for k in FIELDS) for vm, r in rows.items()}
    assert got == {
        "changed": (37, "/d/a.mem.gz", ""),
        "same": (0, "/d/b.mem.gz", ""),
        "first": (None, "", NO_PREVIOUS),
    }
    # A whole number stays one (not 37.0) in the rows the API and CSV show.
    assert type(rows["changed"]["chunks_changed"]) is int


def test_sqlite_store_from_before_the_change_extras_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "v4.db"
    s = SQLiteRecordStore(db)
    with sqlite3.connect(db) as c:  # issue 12's table: drop the new columns again
        for name in FIELDS:
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
    assert tuple(new[k] for k in FIELDS) == (5, "/d/x.mem.gz", "")
    assert tuple(old[k] for k in FIELDS) == (None, "", "")
