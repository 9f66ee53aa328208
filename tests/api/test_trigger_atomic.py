"""Issue 11 item 11: the trigger rate limit is atomic across API replicas and uses the
Prefect server's clock; issue 17: what a trigger asks Prefect. Against a real
(temporary) Prefect server, with a deployment that no runner serves, so a created run
stays Scheduled (in progress)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import api.routes
import api.runs
from api.main import create_app
from api.runs import TRIGGER_LOCK
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.prefect_requests import PrefectRequests

BASE = "/api/memory-dumps"
FLOW = "capture-vms-atomic-test"


@pytest.fixture
def deployment(prefect_server: None, request: pytest.FixtureRequest) -> str:
    """A fresh flow + deployment per test (no runner: its runs stay Scheduled)."""
    from prefect import get_client

    flow = f"{FLOW}-{request.node.name}".replace("[", "-").replace("]", "")[:60]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow)
        client.create_deployment(flow_id=flow_id, name="on-demand")
    return flow


def _runs(flow: str) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return list(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow]))))


def _replica(tmp_path: Path, flow: str, i: int, interval: float = 60) -> TestClient:
    d = tmp_path / f"replica{i}"
    d.mkdir()
    s = Settings(
        data_dir=d,
        orchestration={"flow_name": flow, "deployment": "on-demand"},
        api={"trigger_min_interval_sec": interval},
    )
    return TestClient(
        create_app(s, store=SQLiteRecordStore(d / "r.db")), base_url="http://localhost"
    )


def test_concurrent_triggers_on_two_replicas_make_one_run(tmp_path: Path, deployment: str) -> None:
    replicas = [_replica(tmp_path, deployment, i) for i in range(2)]
    n = 20
    barrier = threading.Barrier(n)
    answers: list[Any] = [None] * n

    def trigger(i: int) -> None:
        c = replicas[i % 2]
        barrier.wait()
        answers[i] = c.post(f"{BASE}/trigger", json={"vm_ids": ["vm-web-01"]})

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [429] * (n - 1), [a.text for a in answers if a.status_code != 429]
    for a in answers:
        if a.status_code == 429:
            assert list(a.json()) == ["detail"] and int(a.headers["retry-after"]) >= 1
    assert len(_runs(deployment)) == 1


def test_the_lock_is_given_back(tmp_path: Path, deployment: str) -> None:
    from prefect import get_client

    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "in progress" in r.json()["detail"]
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(TRIGGER_LOCK)
    assert limit.limit == 1 and limit.active_slots == 0
    assert len(_runs(deployment)) == 1


class _AheadClock(datetime):
    """This API machine's clock, an hour ahead of the Prefect server's."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(hours=1)


def test_interval_is_measured_on_the_servers_clock(
    tmp_path: Path, deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import get_client
    from prefect.states import Completed

    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    (run,) = _runs(deployment)
    # The run's start time is the server's, not this process's.
    assert abs((run.expected_start_time - run.created).total_seconds()) < 2
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Completed(), force=True)
    monkeypatch.setattr(api.routes, "datetime", _AheadClock)
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "at most one every 60 s" in r.json()["detail"]
    assert 55 <= int(r.headers["retry-after"]) <= 61
    assert len(_runs(deployment)) == 1


def test_deleted_lock_limit_is_recreated(tmp_path: Path, deployment: str) -> None:
    """Without its limit, taking the lock would succeed vacuously (Prefect ignores
    unknown names): the API creates it again instead of running unlocked."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(TRIGGER_LOCK)
        except Exception:  # noqa: S110 - not created yet in this server
            pass
    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(TRIGGER_LOCK)
    assert limit.limit == 1 and limit.active and limit.active_slots == 0


def test_a_leaked_lock_frees_itself(
    tmp_path: Path, deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Prefect server restart while a trigger holds the lock leaves its slot taken with
    no lease to expire: after STALE_LOCK_SEC of refusals the API frees it."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.states import Completed

    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    (run,) = _runs(deployment)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Completed(), force=True)
        client.update_global_concurrency_limit(
            TRIGGER_LOCK,
            GlobalConcurrencyLimitUpdate(active_slots=1),  # leaked
        )
    monkeypatch.setattr(api.runs, "STALE_LOCK_SEC", 0.5)
    for _ in range(2):  # refused while it may still be a real holder
        r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
        assert r.status_code == 429 and "Another trigger" in r.json()["detail"]
    time.sleep(0.6)
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    # Freed and taken: now the ordinary rule answers (the last run was moments ago).
    assert r.status_code == 429 and "at most one every 60 s" in r.json()["detail"]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRIGGER_LOCK).active_slots == 0
    assert len(_runs(deployment)) == 1


TRIGGER_REQUESTS = [
    "POST /v2/concurrency_limits/increment-with-lease",  # the trigger lock
    "POST /flow_runs/filter",  # the last run: its state and time
    "POST /deployments/{id}/create_flow_run",  # the new run
    "POST /v2/concurrency_limits/decrement-with-lease",  # the lock given back
]


def test_a_trigger_asks_prefect_four_things(
    tmp_path: Path,
    deployment: str,
    prefect_requests: PrefectRequests,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rate check reads the last run's state and time, not the per-VM detail /status
    shows (its task runs and artifacts: a hundred VMs' worth under the lock); the
    deployment is looked up once, then its id is used; one client for it all (no second
    CSRF token fetch)."""
    from prefect import Task, get_client
    from prefect.states import Completed, Running

    from memdump.runinfo import Target, step_tag
    from tasks.targets import publish_targets

    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    (run,) = _runs(deployment)
    with get_client(sync_client=True) as client:  # the last run captured a VM, then ended
        cap = Task(fn=lambda: None, name="capture-vm", tags=[step_tag("capture")])
        tr = client.create_task_run(cap, run.id, "k", state=Running())
        publish_targets(run.id, [Target(str(tr.id), "101")], client)
        client.set_flow_run_state(run.id, Completed(), force=True)
    server_time = api.runs._server_time
    monkeypatch.setattr(  # an hour later on the server's clock: the limit lets it through
        api.runs, "_server_time", lambda resp: server_time(resp) + timedelta(hours=1)
    )

    prefect_requests.clear()
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    assert prefect_requests.plan() == TRIGGER_REQUESTS
    assert len(_runs(deployment)) == 2

    # Refused while that run is in progress: the lock, the last run, the lock given back.
    prefect_requests.clear()
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "in progress" in r.json()["detail"]
    assert prefect_requests.plan() == [TRIGGER_REQUESTS[i] for i in (0, 1, 3)]


def test_a_deployment_made_again_is_found_again(
    tmp_path: Path, deployment: str, prefect_requests: PrefectRequests
) -> None:
    """The remembered deployment id is looked up by name again when Prefect no longer
    knows it (the deployment deleted and made again: a new id)."""
    from prefect import get_client

    c = _replica(tmp_path, deployment, 0, interval=0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    with get_client(sync_client=True) as client:
        old = client.read_deployment_by_name(f"{deployment}/on-demand")
        client.delete_deployment(old.id)
        new = client.create_deployment(flow_id=old.flow_id, name="on-demand")
    assert new != old.id

    prefect_requests.clear()
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["102"]})
    assert r.status_code == 200, r.text
    assert prefect_requests.plan() == [
        "POST /deployments/{id}/create_flow_run",  # 404: that id is gone
        f"GET /deployments/name/{deployment}/on-demand",
        "POST /deployments/{id}/create_flow_run",
    ]
    newest = max(_runs(deployment), key=lambda fr: fr.created)
    assert newest.deployment_id == new and newest.parameters["vm_ids"] == ["102"]
    prefect_requests.clear()
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["103"]}).status_code == 200
    assert prefect_requests.plan() == ["POST /deployments/{id}/create_flow_run"]


def test_the_first_trigger_finds_the_prefect_client_ready(
    tmp_path: Path, deployment: str, prefect_requests: PrefectRequests
) -> None:
    """The API starts its Prefect client and looks the deployment up when it starts (a
    thread of its lifespan), so the first trigger after `memdump serve` starts makes the
    one request every trigger makes: it took 1.7-2.2 s, the client's imports and start-up
    and the lookup, every other trigger 40-60 ms (2026-11-30)."""
    with _replica(tmp_path, deployment, 0, interval=0) as c:
        for th in threading.enumerate():
            if th.name == "memdump-api-warm":
                th.join(60)
        prefect_requests.clear()
        assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
        assert prefect_requests.plan() == ["POST /deployments/{id}/create_flow_run"]
    assert len(_runs(deployment)) == 1
