"""A capture run of many VMs made up in a Prefect server, without capturing anything: the
flow run, one capture task run per VM (its step tag and its flow run's targets, as the
capture flow writes them: memdump.runinfo) and the progress artifacts of the VMs that
stream, in either fan-out mode. With ``fanout="deployments"`` the VMs are dealt into
``parts``, each part's chains a child flow run, laid out as Prefect's ``run_deployment``
lays it out from the parent's task (checked against a real run of flows.capture with
MEMDUMP_ORCHESTRATION__FANOUT=deployments): in the parent, the part's task run (the
parent's targets name it for each of the part's VMs) and a placeholder task run whose
``__parents__`` input is that task run; the child flow run's ``parent_task_run_id`` is
the placeholder; in the child, each VM's capture task run (named by the child's own
targets) and its progress artifact.

For /status tests and measurements (issue 17): the API reads it as it reads a real run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from memdump.runinfo import PROGRESS_KEY, Progress, Target, slug, step_tag
from tasks.targets import publish_targets

MIB = 1 << 20


@dataclass
class FleetVM:
    vm_id: str
    capture: UUID  # the VM's task run in the trigger's flow run (its part's, deployments)
    streams: UUID  # the task run that writes its progress (the child's, with deployments)
    flow_run: UUID  # the flow run that task run belongs to
    artifact: UUID | None = None


@dataclass
class FleetRun:
    id: UUID
    vms: list[FleetVM] = field(default_factory=list)


def _task(name: str, tags: list[str]) -> Any:
    from prefect import Task

    return Task(fn=lambda: None, name=name, tags=tags)


def make_run(
    flow_name: str,
    n: int,
    *,
    fanout: Literal["tasks", "deployments"] = "tasks",
    streaming: int = 3,
    hypervisor: str = "lab-many-1",
    parts: int = 2,
) -> FleetRun:
    """An ``"all"`` run of ``n`` VMs (vm-001..), all Running; the first ``streaming``
    have streamed half of 16 MiB. With deployments, VM i is in part i mod ``parts``."""
    from prefect import flow, get_client
    from prefect.client.schemas.objects import TaskRunResult
    from prefect.states import Running

    @flow(name=flow_name)
    def parent(vm_ids: list[str]) -> None:  # pragma: no cover - never run
        pass

    @flow(name=f"{flow_name}-part")
    def child(targets: list[tuple[str, str | None]]) -> None:  # pragma: no cover - never run
        pass

    tags = [step_tag("capture")]
    vms = [f"vm-{i:03d}" for i in range(1, n + 1)]
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(parent, parameters={"vm_ids": ["all"]}, state=Running())
        out = FleetRun(run.id)
        if fanout == "tasks":
            for i, vm in enumerate(vms, start=1):
                cap = client.create_task_run(
                    _task("capture-vm", tags), run.id, f"cap-{i}", state=Running()
                )
                out.vms.append(FleetVM(vm, cap.id, cap.id, run.id))
        else:
            dealt = [vms[k::parts] for k in range(parts)]
            for k, some in enumerate(dealt, start=1):
                part = client.create_task_run(
                    _task("capture-part", tags), run.id, f"part-{k}", state=Running()
                )
                holder = client.create_task_run(
                    _task(f"{flow_name}-part/part", []),
                    run.id,
                    f"holder-{k}",
                    state=Running(),
                    task_inputs={"__parents__": [TaskRunResult(id=part.id)]},
                )
                sub = client.create_flow_run(
                    child,
                    parameters={"targets": [[vm, hypervisor] for vm in some]},
                    parent_task_run_id=holder.id,
                    state=Running(),
                )
                inner = []
                for vm in some:
                    cap = client.create_task_run(
                        _task("capture-vm", tags), sub.id, f"cap-{vm}", state=Running()
                    )
                    inner.append(Target(str(cap.id), vm, hypervisor))
                    out.vms.append(FleetVM(vm, part.id, cap.id, sub.id))
                publish_targets(sub.id, inner, client)
            order = {vm: i for i, vm in enumerate(vms)}
            out.vms.sort(key=lambda v: order[v.vm_id])
        publish_targets(
            run.id, [Target(str(v.capture), v.vm_id, hypervisor) for v in out.vms], client
        )
        for v in out.vms[:streaming]:
            start_streaming(v)
    return out


def start_streaming(vm: FleetVM, done: int = 8 * MIB, total: int = 16 * MIB) -> None:
    """The VM's progress artifact, as tasks/capture.py writes it."""
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    p = Progress(done, total)
    with get_client(sync_client=True) as client:
        vm.artifact = client.create_artifact(
            ArtifactCreate(
                type="progress",
                key=f"{PROGRESS_KEY}{slug(vm.vm_id)}",
                description=f"{vm.vm_id}: bytes streamed / dump size",
                data=p.percent,
                metadata_=p.to_metadata(),
                flow_run_id=vm.flow_run,
                task_run_id=vm.streams,
            )
        ).id


def stream(vm: FleetVM, done: int, total: int = 16 * MIB) -> None:
    """An update of the VM's progress artifact (started if it was not)."""
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    if vm.artifact is None:
        start_streaming(vm, done, total)
        return
    p = Progress(done, total)
    with get_client(sync_client=True) as client:
        client.update_artifact(
            vm.artifact, ArtifactUpdate(data=p.percent, metadata_=p.to_metadata())
        )


def finish(vm: FleetVM, state: Any = None) -> None:
    """The VM's chain ends (Completed unless ``state`` says otherwise): its capture task
    run (with deployments, the one in its part's flow run: the part goes on)."""
    from prefect import get_client
    from prefect.states import Completed

    st = state or Completed()
    with get_client(sync_client=True) as client:
        client.set_task_run_state(vm.streams, st.model_copy(), force=True)
