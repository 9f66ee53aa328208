"""/status's per-VM detail comes from typed data the flow writes (issue 13, item 3): the
step of each task run is a tag, its VM is in the flow run's targets artifact (issue 17:
not a tag per VM, which costs a Prefect request per task run), the byte counts are
progress-artifact metadata, all named once in memdump.runinfo. A real flow run under
Prefect's test harness (the engine faked), then every text a reader could parse is
changed behind its back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memdump.errors import HostKeyError
from memdump.runinfo import (
    CAPTURE_FLOW,
    CAPTURE_PART_FLOW,
    CAPTURE_PART_TASK,
    CAPTURE_TASK,
    LIST_TASK,
    TARGETS_KEY,
    step_tag,
    targets_from_data,
)


def test_status_detail_is_read_from_tags_targets_and_metadata(fake_engine: dict[str, Any]) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from api.runs import PrefectRuns, VMRun
    from flows.capture import capture_vms

    fake_engine["sizes"].update({"vm-a": 4096, "vm-b": 8192})
    # A failure whose text names no VM: only the run's targets say whose it is.
    fake_engine["plan"]["vm-c"] = [HostKeyError("host key mismatch")]
    state = capture_vms(
        vm_ids=["vm-a", "vm-b", "vm-c", "unknown-1"], source="test", return_state=True
    )
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    assert run_id is not None

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        assert len(task_runs) == 4  # one per VM: its whole chain
        # One set of tags for every capture: Prefect's check of tag concurrency limits
        # before each task run is then answered from its cache, not a request per VM.
        assert {frozenset(tr.tags) for tr in task_runs} == {frozenset([step_tag("capture")])}
        for i, tr in enumerate(task_runs):
            client.set_task_run_name(tr.id, f"renamed-{i}")
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        (targets,) = [a for a in arts if a.key == TARGETS_KEY]  # published once
        named = {t.task_run_id: t.vm_id for t in targets_from_data(targets.data)}
        assert sorted(named.values()) == ["unknown-1", "vm-a", "vm-b", "vm-c"]
        assert set(named) == {str(tr.id) for tr in task_runs}
        progress = [a for a in arts if a.type == "progress"]
        assert len(progress) == 3  # vm-a, vm-b, vm-c (its capture failed after it began)
        for a in progress:
            client.update_artifact(a.id, ArtifactUpdate(description="renamed"))

    latest = PrefectRuns(CAPTURE_FLOW, "unused").latest()
    assert latest is not None and latest.id == str(run_id)
    assert latest.vms == (
        VMRun("vm-a", "completed", 100.0, None, 4096, 4096),
        VMRun("vm-b", "completed", 100.0, None, 8192, 8192),
        VMRun("vm-c", "failed", 0.0, "host key mismatch"),
        VMRun("unknown-1", "failed", None, "no VM 'unknown-1'"),
    )


def test_tasks_declare_their_step_and_the_api_names_none() -> None:
    """/status finds each step by the tag its task declares, so renaming a task (or its
    runs) cannot silently break it; the API holds no task or flow name of its own."""
    from flows.capture import capture_part, capture_vms
    from tasks.capture import capture_vm
    from tasks.fanout import run_capture_part
    from tasks.listing import list_vms

    for task, name, step in (
        (capture_vm, CAPTURE_TASK, "capture"),
        (run_capture_part, CAPTURE_PART_TASK, "capture"),
        (list_vms, LIST_TASK, "list"),
    ):
        assert task.name == name
        assert step_tag(step) in task.tags  # type: ignore[arg-type]
        assert step_tag(step) in task.with_options(name="renamed").tags  # type: ignore[arg-type]
    assert (capture_vms.name, capture_part.name) == (CAPTURE_FLOW, CAPTURE_PART_FLOW)
    api = Path(__file__).parents[2] / "api"
    names = (CAPTURE_TASK, LIST_TASK, "TimedOut", "capture-progress", "capture-vms")
    for module in api.glob("*.py"):
        text = module.read_text()
        assert not [n for n in names if f'"{n}' in text], module
