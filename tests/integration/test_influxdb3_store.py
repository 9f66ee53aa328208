"""The InfluxDB 3 record store through the real influxdb3-python client, against the
project's InfluxDB-3-compatible test server (tests/influxdb3_server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.main import create_app
from memdump.errors import RecordStoreError
from memdump.records import open_reader
from memdump.records.influxdb3 import InfluxDB3RecordStore
from memdump.records.model import DumpRecord
from memdump.records.outbox import DurableRecorder, Outbox
from memdump.settings import InfluxDB3Settings, Settings
from tests.helpers.contract import API_RECORD_FIELDS, STORED_RECORD_FIELDS
from tests.influxdb3_server import InfluxDB3TestServer

TOKEN = "test-token"


@pytest.fixture
def server() -> Iterator[InfluxDB3TestServer]:
    srv = InfluxDB3TestServer(host="127.0.0.1", port=0, token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture
def cfg(server: InfluxDB3TestServer) -> InfluxDB3Settings:
    return InfluxDB3Settings(url=server.url, database="memdump", token=TOKEN, timeout_sec=2)


def rec(i: int, vmid: str = "101", dom: str = "vm-web-01") -> DumpRecord:
    ts = datetime(2025, 11, 11, 10, 30, tzinfo=UTC) + timedelta(minutes=i, microseconds=i)
    return DumpRecord(
        ts,
        dom,
        vmid,
        f"{i:064x}",
        1.5 + i,
        1000 * (i + 1),
        1699520400 + i,
        1699520405,
        1699520410,
        f"/var/dumps/{vmid}_{i}.mem.gz",
        "f" * 64,
        4096,
        "lab",
    )


def test_empty_store(cfg: InfluxDB3Settings) -> None:
    store = InfluxDB3RecordStore(cfg)
    assert store.list(10, 0) == []
    st = store.stats()
    assert (st.total_dumps, st.total_vms, st.total_size_bytes, st.last_dump) == (0, 0, 0, None)


def test_write_list_stats(cfg: InfluxDB3Settings) -> None:
    store = InfluxDB3RecordStore(cfg)
    for i, vm in enumerate(["101", "102", "101"]):
        store.add(rec(i, vm))
    store.add(rec(2, "101"))  # a replay of the same record: still one row
    rows = store.list(10, 0)
    assert [r["vmid"] for r in rows] == ["101", "102", "101"]
    assert list(rows[0]) == STORED_RECORD_FIELDS
    assert rows[0]["timestamp"] == "2025-11-11T10:32:00.000002"
    assert rows[0] == rec(2, "101").api_dict()
    assert [r["sha256"][-1] for r in store.list(1, 1)] == ["1"]
    st = store.stats()
    assert (st.total_dumps, st.total_vms, st.total_size_bytes) == (3, 2, 6000)
    assert st.avg_duration_sec == 2.5 and st.last_dump == "2025-11-11T10:32:00.000002"


@pytest.mark.parametrize("dom", ["vm web,01", 'vm="x"', "vm\\01", "vm-é-漢字", "a=b c,d"])
def test_awkward_tag_values_round_trip(cfg: InfluxDB3Settings, dom: str) -> None:
    store = InfluxDB3RecordStore(cfg)
    store.add(rec(0, "101", dom=dom))
    assert store.list(1, 0)[0]["dom"] == dom


def test_outage_fails_fast_and_outbox_replays(
    server: InfluxDB3TestServer, cfg: InfluxDB3Settings, tmp_path: Path
) -> None:
    store = InfluxDB3RecordStore(cfg)
    recorder = DurableRecorder(store, Outbox(tmp_path / "outbox.db"))
    assert recorder.record(rec(0)) is True
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(RecordStoreError):
        store.list(10, 0)
    assert recorder.record(rec(1)) is False and recorder.record(rec(2)) is False
    assert time.monotonic() - t0 < 15
    assert recorder.outbox.state().depth == 2
    # The API answers the contract's 500 quickly while the store is down.
    api = TestClient(
        create_app(Settings(data_dir=tmp_path), store=store, runs=None), base_url="http://localhost"
    )
    r = api.get("/api/memory-dumps/records")
    assert r.status_code == 500 and r.json()["detail"].startswith("Error fetching records: ")
    server.start()
    deadline = time.monotonic() + 10
    while recorder.replay() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert recorder.outbox.state().depth == 0
    assert [r["sha256"][-1] for r in store.list(10, 0)] == ["2", "1", "0"]


def test_wrong_token_is_an_error(server: InfluxDB3TestServer) -> None:
    store = InfluxDB3RecordStore(InfluxDB3Settings(url=server.url, token="wrong", timeout_sec=2))
    with pytest.raises(RecordStoreError):
        store.add(rec(0))
    with pytest.raises(RecordStoreError):
        store.list(1, 0)


def test_api_filters_and_csv_on_influxdb3(cfg: InfluxDB3Settings, tmp_path: Path) -> None:
    # The same /records query, JSON and CSV, served from InfluxDB 3 and from SQLite.
    import csv
    import io

    from memdump.records.sqlite import SQLiteRecordStore

    influx, lite = InfluxDB3RecordStore(cfg), SQLiteRecordStore(tmp_path / "r.db")
    for i, vm in enumerate(["101", "102", "101", "103", "101"]):
        influx.add(rec(i, vm))
        lite.add(rec(i, vm))
    q = "since=2025-11-11T10:31:00&until=2025-11-11T10:35:00&vmid=101"
    answers = []
    for store in (influx, lite):
        api = TestClient(
            create_app(Settings(data_dir=tmp_path), store=store, runs=None),
            base_url="http://localhost",
        )
        body = api.get(f"/api/memory-dumps/records?{q}").json()
        text = api.get(f"/api/memory-dumps/records?{q}&format=csv").text
        answers.append((body, text))
    (body, text), other = answers
    assert other == (body, text)
    assert [r["timestamp"][:16] for r in body["records"]] == [
        "2025-11-11T10:34",
        "2025-11-11T10:32",
    ]
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == API_RECORD_FIELDS and len(rows) == 3
    # A null (pause_ms unknown) is an empty cell, as on SQLite.
    assert rows[1] == ["" if v is None else str(v) for v in body["records"][0].values()]


def test_the_api_reads_with_a_read_only_token_that_cannot_write(tmp_path: Path) -> None:
    # Least privilege (issue 15, item 6): the API holds a token that may only read; the
    # server (like InfluxDB 3 Enterprise's "db:memdump:read" tokens) refuses its writes.
    srv = InfluxDB3TestServer(
        host="127.0.0.1", port=0, token=TOKEN, read_tokens=frozenset({"read-only"})
    ).start()
    try:
        cfg = InfluxDB3Settings(
            url=srv.url, database="memdump", token=TOKEN, read_token="read-only", timeout_sec=2
        )
        InfluxDB3RecordStore(cfg).add(rec(1))  # the collector's token writes
        s = Settings(data_dir=tmp_path, record_store="influxdb3", influxdb3=cfg)
        reader = open_reader(s)
        assert [r["vmid"] for r in reader.list(10, 0)] == ["101"]
        with pytest.raises(RecordStoreError, match="403|permission"):
            InfluxDB3RecordStore(cfg, token=cfg.read_token).add(rec(2))
        # The API (its reader is open_reader's) lists what the collector wrote.
        api = TestClient(create_app(s, runs=None), base_url="http://localhost")
        (row,) = api.get("/api/memory-dumps/records").json()["records"]
        assert row["vmid"] == "101" and row["signature_status"] == "unsigned"
        # And a wrong token is refused outright: the read-only one is what it used.
        wrong = cfg.model_copy(update={"read_token": SecretStr("nope")})
        bad = s.model_copy(update={"influxdb3": wrong})
        with pytest.raises(RecordStoreError):
            open_reader(bad).list(10, 0)
    finally:
        srv.stop()
