"""Issue 16 item 2: one trigger, one timestamp. ``POST /trigger``'s ``timestamp`` and
``/status``'s ``timestamp`` and ``last_trigger.timestamp`` are the same value for the
same run (the contract's examples show one value; a client matches its trigger to the
status by it): the run's due time as the Prefect server stored it.

Against a real (temporary) Prefect server and the real API app, with a deployment no
runner serves (the run stays Scheduled until the test completes it); with the rate limit
off (the run's time is this machine's clock) and on (the Prefect server's clock)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from memdump.records.model import iso_utc
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import client
from tests.helpers.prefect_harness import flow_runs, idle_deployment

BASE = "/api/memory-dumps"


def _app(tmp_path: Path, flow: str, interval: float) -> TestClient:
    s = Settings(
        data_dir=tmp_path,
        orchestration={"flow_name": flow, "deployment": "on-demand"},
        api={"trigger_min_interval_sec": interval, "status_cache_sec": 0},
    )
    return client(create_app(s, store=SQLiteRecordStore(tmp_path / "r.db")))


@pytest.mark.parametrize("interval", [0, 60], ids=["api-clock", "server-clock"])
def test_trigger_and_status_show_one_timestamp(
    prefect_server: None, tmp_path: Path, interval: float
) -> None:
    from prefect import get_client
    from prefect.states import Completed

    flow = f"capture-vms-timestamp-{interval}"
    idle_deployment(flow)
    c = _app(tmp_path, flow, interval)
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["vm-web-01", "vm-db-01"]})
    assert r.status_code == 200, r.text
    stamp = r.json()["timestamp"]
    datetime.fromisoformat(stamp)  # the contract's format: ISO 8601, microseconds
    assert len(stamp) == len("2025-11-11T10:30:45.123456")

    # It is the run's own time, as Prefect stored it (not a second clock reading).
    (run,) = flow_runs(flow)
    assert stamp == iso_utc(datetime.fromtimestamp(run.expected_start_time.timestamp(), UTC))

    st = c.get(f"{BASE}/status").json()
    assert st["status"] == "in_progress"
    assert st["timestamp"] == st["last_trigger"]["timestamp"] == stamp
    assert st["vm_ids"] == st["last_trigger"]["vm_ids"] == ["vm-web-01", "vm-db-01"]

    with get_client(sync_client=True) as pc:  # finished: still the trigger's time
        pc.set_flow_run_state(run.id, Completed(), force=True)
    st = c.get(f"{BASE}/status").json()
    assert st["status"] == "completed"
    assert st["timestamp"] == st["last_trigger"]["timestamp"] == stamp
