"""The Prefect automation that marks a flow run Crashed when its heartbeats stop.

A worker or collector that dies outright (SIGKILL, power loss) cannot report its flow
runs; they would stay Running for ever, and the trigger's flow run waiting on one of them
with it. Flow runs send a heartbeat event every ``heartbeat_sec`` (Prefect's
PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set by ``deployments.worker``); this automation, on the
Prefect server, marks a run Crashed once three heartbeats in a row are missing. The
trigger's flow run then tries that VM once more on a live collector.

A run sends its first heartbeat once it runs. A collector that dies after taking a run
(Pending) and before starting it leaves the run Pending for ever, no heartbeat ever
starts the countdown above, and the trigger's flow run waits on it for ever, refusing
every later trigger meanwhile. A second automation marks a run of the collectors' work
pool Crashed when it stays Pending as long: the server emits the Pending and Running state
events itself, so a dead collector cannot withhold them. Only the work pool's runs: their
state events name the pool (heartbeats do not, which is why it is a second automation),
and flow runs served elsewhere (``memdump serve``'s runner, a flow called in-process)
never go through a worker's Pending.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger

NAME = "memdump: crash flow runs without heartbeats"
PENDING_NAME = "memdump: crash flow runs a dead collector left Pending"
_FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def pending_trigger(heartbeat_sec: int, pool: str) -> EventTrigger:
    """Fires for a flow run of work pool ``pool`` Pending for three heartbeats' time (its
    collector took it and died before starting it)."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        after={"prefect.flow-run.Pending"},
        expect={"prefect.flow-run.Running", *(f"prefect.flow-run.{s}" for s in _FINAL)},
        match={"prefect.resource.id": ["prefect.flow-run.*"]},
        match_related={"prefect.resource.role": "work-pool", "prefect.resource.name": pool},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=3 * heartbeat_sec),
    )


def ensure_pending_automation(heartbeat_sec: int, pool: str, name: str = PENDING_NAME) -> str:
    """Create or update the Pending automation for work pool ``pool``; returns its id."""
    from prefect.automations import Automation

    wanted = Automation(
        name=name,
        description="A flow run its collector took and never started (tasks/automations.py)",
        trigger=pending_trigger(heartbeat_sec, pool),
        actions=[_crash(f"Pending for {3 * heartbeat_sec} s: the collector that took it is gone")],
    )
    return _ensure(wanted, name)


def ensure_crash_automation(heartbeat_sec: int) -> str:
    """Create or update the automation; returns its id."""
    from prefect.automations import Automation
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
        actions=[_crash(f"no heartbeat for {3 * heartbeat_sec} s: its worker is gone")],
    )
    return _ensure(wanted, NAME)


def _crash(message: str) -> ChangeFlowRunState:
    """The action of both automations: the flow run the trigger fired for, Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    return ChangeFlowRunState(name=None, state=StateType.CRASHED, message=message, force=False)


def _ensure(wanted: Automation, name: str) -> str:
    from prefect.automations import Automation

    # Called from sync code: these return the value itself, not a coroutine.
    try:
        existing = cast(Automation, Automation.read(name=name))
    except ValueError:
        cast(Automation, wanted.create())
        return _dedupe(name)
    wanted.id = existing.id
    wanted.update()
    return str(existing.id)


def _dedupe(name: str) -> str:
    """Workers starting together may each have created one: all keep the same one (the
    lowest id) and delete the others (one of them may have done so already)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = sorted(client.read_automations_by_name(name), key=lambda a: str(a.id))
        for extra in found[1:]:
            with contextlib.suppress(Exception):
                client.delete_automation(extra.id)
        return str(found[0].id)
