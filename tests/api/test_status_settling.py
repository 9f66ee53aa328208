"""The Prefect server records a task run's states from its events: the task run's row
(state type and name) and the state itself (with its message) apart. A /status read
between the two saw the failed VM's capture as FAILED without its message, showed
"Failed" instead of the error, and kept that detail as final (seen in CI, 2026-11-30:
tests/e2e/test_cli.py::test_status_names_the_vm_that_failed). Such a task run is read
again; the run is kept as final only once every state is in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

import api.runs
from api.runs import PrefectRuns
from memdump.runinfo import step_tag
from tests.helpers.targets import targets_artifact


def _task_run(run_id: Any, tr_id: Any, settled: bool) -> Any:
    from prefect.client.schemas.objects import StateType, TaskRun
    from prefect.states import Failed

    state = Failed(message="Task run encountered an exception VMNotFoundError: no VM 'nope-01'")
    tr = TaskRun(
        id=tr_id,
        flow_run_id=run_id,
        task_key="capture-vm",
        dynamic_key="0",
        name="capture-vm-nope-01",
        tags=[step_tag("capture")],
        state=state if settled else None,
    )
    tr.state_type, tr.state_name = StateType.FAILED, "Failed"
    return tr


def test_a_failed_vm_read_before_its_state_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Failed

    run = FlowRun(flow_id=uuid4(), parameters={"vm_ids": ["nope-01"]}, state=Failed())
    tr_id = uuid4()
    recorded = {"settled": False}
    asked: list[Any] = []

    def task_runs(client: Any, scope: Any, which: Any) -> list[Any]:
        asked.append(which)
        if which is not None and tr_id not in (which.id.any_ if which.id else []):
            return []
        return [_task_run(run.id, tr_id, recorded["settled"])]

    runs = PrefectRuns("capture-vms", "on-demand")
    monkeypatch.setattr(runs, "_newest", lambda client: (run, datetime.now(UTC)))
    monkeypatch.setattr(api.runs, "_task_runs", task_runs)
    monkeypatch.setattr(api.runs, "_count_task_runs", lambda client, scope: 1)
    monkeypatch.setattr(api.runs, "_progress_artifacts", lambda client, ids: [])
    named = targets_artifact(run.id, [(tr_id, "nope-01", None)])
    monkeypatch.setattr(api.runs, "_target_artifacts", lambda client, ids: [named])
    first = runs._latest(None)  # noqa: SLF001
    assert first is not None
    (vm,) = first.vms
    assert (vm.state, vm.error) == ("failed", "Failed")  # the state not in yet
    recorded["settled"] = True
    second = runs._latest(None)  # noqa: SLF001
    assert second is not None
    (vm,) = second.vms
    assert vm.state == "failed" and vm.error == "no VM 'nope-01'"
    # Read again as in flight (by id), then kept as final: the next read asks nothing.
    assert asked[0] is None and asked[1] is not None
    asked.clear()
    third = runs._latest(None)  # noqa: SLF001
    assert third is not None and third.vms == second.vms and asked == []
