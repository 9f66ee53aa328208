"""Issue 11 item 11: the trigger rate limit is atomic across API replicas and uses the
Prefect server's clock; issue 17: what a trigger asks Prefect (two requests: the last
run, then the new run keyed by it, api.runs.AFTER_KEY). Against a real
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
from api.runs import AFTER_KEY
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


def test_a_refused_trigger_makes_no_run(tmp_path: Path, deployment: str) -> None:
    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "in progress" in r.json()["detail"]
    (run,) = _runs(deployment)
    assert run.idempotency_key == AFTER_KEY.format("none")  # the view had no run yet


def test_two_triggers_from_one_view_make_one_run(tmp_path: Path, deployment: str) -> None:
    """Two replicas' triggers both read the same last run (the race the rate check
    cannot see): the second one's run is the first one's (Prefect's idempotency key),
    so it is refused and nothing more is made."""
    from prefect import get_client
    from prefect.states import Completed

    a, b = (_replica(tmp_path, deployment, i, interval=1) for i in range(2))
    assert a.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    (first,) = _runs(deployment)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(first.id, Completed(), force=True)
    time.sleep(2.1)  # past the interval: both may trigger
    runs_a, runs_b = a.app.state.runs, b.app.state.runs  # type: ignore[attr-defined]
    view_a, view_b = runs_a.view(), runs_b.view()  # both read before either made a run
    assert view_a.last.id == view_b.last.id == str(first.id)
    made = runs_a.trigger(["102"], "api", view_a.now, after=view_a)
    with pytest.raises(api.runs.TriggerBusy):
        runs_b.trigger(["103"], "api", view_b.now, after=view_b)
    runs = _runs(deployment)
    assert len(runs) == 2 and made.id in {str(r.id) for r in runs}
    (second,) = [r for r in runs if r.id != first.id]
    assert second.parameters["vm_ids"] == ["102"]
    assert second.idempotency_key == AFTER_KEY.format(first.id)


def test_a_run_made_by_a_try_whose_answer_was_lost_is_this_triggers(
    tmp_path: Path, deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server took the first try, its answer was lost: the try again (through
    Prefect's client, same key) finds the run, and it is this trigger's own."""
    import httpx

    c = _replica(tmp_path, deployment, 0)
    http = c.app.state.runs._http()  # type: ignore[attr-defined]
    post = http.post
    lost: list[int] = []

    def post_then_lose(path: str, **kw: Any) -> Any:
        resp = post(path, **kw)
        if "create_flow_run" in path and not lost:
            lost.append(resp.status_code)
            raise httpx.ReadError("connection reset")
        return resp

    monkeypatch.setattr(http, "post", post_then_lose)
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert lost == [201]
    assert r.status_code == 200, r.text
    (run,) = _runs(deployment)
    assert run.parameters["vm_ids"] == ["101"]


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


class _BehindClock(datetime):
    """This API machine's clock, an hour behind the Prefect server's."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) - timedelta(hours=1)


def test_which_runs_are_due_is_asked_on_the_servers_clock(
    tmp_path: Path, deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run the server made due now is due for an API machine whose clock is behind:
    the read corrects its clock by the skew the server's last answer showed (else the
    run would be "not due yet", the check would see no run, and the trigger would only
    be stopped by the idempotency key, as if it had raced another)."""
    monkeypatch.setattr(api.runs, "datetime", _BehindClock)
    c = _replica(tmp_path, deployment, 0)
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "in progress" in r.json()["detail"], r.text
    assert len(_runs(deployment)) == 1


TRIGGER_REQUESTS = [
    "POST /flow_runs/filter",  # the last run: its state and time, the server's clock
    "POST /deployments/{id}/create_flow_run",  # the new run, keyed by the last one
]


def test_a_trigger_asks_prefect_two_things(
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
        api.runs, "_server_time", lambda *a: server_time(*a) + timedelta(hours=1)
    )

    prefect_requests.clear()
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    assert prefect_requests.plan() == TRIGGER_REQUESTS
    assert len(_runs(deployment)) == 2

    # Refused while that run is in progress: the last run only.
    prefect_requests.clear()
    r = c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]})
    assert r.status_code == 429 and "in progress" in r.json()["detail"]
    assert prefect_requests.plan() == TRIGGER_REQUESTS[:1]


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
    tmp_path: Path,
    deployment: str,
    prefect_requests: PrefectRequests,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API starts its Prefect client and looks the deployment up when it starts,
    before it answers, so the first trigger after `memdump serve` starts makes the one
    request every trigger makes: it took 1.7-2.2 s, the client's imports and start-up
    and the lookup, every other trigger 40-60 ms (2026-11-30); and while the warming ran
    beside the API, a trigger sent as soon as it answered still took 0.75 s
    (2026-12-01). A slower warming here (0.5 s more) is waited for all the same."""
    warm = api.runs.PrefectRuns.warm

    def slow_warm(self: api.runs.PrefectRuns) -> None:
        time.sleep(0.5)
        warm(self)

    monkeypatch.setattr(api.runs.PrefectRuns, "warm", slow_warm)
    with _replica(tmp_path, deployment, 0, interval=0) as c:
        prefect_requests.clear()
        assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
        assert prefect_requests.plan() == ["POST /deployments/{id}/create_flow_run"]
    assert len(_runs(deployment)) == 1
