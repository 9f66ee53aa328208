"""/records honours MEMDUMP_API__RECORDS_MAX_LIMIT both ways (issue 13, item 4): the
route once hard-coded 1000, so a larger setting was ignored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns

BASE = "/api/memory-dumps"


def _client(tmp_path: Path, max_limit: int) -> TestClient:
    store = SQLiteRecordStore(tmp_path / "r.db")
    t0 = datetime(2025, 11, 11, tzinfo=UTC)
    for i in range(3):
        store.add(
            DumpRecord(
                t0 + timedelta(seconds=i),
                "vm",
                "101",
                "a" * 64,
                1.0,
                10,
                1,
                2,
                3,
                f"/d/101_{1699520400 + i}.mem.gz",
                "b" * 64,
                20,
                "hv",
            )
        )
    settings = Settings(data_dir=tmp_path, api={"records_max_limit": max_limit})  # type: ignore[call-arg]
    return TestClient(
        create_app(settings, store=store, runs=FakeRuns()), base_url="http://localhost"
    )


def test_a_larger_setting_is_honoured(tmp_path: Path) -> None:
    client = _client(tmp_path, 5000)
    r = client.get(f"{BASE}/records?limit=4000")
    assert r.status_code == 200, r.text
    assert (r.json()["count"], r.json()["limit"]) == (3, 4000)
    r = client.get(f"{BASE}/records?limit=5001")
    assert r.status_code == 400 and r.json() == {"detail": "limit must be at most 5000"}


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_smaller_setting_is_the_bound(tmp_path: Path, fmt: str) -> None:
    client = _client(tmp_path, 2)
    assert client.get(f"{BASE}/records?limit=2&format={fmt}").status_code == 200
    r = client.get(f"{BASE}/records?limit=3&format={fmt}")
    assert r.status_code == 400 and r.json() == {"detail": "limit must be at most 2"}


def test_openapi_states_the_setting(tmp_path: Path) -> None:
    spec = _client(tmp_path, 5000).get("/openapi.json").json()
    (limit,) = [
        p for p in spec["paths"][f"{BASE}/records"]["get"]["parameters"] if p["name"] == "limit"
    ]
    assert (
        limit["schema"]["maximum"] == 5000
        and "MEMDUMP_API__RECORDS_MAX_LIMIT" in limit["description"]
    )
