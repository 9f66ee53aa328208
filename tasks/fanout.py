"""Fan-out across workers (MEMDUMP_ORCHESTRATION__FANOUT=deployments): a VM's chain as
a flow run of its own, which any worker of the pool takes; its result comes back as data
(an artifact of the child run, memdump.runinfo.RESULT_KEY), never parsed out of a state
message."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_client, task
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import State
from prefect.states import Failed
from prefect.utilities.context import get_task_and_flow_run_ids

from memdump.errors import CollectorLostError
from memdump.records.model import DumpRecord
from memdump.runinfo import CAPTURE_RUN_TASK, CAPTURE_TASK, RESULT_KEY, TIMED_OUT, step_tag
from memdump.settings import Settings
from tasks.capture import retry_if_retryable


def publish_result(record: DumpRecord) -> None:
    """The chain's record as an artifact of the running flow run (a one-row table): the
    trigger's flow run reads it back with :func:`child_result`."""
    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    get_client(sync_client=True).create_artifact(
        ArtifactCreate(
            type="table",
            key=RESULT_KEY,
            description=f"the record of {record.dom} ({record.vmid})",
            data=json.dumps([record.full_dict()]),
            flow_run_id=flow_run_id,
            task_run_id=task_run_id,
        )
    )


def child_result(flow_run_id: Any) -> DumpRecord | None:
    """The record a child flow run published, None if it published none."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[RESULT_KEY]),
            ),
            limit=1,
        )
    if not found:
        return None
    rows = json.loads(str(found[0].data))
    return DumpRecord.from_dict(rows[0])


@task(
    name=CAPTURE_RUN_TASK,
    task_run_name=CAPTURE_TASK + "-{vm_id}",
    # /status reads this run as the VM's capture (the flow run's targets name the VM).
    tags=[step_tag("capture")],
    retry_condition_fn=retry_if_retryable,
    retries=1,
)
def run_capture_flow(
    vm_id: str, hypervisor: str | None, source: str
) -> State[Any] | DumpRecord | None:
    """Start VM ``vm_id``'s flow run (any worker of the pool takes it) and wait for it.
    A run that crashed (its worker or machine died) is tried once more, elsewhere.
    Completed: the child's record (None if it published none)."""
    from prefect.deployments import run_deployment

    settings = Settings()
    child = run_deployment(
        name=settings.orchestration.child_deployment,
        parameters={"vm_id": vm_id, "hypervisor": hypervisor, "source": source},
        timeout=None,
        as_subflow=True,
        tags=["memdump"],
    )
    state = child.state  # type: ignore[union-attr]  # sync call: a FlowRun
    name = child.name  # type: ignore[union-attr]
    if state is not None and state.is_completed():
        return child_result(child.id)  # type: ignore[union-attr]
    if state is not None and state.is_crashed():
        raise CollectorLostError(
            f"{vm_id}: flow run {name} crashed (its worker is gone): {state.message}",
            vm_id=vm_id,
            flow_run=name,
        )
    message = f"flow run {name}: {state.message if state else 'no state'}"
    if state is not None and state.name == TIMED_OUT:
        return Failed(name=TIMED_OUT, message=message)
    return Failed(message=message)
