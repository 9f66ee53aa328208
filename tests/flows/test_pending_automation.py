"""A collector that dies after taking a flow run (Pending) and before starting it sends
no heartbeat, so the heartbeat automation never counts it: the run would stay Pending for
ever and the trigger waiting on it with it (refusing every later trigger). The Pending
automation (tasks/automations.py) marks such a run Crashed, on the real Prefect server of
the session's stack: only runs of its work pool, and not one that went on to run."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest

from tasks.automations import ensure_pending_automation

pytestmark = pytest.mark.lab

HEARTBEAT_SEC = 4  # the window, 3 x 4 = 12 s, is Prefect's minimum for such a trigger


def _state(client: Any, run_id: Any) -> Any:
    return client.read_flow_run(run_id).state


@pytest.mark.usefixtures("on_stack_prefect")
def test_a_run_a_dead_collector_left_pending_is_crashed() -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.states import Completed, Pending, Running

    pool, other = (f"memdump-test-{secrets.token_hex(4)}" for _ in range(2))
    name = f"memdump-test pending {pool}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("memdump-test-pending")
        deployments = {}
        for p in (pool, other):
            client.create_work_pool(WorkPoolCreate(name=p, type="process"))
            deployments[p] = client.create_deployment(flow_id=flow_id, name=p, work_pool_name=p)
        automation = ensure_pending_automation(HEARTBEAT_SEC, pool, name=name)
        runs: list[Any] = []
        try:
            time.sleep(2)  # the server's trigger service takes the new automation in
            orphan, started = (
                client.create_flow_run_from_deployment(deployments[pool]) for _ in range(2)
            )
            elsewhere = client.create_flow_run_from_deployment(deployments[other])
            runs = [orphan, started, elsewhere]
            for run in runs:
                client.set_flow_run_state(run.id, Pending())
            client.set_flow_run_state(started.id, Running())
            client.set_flow_run_state(started.id, Completed())
            deadline = time.monotonic() + 60
            while _state(client, orphan.id).type != StateType.CRASHED:
                assert time.monotonic() < deadline, _state(client, orphan.id)
                time.sleep(1)
            crashed = _state(client, orphan.id)
            assert "the collector that took it is gone" in (crashed.message or "")
            assert _state(client, started.id).type == StateType.COMPLETED
            # Another pool's run, Pending as long: not this automation's to mark.
            assert _state(client, elsewhere.id).type == StateType.PENDING
        finally:
            client.delete_automation(automation)
            for run in runs:
                client.delete_flow_run(run.id)
            for p, dep in deployments.items():
                client.delete_deployment(dep)
                client.delete_work_pool(p)
