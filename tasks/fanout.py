"""Fan-out across workers (MEMDUMP_ORCHESTRATION__FANOUT=deployments): a trigger's VMs
dealt into a few parts, each part's chains a flow run of its own, which any worker of the
pool takes. A VM's outcome comes back as data (an artifact of the part's flow run per VM,
memdump.runinfo.RESULT_KEY, written as the VM finishes), never parsed out of a state
message: so a part whose worker died is started again for its unfinished VMs only.

Why parts and not a flow run per VM: each flow run costs a worker a new process and the
Prefect server a dozen writes, about 4 CPU seconds in all (benchmarks/fleet.py
--collectors, 2026-12-01: 7.2 s of overhead per VM at N = 100, 16 MiB each, where the
capture itself takes under a second)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefect import get_client, task
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import State
from prefect.states import Failed
from prefect.utilities.context import get_task_and_flow_run_ids

from memdump.errors import CollectorLostError
from memdump.records.model import DumpRecord
from memdump.runinfo import CAPTURE_PART_TASK, RESULT_KEY, step_tag
from memdump.settings import Settings

# How often the trigger's run asks whether a part's flow run has ended (Prefect's
# default, 5 s, was on average 2.5 s more at the end of every fan-out trigger; three
# parts asking each second is nothing to the server).
PART_POLL_SEC = 1.0

# A part's flow run that crashed (its worker or machine went away) is started again, once,
# for its VMs that had no outcome yet; the VMs it had finished are not captured twice.
PART_ATTEMPTS = 2

PartTarget = tuple[str, str | None]  # (VM id, hypervisor or None: its task resolves it)


@dataclass(frozen=True)
class VMOutcome:
    """How one VM's chain ended in a part's flow run: ``result`` "completed", "failed" or
    "timeout"; the record when completed, else the error. ``hypervisor`` is the target's
    as the part was given it (None if the trigger's run could not place the VM)."""

    vm_id: str
    hypervisor: str | None
    result: str
    record: DumpRecord | None = None
    error: str = ""

    @property
    def target(self) -> PartTarget:
        return (self.vm_id, self.hypervisor)

    def to_data(self) -> str:
        return json.dumps(
            [
                {
                    "vm_id": self.vm_id,
                    "hypervisor": self.hypervisor,
                    "result": self.result,
                    "error": self.error,
                    "record": None if self.record is None else self.record.full_dict(),
                }
            ]
        )

    @classmethod
    def from_data(cls, data: object) -> VMOutcome | None:
        """The outcome an artifact's data holds; None if it holds none (never guessed)."""
        try:
            rows: Any = json.loads(data) if isinstance(data, str) else data
            row = rows[0]
            rec = row["record"]
            return cls(
                str(row["vm_id"]),
                None if row["hypervisor"] is None else str(row["hypervisor"]),
                str(row["result"]),
                None if rec is None else DumpRecord.from_dict(rec),
                str(row["error"]),
            )
        except (ValueError, TypeError, KeyError, IndexError):
            return None


def publish_outcome(outcome: VMOutcome) -> None:
    """The VM's outcome as an artifact of the running flow run (a one-row table), written
    as soon as the VM's chain has ended: the trigger's flow run reads it back with
    :func:`part_outcomes`, even if this flow run dies before its other VMs end."""
    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    get_client(sync_client=True).create_artifact(
        ArtifactCreate(
            type="table",
            key=RESULT_KEY,
            description=f"how the chain of {outcome.vm_id} ended",
            data=outcome.to_data(),
            flow_run_id=flow_run_id,
            task_run_id=task_run_id,
        )
    )


def part_outcomes(flow_run_id: Any) -> list[VMOutcome]:
    """The outcomes a part's flow run published, one per VM that ended there."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    out: list[VMOutcome] = []
    page = 200
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                    key=ArtifactFilterKey(any_=[RESULT_KEY]),
                ),
                limit=page,
                offset=len(out),
            )
            out += [o for a in found if (o := VMOutcome.from_data(a.data)) is not None]
            if len(found) < page:
                return out


def deal(targets: Sequence[PartTarget], parts: int) -> list[list[PartTarget]]:
    """``targets`` dealt in turn into at most ``parts`` parts, as even as can be. In the
    order given (the hypervisors taking turns, flows.capture) a hypervisor's VMs are
    spread over the parts as far as the counts allow, so parts seldom wait for the same
    full hypervisor at once."""
    n = max(1, min(parts, len(targets)))
    return [p for p in (list(targets[i::n]) for i in range(n)) if p]


@task(
    name=CAPTURE_PART_TASK,
    task_run_name=CAPTURE_PART_TASK + "-{number}",
    # /status reads this run as the capture of each VM the trigger's targets give it,
    # until the VM's own capture in the part's flow run is there to read.
    tags=[step_tag("capture")],
)
def run_capture_part(
    targets: list[PartTarget], source: str, number: int, at_once: int | None = None
) -> State[Any] | list[VMOutcome]:
    """Start a flow run for part ``number`` of a trigger, VMs ``targets`` (any worker of
    the pool takes it; at most ``at_once`` capturing at once), and wait for it. Its VMs'
    outcomes, in the order given; Failed (the outcomes as its data) if a VM has none: the
    part's flow run failed before it ended that VM's chain, or crashed twice (each time
    started again for the VMs left)."""
    from prefect.deployments import run_deployment

    settings = Settings()
    done: dict[PartTarget, VMOutcome] = {}
    left = list(targets)
    why = ""
    for attempt in range(1, PART_ATTEMPTS + 1):
        child = run_deployment(
            name=settings.orchestration.child_deployment,
            parameters={"targets": left, "source": source, "at_once": at_once},
            timeout=None,
            poll_interval=PART_POLL_SEC,
            as_subflow=True,
            tags=["memdump"],
        )
        state = child.state  # type: ignore[union-attr]  # sync call: a FlowRun
        name = child.name  # type: ignore[union-attr]
        for o in part_outcomes(child.id):  # type: ignore[union-attr]
            done.setdefault(o.target, o)
        left = [t for t in left if t not in done]
        if not left:
            return [done[t] for t in targets]
        if state is None or not state.is_crashed():
            what = f"{state.type.value}: {state.message}" if state else "no state"
            why = f"flow run {name} ended without this VM's outcome ({what})"
            break
        why = str(
            CollectorLostError(
                f"flow run {name} crashed (its worker is gone): {state.message}",
                flow_run=name,
                attempt=attempt,
            )
        )
    outcomes = [done.get(t) or VMOutcome(t[0], t[1], "failed", error=why) for t in targets]
    return Failed(message=f"{len(left)} of {len(targets)} VM(s) did not end: {why}", data=outcomes)
