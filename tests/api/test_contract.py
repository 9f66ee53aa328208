"""Response shapes against the contract's own examples, key by key, and the status
mapping for every state Prefect can produce."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prefect import states

from api.main import create_app
from api.runs import RunSummary
from api.status import map_state
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns
from tests.helpers.contract import API_RECORD_FIELDS, EXTRA_RECORD_FIELDS
from tests.helpers.contract_doc import contract_examples

BASE = "/api/memory-dumps"


def shape(value: Any) -> Any:
    """Keys (in order) and value kinds, recursively; null matches any kind."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return None
    return type(value).__name__.replace("int", "float")


def same_shape(ours: Any, theirs: Any) -> bool:
    if isinstance(theirs, dict):
        return (
            isinstance(ours, dict)
            and list(ours) == list(theirs)
            and all(same_shape(ours[k], theirs[k]) for k in theirs)
        )
    if isinstance(theirs, list):
        return isinstance(ours, list) and (not theirs or not ours or same_shape(ours[0], theirs[0]))
    return theirs is None or ours is None or theirs == ours


@pytest.fixture
def client(tmp_path: Path) -> tuple[TestClient, FakeRuns, SQLiteRecordStore]:
    runs, store = FakeRuns(), SQLiteRecordStore(tmp_path / "r.db")
    return (
        TestClient(
            create_app(
                Settings(data_dir=tmp_path, api={"status_cache_sec": 0}), store=store, runs=runs
            ),
            base_url="http://localhost",
        ),
        runs,
        store,
    )


def test_trigger_and_error_shapes(client: tuple[TestClient, FakeRuns, Any]) -> None:
    c, _, _ = client
    ex = contract_examples()["1. Trigger Memory Dumps"]
    request, response, error = ex[0], ex[1], ex[2]
    r = c.post(f"{BASE}/trigger", json=request)
    assert same_shape(shape(r.json()), shape(response))
    assert r.json()["message"] == response["message"]
    assert r.json()["vm_ids"] == response["vm_ids"]
    assert c.post(f"{BASE}/trigger", json={"vm_ids": []}).json() == error


def test_records_and_stats_shapes(client: tuple[TestClient, FakeRuns, Any]) -> None:
    c, _, store = client
    ex = contract_examples()
    want = ex["2. Get Dump Records"][0]
    for r in want["records"]:
        store.add(
            DumpRecord(
                datetime.fromisoformat(r["timestamp"]).replace(tzinfo=UTC),
                r["dom"],
                r["vmid"],
                r["sha256"],
                r["duration_sec"],
                r["gzip_size_bytes"],
                r["ctime"],
                r["mtime"],
                r["atime"],
                r["dump_path"],
                "0" * 64,
                1,
                "lab",
            )
        )
    got = c.get(f"{BASE}/records?limit=50&offset=0").json()
    # The contract's example, value for value, with the documented extras after its fields.
    for row in got["records"]:
        assert list(row) == API_RECORD_FIELDS
        assert [row.pop(k) for k in EXTRA_RECORD_FIELDS] == ["lab", 1, "0" * 64] + [""] * 11 + [
            None,  # pause_ms: unknown
            None,  # chunks_changed: not compared
            "",
            "",
            "",  # s3_lock_mode: no S3 Object Lock
            "",  # s3_lock_until
            "",  # record_signature: a record written without the chain is unsigned
        ]
        assert row.pop("signature_status") == "unsigned"  # so the API's check says
    assert got == want
    stats = c.get(f"{BASE}/stats").json()
    assert same_shape(shape(stats), shape(ex["4. Get Dump Statistics"][0]))
    assert stats["last_dump"] == "2025-11-11T10:30:00.000000"


def test_status_shapes(client: tuple[TestClient, FakeRuns, Any]) -> None:
    c, runs, _ = client
    completed, in_progress, idle = contract_examples()["3. Get Dump Status"]

    def contract_part() -> Any:
        # The contract's fields in its order, then the documented extra `vms`.
        body = c.get(f"{BASE}/status").json()
        assert list(body)[-1] == "vms" and isinstance(body.pop("vms"), list)
        return body

    assert contract_part() == idle
    t = datetime(2025, 11, 11, 10, 30, 45, 123456, tzinfo=UTC)
    runs.run = RunSummary("r", "COMPLETED", "Completed", ["101", "102"], t, 15.234, "ok")
    assert contract_part() == completed
    runs.run = RunSummary("r", "RUNNING", "Running", ["101", "102"], t, None, None)
    assert contract_part() == in_progress


STATE_FACTORIES = {
    "Scheduled": states.Scheduled,
    "Late": states.Late,
    "AwaitingRetry": states.AwaitingRetry,
    "AwaitingConcurrencySlot": states.AwaitingConcurrencySlot,
    "Pending": states.Pending,
    "Running": states.Running,
    "Retrying": states.Retrying,
    "Paused": states.Paused,
    "Suspended": states.Suspended,
    "Cancelling": states.Cancelling,
    "Completed": states.Completed,
    "Cached": getattr(states, "Cached", states.Completed),
    "Failed": states.Failed,
    "Crashed": states.Crashed,
    "Cancelled": states.Cancelled,
}
EXPECTED = {
    "Scheduled": "in_progress",
    "Late": "in_progress",
    "AwaitingRetry": "in_progress",
    "AwaitingConcurrencySlot": "in_progress",
    "Pending": "in_progress",
    "Running": "in_progress",
    "Retrying": "in_progress",
    "Paused": "in_progress",
    "Suspended": "in_progress",
    "Cancelling": "in_progress",
    "Completed": "completed",
    "Cached": "completed",
    "Failed": "failed",
    "Crashed": "error",
    "Cancelled": "error",
}


@pytest.mark.parametrize("name", list(STATE_FACTORIES))
def test_every_prefect_state_maps(name: str) -> None:
    state = STATE_FACTORIES[name]()
    assert map_state(state.type.value, state.name) == EXPECTED[name]


def test_timed_out_and_idle() -> None:
    state = states.Failed(name="TimedOut")
    assert map_state(state.type.value, state.name) == "timeout"
    assert map_state(None, None) == "idle"
    assert map_state("SOMETHING_NEW", "x") == "error"
