"""One suite for every record store: SQLite (embedded) and InfluxDB 3 (through the real
client and the project's test server) must give the same answers for the same data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memdump.records.base import RecordQuery, RecordStore
from memdump.records.influxdb3 import InfluxDB3RecordStore
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordReader, SQLiteRecordStore
from memdump.settings import InfluxDB3Settings
from tests.helpers.contract import STORED_RECORD_FIELDS
from tests.influxdb3_server import InfluxDB3TestServer


@pytest.fixture(scope="module")
def influx() -> Iterator[InfluxDB3TestServer]:
    srv = InfluxDB3TestServer(host="127.0.0.1", port=0, token="t").start()
    yield srv
    srv.stop()


def _make(kind: str, tmp_path: Path, influx: InfluxDB3TestServer) -> RecordStore:
    if kind == "sqlite":
        return SQLiteRecordStore(tmp_path / "records.db")
    # A database per test keeps tests apart on the shared server.
    return InfluxDB3RecordStore(
        InfluxDB3Settings(url=influx.url, token="t", database=f"db{uuid.uuid4().hex}")
    )


@pytest.fixture(params=["sqlite", "influxdb3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, influx: InfluxDB3TestServer
) -> RecordStore:
    return _make(request.param, tmp_path, influx)


def rec(i: int, vmid: str, **extra: str) -> DumpRecord:
    ts = datetime(2025, 11, 11, 10, 0, tzinfo=UTC) + timedelta(seconds=37 * i, microseconds=i)
    return DumpRecord(
        ts,
        f"vm-{vmid}",
        vmid,
        f"{i:064x}",
        round(0.5 + i * 1.25, 3),
        1 << (20 + i % 8),
        1699520400 + i,
        1699520401 + i,
        1699520402 + i,
        f"/var/dumps/{vmid}_{i}.mem.gz",
        "e" * 64,
        1 << 30,
        "lab",
        **extra,
    )


DATA = [rec(i, vm) for i, vm in enumerate(["101", "102", "101", "103", "102", "101", "104"])]


def test_empty(store: RecordStore) -> None:
    assert store.list(1000, 0) == []
    st = store.stats()
    assert (
        st.total_dumps,
        st.total_vms,
        st.total_size_bytes,
        st.avg_duration_sec,
        st.last_dump,
    ) == (0, 0, 0, 0.0, None)


def test_order_paging_and_fields(store: RecordStore) -> None:
    for r in reversed(DATA):  # written out of order
        store.add(r)
    rows = store.list(1000, 0)
    assert rows == [r.api_dict() for r in reversed(DATA)]
    assert all(list(row) == STORED_RECORD_FIELDS for row in rows)
    assert store.list(3, 2) == rows[2:5]
    assert store.list(5, 100) == []


def test_stats(store: RecordStore) -> None:
    for r in DATA:
        store.add(r)
    st = store.stats()
    assert st.total_dumps == len(DATA) and st.total_vms == 4
    assert st.total_size_bytes == sum(r.gzip_size_bytes for r in DATA)
    assert st.avg_duration_sec == round(sum(r.duration_sec for r in DATA) / len(DATA), 3)
    assert st.last_dump == DATA[-1].contract_dict()["timestamp"]


def test_idempotent(store: RecordStore) -> None:
    store.add(DATA[0])
    store.add(DATA[0])
    assert store.stats().total_dumps == 1


def test_both_backends_answer_alike(tmp_path: Path, influx: InfluxDB3TestServer) -> None:
    a, b = _make("sqlite", tmp_path, influx), _make("influxdb3", tmp_path, influx)
    for r in DATA:
        a.add(r)
        b.add(r)
    for limit, offset in ((1000, 0), (2, 1), (4, 3)):
        assert a.list(limit, offset) == b.list(limit, offset)
    assert a.stats() == b.stats()
    for q in QUERIES:
        assert a.list(1000, 0, q) == b.list(1000, 0, q), q


T0 = DATA[0].timestamp
QUERIES = [
    RecordQuery(vmid="101"),
    RecordQuery(dom="vm-102"),
    RecordQuery(since=DATA[2].timestamp),
    RecordQuery(until=DATA[2].timestamp),
    RecordQuery(since=DATA[1].timestamp, until=DATA[5].timestamp, vmid="101"),
    RecordQuery(vmid="nope"),
    RecordQuery(since=DATA[5].timestamp, until=DATA[1].timestamp),
    RecordQuery(dump_path=DATA[3].dump_path),
]


@pytest.mark.parametrize("q", QUERIES, ids=[str(i) for i in range(len(QUERIES))])
def test_filters(store: RecordStore, q: RecordQuery) -> None:
    for r in DATA:
        store.add(r)

    def wanted(r: DumpRecord) -> bool:
        return (
            (q.since is None or r.timestamp >= q.since)
            and (q.until is None or r.timestamp < q.until)
            and (q.vmid is None or r.vmid == q.vmid)
            and (q.dom is None or r.dom == q.dom)
            and (q.dump_path is None or r.dump_path == q.dump_path)
        )

    want = [r.api_dict() for r in reversed(DATA) if wanted(r)]
    assert store.list(1000, 0, q) == want
    assert store.list(1, 1, q) == want[1:2]


def test_extras_round_trip(store: RecordStore) -> None:
    r = rec(9, "105", manifest_sha256="f" * 64, analysis="passed")
    store.add(r)
    (row,) = store.list(10, 0)
    assert row["manifest_sha256"] == "f" * 64 and row["analysis"] == "passed"
    assert list(row) == STORED_RECORD_FIELDS


def test_sqlite_store_from_before_the_extras_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as c:  # the first release's schema
        c.execute(
            "CREATE TABLE mem_dumps (time_us INTEGER NOT NULL, dom TEXT NOT NULL, vmid TEXT"
            " NOT NULL, sha256 TEXT NOT NULL, duration_sec REAL NOT NULL, gzip_size_bytes"
            " INTEGER NOT NULL, ctime INTEGER NOT NULL, mtime INTEGER NOT NULL, atime INTEGER"
            " NOT NULL, dump_path TEXT NOT NULL, gz_sha256 TEXT NOT NULL, raw_size_bytes"
            " INTEGER NOT NULL, hypervisor TEXT NOT NULL, PRIMARY KEY (vmid, time_us, sha256))"
        )
        c.execute(
            "INSERT INTO mem_dumps VALUES (1, 'vm-1', '1', 'a', 1.0, 2, 3, 4, 5, '/d/1.mem.gz',"
            " 'b', 6, 'lab')"
        )
    c.close()
    # The API's read-only reader reads it as it is (its later columns as their defaults)
    # and changes nothing: no new columns, no new file.
    reader = SQLiteRecordReader(db)
    (old,) = reader.list(10, 0)
    assert old["vmid"] == "1" and old["manifest_sha256"] == "" and old["pause_ms"] is None
    assert reader.stats().total_dumps == 1
    with sqlite3.connect(db) as c:
        assert len(c.execute("PRAGMA table_info(mem_dumps)").fetchall()) == 13
    c.close()
    s = SQLiteRecordStore(db)
    s.add(rec(1, "102", analysis="passed"))
    rows = s.list(10, 0)
    assert [r["analysis"] for r in rows] == ["passed", ""]
    assert rows[1]["manifest_sha256"] == ""
    assert reader.list(10, 0) == rows  # the upgraded table, read the same


def test_sqlite_reader_creates_nothing_and_cannot_write(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "records.db"
    reader = SQLiteRecordReader(path)
    assert reader.list(10, 0) == [] and reader.stats().total_dumps == 0
    assert list(tmp_path.iterdir()) == []
    SQLiteRecordStore(path).add(rec(1, "101"))
    assert [r["vmid"] for r in reader.list(10, 0)] == ["101"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"), reader._conn() as db:
        db.execute("DELETE FROM mem_dumps")
    assert len(SQLiteRecordStore(path).list(10, 0)) == 1


def test_influx_table_from_before_the_extras_is_read(influx: InfluxDB3TestServer) -> None:
    from influxdb_client_3 import InfluxDBClient3, Point, WritePrecision

    db = f"db{uuid.uuid4().hex}"
    old = (
        Point("mem_dumps").tag("dom", "vm-1").tag("vmid", "1")
        .field("sha256", "a").field("duration_sec", 1.0).field("gzip_size_bytes", 2)
        .field("ctime", 3).field("mtime", 4).field("atime", 5).field("dump_path", "/d/1.mem.gz")
        .field("gz_sha256", "b").field("raw_size_bytes", 6).field("hypervisor", "lab")
        .time(1_000_000_000, WritePrecision.NS)
    )  # fmt: skip
    with InfluxDBClient3(host=influx.url, database=db, token="t") as c:
        c.write(record=old)
    s = InfluxDB3RecordStore(InfluxDB3Settings(url=influx.url, token="t", database=db))
    (row,) = s.list(10, 0)
    assert row["dump_path"] == "/d/1.mem.gz" and row["manifest_sha256"] == row["analysis"] == ""
    assert list(row) == STORED_RECORD_FIELDS


def test_mark_deleted_keeps_the_record_and_frees_its_size(store: RecordStore) -> None:
    for r in DATA:
        store.add(r)
    before = store.stats()
    target = store.list(1000, 0, RecordQuery(dump_path=DATA[2].dump_path))[0]
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    store.mark_deleted(target, when)
    (after_row,) = store.list(1000, 0, RecordQuery(dump_path=DATA[2].dump_path))
    assert after_row == {**target, "deleted_at": "2026-01-02T03:04:05.000000"}
    st = store.stats()
    assert st.total_dumps == before.total_dumps
    assert st.total_size_bytes == before.total_size_bytes - DATA[2].gzip_size_bytes


# -- issue 11, item 3: every location of a dump, each deleted on its own ---------------

LOCATED = {
    "collector": "col-1",
    "local_path": "/var/dumps/lab_105_20261129T015216.123456Z_3f9a1c.mem.gz",
    "s3_uri": "s3://b/memdump/lab_105_20261129T015216.123456Z_3f9a1c.mem.gz",
    "s3_version_id": "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY",
}


def test_locations_round_trip_and_are_marked_one_by_one(store: RecordStore) -> None:
    r = rec(9, "105", **LOCATED)
    store.add(r)
    (row,) = store.list(10, 0)
    assert {k: row[k] for k in LOCATED} == LOCATED
    assert row["local_deleted_at"] == row["s3_deleted_at"] == row["deleted_at"] == ""
    store.mark_location_deleted(row, "s3", datetime(2026, 1, 2, tzinfo=UTC))
    (row2,) = store.list(10, 0)
    assert row2 == {**row, "s3_deleted_at": "2026-01-02T00:00:00.000000"}
    store.mark_location_deleted(row, "local", datetime(2026, 1, 3, tzinfo=UTC))
    (row3,) = store.list(10, 0)
    assert row3["local_deleted_at"] == "2026-01-03T00:00:00.000000"
    assert row3["deleted_at"] == ""  # retention marks the record itself
    assert store.stats().total_size_bytes == r.gzip_size_bytes


def test_sqlite_store_from_before_locations_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "v2.db"
    with sqlite3.connect(db) as c:  # the schema with retention's deleted_at, no locations
        c.execute(
            "CREATE TABLE mem_dumps (time_us INTEGER NOT NULL, dom TEXT NOT NULL, vmid TEXT"
            " NOT NULL, sha256 TEXT NOT NULL, duration_sec REAL NOT NULL, gzip_size_bytes"
            " INTEGER NOT NULL, ctime INTEGER NOT NULL, mtime INTEGER NOT NULL, atime INTEGER"
            " NOT NULL, dump_path TEXT NOT NULL, gz_sha256 TEXT NOT NULL, raw_size_bytes"
            " INTEGER NOT NULL, hypervisor TEXT NOT NULL, manifest_sha256 TEXT NOT NULL"
            " DEFAULT '', analysis TEXT NOT NULL DEFAULT '', deleted_at TEXT NOT NULL"
            " DEFAULT '', PRIMARY KEY (vmid, time_us, sha256))"
        )
        c.execute(
            "INSERT INTO mem_dumps VALUES (1, 'vm-1', '1', 'a', 1.0, 2, 3, 4, 5, '/d/1.mem.gz',"
            " 'b', 6, 'lab', 'm', 'passed', '')"
        )
    c.close()
    s = SQLiteRecordStore(db)
    s.add(rec(1, "102", **LOCATED))
    new, old = s.list(10, 0)
    assert {k: new[k] for k in LOCATED} == LOCATED
    assert old["analysis"] == "passed" and old["manifest_sha256"] == "m"
    assert all(old[k] == "" for k in (*LOCATED, "local_deleted_at", "s3_deleted_at"))
    s.mark_location_deleted(old, "local", datetime(2026, 1, 2, tzinfo=UTC))
    assert s.list(10, 0)[1]["local_deleted_at"] == "2026-01-02T00:00:00.000000"


def test_influx_table_from_before_locations_is_read_with_its_extras(
    influx: InfluxDB3TestServer,
) -> None:
    from influxdb_client_3 import InfluxDBClient3, Point, WritePrecision

    db = f"db{uuid.uuid4().hex}"
    old = (
        Point("mem_dumps").tag("dom", "vm-1").tag("vmid", "1")
        .field("sha256", "a").field("duration_sec", 1.0).field("gzip_size_bytes", 2)
        .field("ctime", 3).field("mtime", 4).field("atime", 5).field("dump_path", "/d/1.mem.gz")
        .field("gz_sha256", "b").field("raw_size_bytes", 6).field("hypervisor", "lab")
        .field("manifest_sha256", "m").field("analysis", "passed").field("deleted_at", "")
        .time(1_000_000_000, WritePrecision.NS)
    )  # fmt: skip
    with InfluxDBClient3(host=influx.url, database=db, token="t") as c:
        c.write(record=old)
    s = InfluxDB3RecordStore(InfluxDB3Settings(url=influx.url, token="t", database=db))
    (row,) = s.list(10, 0)
    # The extras it has are read (not dropped with the ones it lacks).
    assert row["manifest_sha256"] == "m" and row["analysis"] == "passed"
    assert all(row[k] == "" for k in (*LOCATED, "local_deleted_at", "s3_deleted_at"))
    assert list(row) == STORED_RECORD_FIELDS
    s.mark_location_deleted(row, "local", datetime(2026, 1, 2, tzinfo=UTC))
    (row,) = s.list(10, 0)
    assert row["local_deleted_at"] == "2026-01-02T00:00:00.000000" and row["analysis"] == "passed"
