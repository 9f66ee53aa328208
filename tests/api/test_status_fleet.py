"""/status's per-VM detail read from a real Prefect server (issue 17): a run of VMs made
up in it (tests/helpers/fleet_runs.py: the task runs and progress artifacts a capture run
writes, nothing captured), in both fan-out modes."""

from __future__ import annotations

from typing import Any

import pytest

from api.runs import PrefectRuns, VMRun
from tests.helpers import fleet_runs
from tests.helpers.fleet_runs import MIB
from tests.helpers.prefect_requests import PrefectRequests

HALF = (50.0, 8 * MIB, 16 * MIB)


def _vm(vm_id: str, state: str, progress: tuple[Any, ...] | None = None, error: Any = None) -> Any:
    p, done, total = progress or (None, None, None)
    return VMRun(vm_id, state, p, error, done, total)


@pytest.mark.parametrize("fanout", ["tasks", "deployments"])
def test_progress_shows_in_both_fanout_modes(prefect_server: None, fanout: Any) -> None:
    """With the fan-out over deployments each VM streams in a child flow run, whose
    progress artifact is the child's: /status showed every VM "pending", progress null,
    until it ended."""
    from prefect.states import Failed

    flow = f"capture-vms-fleet-{fanout}"
    run = fleet_runs.make_run(flow, 4, fanout=fanout, streaming=2)
    got = PrefectRuns(flow, "unused").latest()
    assert got is not None and got.id == str(run.id) and got.state_type == "RUNNING"
    assert got.vms == (
        _vm("vm-001", "running", HALF),
        _vm("vm-002", "running", HALF),
        _vm("vm-003", "pending"),
        _vm("vm-004", "pending"),
    )

    fleet_runs.stream(run.vms[0], 16 * MIB)
    fleet_runs.finish(run.vms[0])
    fleet_runs.finish(run.vms[1], Failed(message="vm-002: the hypervisor went away"))
    fleet_runs.stream(run.vms[2], 4 * MIB)
    got = PrefectRuns(flow, "unused").latest()
    assert got is not None and got.vms == (
        _vm("vm-001", "completed", (100.0, 16 * MIB, 16 * MIB)),
        _vm("vm-002", "failed", HALF, "vm-002: the hypervisor went away"),
        _vm("vm-003", "running", (25.0, 4 * MIB, 16 * MIB)),
        _vm("vm-004", "pending"),
    )


def test_a_read_asks_again_only_for_what_is_still_in_flight(
    prefect_requests: PrefectRequests,
) -> None:
    """A finished VM's entry cannot change: after the first read of a run, a read asks
    how many task runs there are, then only for those in flight at the last read or now,
    and for their progress artifacts; everything again only when the count says a task
    run came and finished in between."""
    from prefect import Task, get_client
    from prefect.states import Failed

    from memdump.runinfo import Target, step_tag
    from tasks.targets import publish_targets

    flow = "capture-vms-fleet-in-flight"
    run = fleet_runs.make_run(flow, 6, streaming=2)
    runs = PrefectRuns(flow, "unused")
    prefect_requests.clear()
    assert runs.latest() is not None  # the first read: all of it
    assert prefect_requests.rows_of("POST /task_runs/filter") == [6]
    # The two VMs' progress, then the run's targets (which VM each task run is for).
    assert prefect_requests.rows_of("POST /artifacts/filter") == [2, 1]

    for vm in run.vms[:2]:
        fleet_runs.stream(vm, 16 * MIB)
        fleet_runs.finish(vm)
    fleet_runs.stream(run.vms[2], 4 * MIB)
    assert runs.latest() is not None  # the six in flight before, two of them now ended
    fleet_runs.stream(run.vms[2], 8 * MIB)
    prefect_requests.clear()
    got = runs.latest()
    assert prefect_requests.plan() == [
        "POST /flow_runs/filter",
        "POST /task_runs/count",
        "POST /task_runs/filter",
        "POST /artifacts/filter",
    ]
    # vm-003..vm-006, and vm-003's artifact: not the two finished VMs' again.
    assert prefect_requests.rows_of("POST /task_runs/filter") == [4]
    assert prefect_requests.rows_of("POST /artifacts/filter") == [1]
    done = (100.0, 16 * MIB, 16 * MIB)
    assert got is not None and got.vms == (
        _vm("vm-001", "completed", done),
        _vm("vm-002", "completed", done),
        _vm("vm-003", "running", HALF),
        _vm("vm-004", "pending"),
        _vm("vm-005", "pending"),
        _vm("vm-006", "pending"),
    )

    # A VM whose task run came and failed between two reads: found by the count.
    with get_client(sync_client=True) as client:
        task = Task(fn=lambda: None, name="capture-vm", tags=[step_tag("capture")])
        late = client.create_task_run(task, run.id, "late", state=Failed(message="no such VM"))
        publish_targets(run.id, [Target(str(late.id), "vm-007", "lab-many-1")], client)
    prefect_requests.clear()
    got = runs.latest()
    assert prefect_requests.rows_of("POST /task_runs/filter") == [4, 7]
    assert got is not None and got.vms[-1] == _vm("vm-007", "failed", None, "no such VM")
