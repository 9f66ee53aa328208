"""Bearer-token access control and the trigger rate limit (contract: "Rate Limiting")."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.runs import RunSummary
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns

BASE = "/api/memory-dumps"
ROUTES = [
    ("POST", f"{BASE}/trigger"),
    ("GET", f"{BASE}/records"),
    ("GET", f"{BASE}/status"),
    ("GET", f"{BASE}/stats"),
    ("GET", f"{BASE}/outbox"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
]


def app(tmp_path: Path, runs: FakeRuns, **settings: object) -> TestClient:
    s = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return TestClient(
        create_app(s, store=SQLiteRecordStore(tmp_path / "r.db"), runs=runs),
        base_url="http://localhost",
    )


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", "Basic c2VjcmV0", "secret", "Bearer secret2", "Bearer "]
)
def test_token_required_everywhere_but_health(
    tmp_path: Path, method: str, path: str, auth: str | None
) -> None:
    c = app(tmp_path, FakeRuns(), api={"token": "secret"})
    headers = {"authorization": auth} if auth else {}
    r = c.request(method, path, json={"vm_ids": ["101"]}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert list(r.json()) == ["detail"]
    assert c.get("/health").status_code == 200


def test_right_token_passes(tmp_path: Path) -> None:
    runs = FakeRuns()
    c = app(tmp_path, runs, api={"token": "secret"})
    r = c.post(
        f"{BASE}/trigger", json={"vm_ids": ["101"]}, headers={"authorization": "Bearer secret"}
    )
    assert r.status_code == 200 and runs.triggered == [(["101"], "api")]


def test_no_token_configured_means_open(tmp_path: Path) -> None:
    assert app(tmp_path, FakeRuns()).get(f"{BASE}/stats").status_code == 200


def _last(state: str, ago: float) -> RunSummary:
    return RunSummary(
        "r", state, state.title(), ["101"], datetime.now(UTC) - timedelta(seconds=ago), 1.0, None
    )


def test_trigger_too_soon_is_429_with_retry_after(tmp_path: Path) -> None:
    runs = FakeRuns()
    runs.run = _last("COMPLETED", 15)
    r = app(tmp_path, runs).post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "at most one every 60 s" in r.json()["detail"]
    assert 44 <= int(r.headers["retry-after"]) <= 46
    assert runs.triggered == []


def test_trigger_while_in_progress_is_refused(tmp_path: Path) -> None:
    runs = FakeRuns()
    runs.run = _last("RUNNING", 600)
    r = app(tmp_path, runs).post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "in progress" in r.json()["detail"]
    assert r.headers["retry-after"] == "10" and runs.triggered == []


def test_trigger_after_the_interval_is_accepted(tmp_path: Path) -> None:
    runs = FakeRuns()
    runs.run = _last("FAILED", 61)
    assert app(tmp_path, runs).post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    runs2 = FakeRuns()
    runs2.run = _last("COMPLETED", 1)
    c = app(tmp_path, runs2, api={"trigger_min_interval_sec": 0})  # limit off
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200


def test_bad_request_wins_over_rate_limit(tmp_path: Path) -> None:
    runs = FakeRuns()
    runs.run = _last("RUNNING", 1)
    r = app(tmp_path, runs).post(f"{BASE}/trigger", json={"vm_ids": []})
    assert r.status_code == 400 and r.json() == {"detail": "No VM IDs specified"}


def test_trigger_beaten_to_its_run_is_429_retry_after_1(tmp_path: Path) -> None:
    """Another trigger (in this or another replica) made a run from the same view first
    (issue 11 item 11, issue 17): refused, nothing run."""
    runs = FakeRuns()
    runs.run = _last("COMPLETED", 3600)
    c = app(tmp_path, runs)
    runs.trigger(["102"], "api", after=runs.view())  # the other trigger, first
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "Another trigger is being scheduled; retry in 1 s"}
    assert runs.triggered == [(["102"], "api")]
    runs.run = dataclasses.replace(_last("COMPLETED", 3600), id="r2")  # a newer view
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    assert runs.triggered == [(["102"], "api"), (["101"], "api")]


def test_last_run_unreadable_is_500(tmp_path: Path) -> None:
    class NoPrefect(FakeRuns):
        def view(self) -> Any:
            raise ConnectionError("Connection refused")

    runs = NoPrefect()
    r = app(tmp_path, runs).post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 500
    assert r.json() == {"detail": "Error checking the last trigger: Connection refused"}
    assert runs.triggered == []


def test_interval_uses_the_servers_clock(tmp_path: Path) -> None:
    """The age of the last trigger is measured on the clock the view gives (Prefect's),
    not this machine's."""
    runs = FakeRuns()
    runs.run = _last("COMPLETED", 3600)  # an hour ago by this machine's clock...
    runs.now = runs.run.triggered_at + timedelta(seconds=20)  # ...20 s by the server's
    r = app(tmp_path, runs).post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and r.headers["retry-after"] == "40"
    assert runs.triggered == []
