"""The API against the contract, with a fake Runs backend and a real SQLite store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.runs import RunSummary
from memdump.errors import RecordStoreError
from memdump.records.base import Stats
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns
from tests.helpers.api import client as localhost_client
from tests.helpers.contract import API_RECORD_FIELDS

ISO_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
BASE = "/api/memory-dumps"


class BrokenStore:
    def add(self, record: DumpRecord) -> bool:
        raise RecordStoreError("Connection refused")

    def list(self, limit: int, offset: int, query: Any = None) -> list[dict[str, Any]]:
        raise RecordStoreError("Connection refused")

    def stats(self) -> Stats:
        raise RecordStoreError("Connection refused")

    def close(self) -> None:
        pass


@pytest.fixture
def runs() -> FakeRuns:
    return FakeRuns()


@pytest.fixture
def store(tmp_path: Path) -> SQLiteRecordStore:
    return SQLiteRecordStore(tmp_path / "r.db")


@pytest.fixture
def client(tmp_path: Path, runs: FakeRuns, store: SQLiteRecordStore) -> TestClient:
    return localhost_client(
        create_app(Settings(data_dir=tmp_path, api={"status_cache_sec": 0}), store=store, runs=runs)
    )


def test_trigger(client: TestClient, runs: FakeRuns) -> None:
    r = client.post(f"{BASE}/trigger", json={"vm_ids": ["101", "102", "103"]})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["status", "message", "vm_ids", "timestamp"]
    assert body["status"] == "scheduled"
    assert body["message"] == "Memory dump scheduled for 3 VM(s)"
    assert body["vm_ids"] == ["101", "102", "103"]
    assert ISO_US.match(body["timestamp"])
    assert runs.triggered == [(["101", "102", "103"], "api")]


def test_trigger_dedupes_and_accepts_all(client: TestClient, runs: FakeRuns) -> None:
    r = client.post(f"{BASE}/trigger", json={"vm_ids": ["all", "101", "101"]})
    assert r.status_code == 200 and r.json()["vm_ids"] == ["all", "101"]


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"json": {"vm_ids": []}}, "No VM IDs specified"),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            "Invalid JSON",
        ),
        ({"json": {}}, "missing field: vm_ids"),
        ({"json": {"vm_ids": "101"}}, "vm_ids"),
        ({"json": {"vm_ids": [101]}}, "vm_ids"),
        ({"json": {"vm_ids": ["a;rm -rf /"]}}, "not a plain identifier"),
        ({"json": {"vm_ids": ["--help"]}}, "not a plain identifier"),
        ({"json": {"vm_ids": ["101"], "extra": 1}}, "unknown field: extra"),
        ({"json": ["101"]}, "Invalid request"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, "Invalid"),
    ],
)
def test_trigger_bad_requests(
    client: TestClient, runs: FakeRuns, kwargs: dict[str, Any], detail: str
) -> None:
    r = client.post(f"{BASE}/trigger", **kwargs)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["detail"] and detail in r.json()["detail"]
    assert runs.triggered == []


def test_trigger_when_prefect_is_down(client: TestClient, runs: FakeRuns) -> None:
    runs.fail = True
    r = client.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 500 and "Prefect is down" in r.json()["detail"]


def _rec(i: int) -> DumpRecord:
    ts = datetime(2025, 11, 11, 10, 30, tzinfo=UTC) + timedelta(minutes=i)
    return DumpRecord(
        ts,
        "vm-web-01",
        "101",
        f"{i:064x}",
        5.234,
        2000 + i,
        1,
        2,
        3,
        f"/var/dumps/101_{i}.mem.gz",
        "0" * 64,
        4096,
        "lab",
    )


def test_records(client: TestClient, store: SQLiteRecordStore) -> None:
    for i in range(5):
        store.add(_rec(i))
    body = client.get(f"{BASE}/records").json()
    assert body["count"] == 5 and body["limit"] == 1000 and body["offset"] == 0
    assert [r["gzip_size_bytes"] for r in body["records"]] == [2004, 2003, 2002, 2001, 2000]
    assert list(body["records"][0]) == API_RECORD_FIELDS
    page = client.get(f"{BASE}/records?limit=2&offset=1").json()
    assert [r["gzip_size_bytes"] for r in page["records"]] == [2003, 2002]
    assert (page["count"], page["limit"], page["offset"]) == (2, 2, 1)


@pytest.mark.parametrize(
    "query",
    [
        "limit=1001",
        "limit=0",
        "limit=-1",
        "offset=-1",
        "limit=abc",
        "limit=99999999999999999999999",
        "offset=46081850437506498560",
    ],
)
def test_records_bad_query(client: TestClient, query: str) -> None:
    r = client.get(f"{BASE}/records?{query}")
    assert r.status_code == 400 and list(r.json()) == ["detail"]


def test_store_down(tmp_path: Path, runs: FakeRuns) -> None:
    c = localhost_client(create_app(Settings(data_dir=tmp_path), store=BrokenStore(), runs=runs))
    r = c.get(f"{BASE}/records")
    assert r.status_code == 500
    assert r.json() == {"detail": "Error fetching records: Connection refused"}
    assert c.get(f"{BASE}/stats").status_code == 500


def test_stats(client: TestClient, store: SQLiteRecordStore) -> None:
    assert client.get(f"{BASE}/stats").json() == {
        "total_dumps": 0,
        "total_vms": 0,
        "total_size_bytes": 0,
        "avg_duration_sec": 0.0,
        "last_dump": None,
    }
    for i in range(3):
        store.add(_rec(i))
    body = client.get(f"{BASE}/stats").json()
    assert body == {
        "total_dumps": 3,
        "total_vms": 1,
        "total_size_bytes": 6003,
        "avg_duration_sec": 5.234,
        "last_dump": "2025-11-11T10:32:00.000000",
    }


def test_status_idle(client: TestClient) -> None:
    assert client.get(f"{BASE}/status").json() == {
        "last_trigger": {},
        "status": "idle",
        "vm_ids": [],
        "timestamp": None,
        "duration": None,
        "error": None,
        "vms": [],
    }


T = datetime(2025, 11, 11, 10, 30, 45, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("state_type", "state_name", "status"),
    [
        ("COMPLETED", "Completed", "completed"),
        ("FAILED", "Failed", "failed"),
        ("FAILED", "TimedOut", "timeout"),
        ("CRASHED", "Crashed", "error"),
        ("CANCELLED", "Cancelled", "error"),
    ],
)
def test_status_final(
    client: TestClient, runs: FakeRuns, state_type: str, state_name: str, status: str
) -> None:
    runs.run = RunSummary(
        "r",
        state_type,
        state_name,
        ["101", "102"],
        T,
        15.234,
        "1 of 2 VM(s) failed" if status != "completed" else "ok",
    )
    body = client.get(f"{BASE}/status").json()
    assert body == {
        "last_trigger": {
            "timestamp": "2025-11-11T10:30:45.123456",
            "vm_ids": ["101", "102"],
            "status": status,
            "duration": 15.234,
        },
        "status": status,
        "vm_ids": ["101", "102"],
        "timestamp": "2025-11-11T10:30:45.123456",
        "duration": 15.234,
        "error": None if status == "completed" else "1 of 2 VM(s) failed",
        "vms": [],
    }


@pytest.mark.parametrize("state_type", ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"])
def test_status_in_progress(client: TestClient, runs: FakeRuns, state_type: str) -> None:
    runs.run = RunSummary("r", state_type, "x", ["101", "102"], T, None, None)
    assert client.get(f"{BASE}/status").json() == {
        "last_trigger": {
            "timestamp": "2025-11-11T10:30:45.123456",
            "vm_ids": ["101", "102"],
            "status": "in_progress",
        },
        "status": "in_progress",
        "vm_ids": ["101", "102"],
        "timestamp": "2025-11-11T10:30:45.123456",
        "duration": None,
        "error": None,
        "vms": [],
    }


def test_openapi_documents_every_error_and_no_422(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("trigger", "records", "status", "stats"):
        ops = paths[f"{BASE}/{path}"]
        for op in ops.values():
            assert "422" not in op["responses"]
            assert "200" in op["responses"] and "500" in op["responses"]
    assert "400" in paths[f"{BASE}/trigger"]["post"]["responses"]
    assert "400" in paths[f"{BASE}/records"]["get"]["responses"]


def test_outbox_depth(tmp_path: Path, runs: FakeRuns) -> None:
    from memdump.records.outbox import Outbox

    app = create_app(Settings(data_dir=tmp_path), store=BrokenStore(), runs=runs)
    c = localhost_client(app)
    assert c.get(f"{BASE}/outbox").json() == {
        "depth": 0,
        "oldest_queued_at": None,
        "last_error": None,
    }
    # Read-only (issue 15, item 6): the API made no outbox of its own.
    assert not (tmp_path / "outbox.db").exists()
    Outbox(tmp_path / "outbox.db").put(_rec(1), "Connection refused")
    body = c.get(f"{BASE}/outbox").json()
    assert body["depth"] == 1 and body["last_error"] == "Connection refused"
    assert ISO_US.match(body["oldest_queued_at"])


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_trigger_needs_a_json_content_type(
    client: TestClient, runs: FakeRuns, ctype: str | None
) -> None:
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(f"{BASE}/trigger", content=b'{"vm_ids": ["101"]}', headers=headers)
    assert r.status_code == 400 and r.json() == {"detail": "Content-Type must be application/json"}
    assert runs.triggered == []


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "application/vnd.x+json"])
def test_trigger_accepts_json_types(client: TestClient, runs: FakeRuns, ctype: str) -> None:
    r = client.post(
        f"{BASE}/trigger", content=b'{"vm_ids": ["101"]}', headers={"content-type": ctype}
    )
    assert r.status_code == 200 and runs.triggered == [(["101"], "api")]


def test_oversized_bodies_are_refused_before_they_are_read(
    client: TestClient, runs: FakeRuns
) -> None:
    big = b'{"vm_ids": ["101"], "pad": "' + b"x" * (300 * 1024) + b'"}'
    r = client.post(f"{BASE}/trigger", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json() == {
        "detail": "Request body too large (max 262144 bytes)"
    }

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to go by
        yield b'{"vm_ids": ["101"], "pad": "'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}'

    r = client.post(
        f"{BASE}/trigger", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post(
        f"{BASE}/trigger",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": "-1"},
    )
    assert r.status_code in (400, 413)
    assert runs.triggered == []
    # A body just under the limit is read and judged on its content.
    ok = b'{"vm_ids": ["101"]}' + b" " * (200 * 1024)
    r = client.post(f"{BASE}/trigger", content=ok, headers={"content-type": "application/json"})
    assert r.status_code == 200 and runs.triggered == [(["101"], "api")]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=1001",
        "limit=99999999999999999999",
        "offset=-1",
        "offset=9007199254740992",
        "limit=abc",
        "offset=1e3",
        "limit=",
        "limit=1&limit=2000",
    ],
)
def test_records_bad_paging(client: TestClient, query: str) -> None:
    r = client.get(f"{BASE}/records?{query}")
    assert r.status_code == 400 and list(r.json()) == ["detail"], r.text


def test_status_is_asked_of_prefect_once_per_ttl_and_fresh_after_a_trigger(
    tmp_path: Path, store: SQLiteRecordStore
) -> None:
    import threading

    from api.runs import LatestRunCache

    class CountingRuns(FakeRuns):
        calls = 0

        def latest(self) -> RunSummary | None:
            CountingRuns.calls += 1
            return self.run

    runs = CountingRuns()
    cache = LatestRunCache(runs, ttl=3600)
    threads = [threading.Thread(target=cache.get) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert CountingRuns.calls == 1
    cache.invalidate()
    cache.get()
    assert CountingRuns.calls == 2

    c = localhost_client(
        create_app(
            Settings(
                data_dir=tmp_path, api={"status_cache_sec": 3600, "trigger_min_interval_sec": 0}
            ),
            store=store,
            runs=runs,
        )
    )
    assert c.get(f"{BASE}/status").json()["status"] == "idle"
    runs.run = RunSummary("r2", "RUNNING", "Running", ["101"], datetime.now(UTC), None, None)
    assert c.get(f"{BASE}/status").json()["status"] == "idle"  # cached
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    assert c.get(f"{BASE}/status").json()["status"] == "in_progress"  # the trigger's own run


def test_records_filters_and_csv(client: TestClient, store: SQLiteRecordStore) -> None:
    import csv as csvmod
    import io

    for i in range(6):
        store.add(_rec(i))  # 10:30 + i minutes, gzip size 2000 + i
    got = client.get(f"{BASE}/records?since=2025-11-11T10:32:00&until=2025-11-11T10:34:00Z")
    assert [r["gzip_size_bytes"] for r in got.json()["records"]] == [2003, 2002]
    got = client.get(f"{BASE}/records?since=2025-11-11T11:32:00%2B01:00&limit=1")
    assert [r["gzip_size_bytes"] for r in got.json()["records"]] == [2005]
    assert client.get(f"{BASE}/records?vmid=101&dom=vm-web-01").json()["count"] == 6
    assert client.get(f"{BASE}/records?vmid=102").json()["count"] == 0
    assert client.get(f"{BASE}/records?since=2025-11-12").json()["count"] == 0
    for bad in ("since=yesterday", "until=2025-13-01", "vmid=a;b", "dom=..", "format=xml"):
        r = client.get(f"{BASE}/records?{bad}")
        assert r.status_code == 400 and list(r.json()) == ["detail"], bad

    r = client.get(f"{BASE}/records?format=csv&limit=3&offset=1&since=2025-11-11")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csvmod.reader(io.StringIO(r.text)))
    assert rows[0] == API_RECORD_FIELDS
    json_rows = client.get(f"{BASE}/records?limit=3&offset=1").json()["records"]
    # A null (pause_ms unknown) is an empty cell.
    assert rows[1:] == [["" if v is None else str(v) for v in j.values()] for j in json_rows]
    assert client.get(f"{BASE}/records?format=csv&limit=1001").status_code == 400
    empty = client.get(f"{BASE}/records?format=csv&vmid=nope")
    assert empty.text.splitlines() == [",".join(API_RECORD_FIELDS)]


def test_trigger_accepts_ids_qualified_by_hypervisor(client: TestClient, runs: FakeRuns) -> None:
    r = client.post(f"{BASE}/trigger", json={"vm_ids": ["pve-a:101", "101", "all"]})
    assert r.status_code == 200 and runs.triggered == [(["pve-a:101", "101", "all"], "api")]
    for bad in ("pve-a:", "a:b:c", ":101", "pve a:101"):
        r = client.post(f"{BASE}/trigger", json={"vm_ids": [bad]})
        assert r.status_code == 400, bad
