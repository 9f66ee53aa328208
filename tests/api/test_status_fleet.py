"""/status's per-VM detail read from a real Prefect server (issue 17): a run of VMs made
up in it (tests/api/fleet_runs.py: the task runs and progress artifacts a capture run
writes, nothing captured), in both fan-out modes."""

from __future__ import annotations

from typing import Any

import pytest

from api.runs import PrefectRuns, VMRun
from tests.api import fleet_runs
from tests.api.fleet_runs import MIB

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
