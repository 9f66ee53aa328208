"""The Prefect automation that marks a flow run Crashed when its heartbeats stop.

A worker or collector that dies outright (SIGKILL, power loss) cannot report its flow
runs; they would stay Running for ever, and the trigger's flow run waiting on one of them
with it. Flow runs send a heartbeat event every ``heartbeat_sec`` (Prefect's
PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set by ``deployments.worker``); this automation, on the
Prefect server, marks a run Crashed once three heartbeats in a row are missing. The
trigger's flow run then tries that VM once more on a live collector.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import cast

NAME = "memdump: crash flow runs without heartbeats"
_FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def ensure_crash_automation(heartbeat_sec: int) -> str:
    """Create or update the automation; returns its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    expect = {"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in _FINAL)}
    wanted = Automation(
        name=NAME,
        description="A flow run whose heartbeats stopped lost its worker (tasks/automations.py)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect=expect,
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=3 * heartbeat_sec),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,
                state=StateType.CRASHED,
                message=f"no heartbeat for {3 * heartbeat_sec} s: its worker is gone",
                force=False,
            )
        ],
    )
    # Called from sync code: these return the value itself, not a coroutine.
    try:
        existing = cast(Automation, Automation.read(name=NAME))
    except ValueError:
        cast(Automation, wanted.create())
        return _dedupe()
    wanted.id = existing.id
    wanted.update()
    return str(existing.id)


def _dedupe() -> str:
    """Workers starting together may each have created one: all keep the same one (the
    lowest id) and delete the others (one of them may have done so already)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = sorted(client.read_automations_by_name(NAME), key=lambda a: str(a.id))
        for extra in found[1:]:
            with contextlib.suppress(Exception):
                client.delete_automation(extra.id)
        return str(found[0].id)
