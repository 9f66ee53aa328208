"""One suite for every record store: SQLite (embedded) and InfluxDB 3 (through the real
client and the project's test server) must give the same answers for the same data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memdump.records.base import RecordStore
from memdump.records.influxdb3 import InfluxDB3RecordStore
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import InfluxDB3Settings
from tests.contract import RECORD_FIELDS
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


def rec(i: int, vmid: str) -> DumpRecord:
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
    assert rows == [r.contract_dict() for r in reversed(DATA)]
    assert all(list(row) == RECORD_FIELDS for row in rows)
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
