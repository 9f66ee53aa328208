"""A collector's Prefect worker whose flow runs are warm (``deployments.worker``'s child).

Prefect's process worker starts each flow run as ``python -m
prefect.runner._workspace_supervisor``, which runs the deployment's pull steps and then
``python -m prefect.engine``: two interpreters that import Prefect, the second this
project too, before the run's first line. With the fan-out over deployments a trigger
waits for that twice (its own run, then its parts'), and each costs the collector about
3 CPU-seconds (benchmarks/fleet.py --collectors, 2026-12-01).

Here the worker is Prefect's own (polling, limits, heartbeats, cancellation, crash
reports), with one change: a flow run of one of this project's deployments
(deployments.catalog: its entrypoint, imported once in this process) is started as the
runner of ``memdump serve`` starts one, forked from a forkserver that has imported
Prefect and the project already (deployments.warm). Each flow run still gets a process
of its own, killed on cancellation as before. Any other flow run goes Prefect's way.
What the pull step does (``set_working_directory`` to ``$MEMDUMP_HOME``) is done once:
the worker moves to that directory, and its forks start there. A flow run whose job
variables name a command or a working directory of its own goes Prefect's way too.

``python -m deployments.warm_worker --pool P [--name N] [--limit L]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from prefect.runner._flow_run_executor import FlowRunExecutorContext
from prefect.runner._starter_direct import DirectSubprocessStarter
from prefect.workers.process import ProcessWorker, ProcessWorkerResult

from deployments import warm
from deployments.catalog import deployment_specs
from memdump.settings import Settings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.flows import Flow
    from prefect.runner._process_manager import ProcessHandle
    from prefect.workers.process import ProcessJobConfiguration


def catalog_flows(settings: Settings) -> dict[str, Any]:
    """Entrypoint -> its flow, for every deployment of the catalog (imported now)."""
    return {spec.entrypoint: spec.flow() for spec in deployment_specs(settings)}


class WarmProcessWorker(ProcessWorker):
    """Prefect's process worker; the catalog's flow runs are forks of the forkserver."""

    def __init__(
        self, *args: Any, flows: dict[str, Any], heartbeat_sec: int | None = None, **kwargs: Any
    ) -> None:
        """``heartbeat_sec``: of its flow runs (None: as this process's environment says)."""
        super().__init__(*args, **kwargs)
        self._flows = flows
        self._heartbeat_sec = heartbeat_sec
        self._entrypoints: dict[Any, str | None] = {}  # deployment id -> its entrypoint

    async def _flow_of(self, flow_run: FlowRun) -> Flow[Any, Any] | None:
        if flow_run.deployment_id is None:
            return None
        if flow_run.deployment_id not in self._entrypoints:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            self._entrypoints[flow_run.deployment_id] = deployment.entrypoint
        return self._flows.get(self._entrypoints[flow_run.deployment_id] or "")

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        flow = await self._flow_of(flow_run)
        # Not ours, or a command or directory of its own asked for: Prefect's way.
        if flow is None or configuration._command_configured or configuration.working_dir:
            return await super().run(flow_run, configuration, task_status)
        status = anyio.TASK_STATUS_IGNORED if task_status is None else task_status

        async def resolve(_: FlowRun) -> Flow[Any, Any]:  # for its on_crashed hooks
            return flow

        async with FlowRunExecutorContext() as ctx:
            starter = DirectSubprocessStarter(
                flow=flow,
                heartbeat_seconds=self._heartbeat_sec,
                control_channel=ctx.control_channel,
            )
            executor = ctx.create_executor(
                flow_run, starter, resolve_flow=resolve, propose_submitting=False
            )
            execution = None

            async def execute(
                *, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
            ) -> None:
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as group:
                handle = await group.start(execute)
                if handle.pid is None:
                    raise RuntimeError("flow run process has no PID")
                status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("failed to start the flow run process")
        return ProcessWorkerResult(
            status_code=execution.status_code, identifier=str(execution.handle.pid)
        )


def main() -> int:
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    # Where prefect.yaml's pull step runs each flow run (relative settings such as the
    # default data dir are read there): the forks start in this process's directory.
    home = os.environ.get("MEMDUMP_HOME")
    if home:
        os.chdir(home)
    settings = Settings()
    flows = catalog_flows(settings)
    # From the main thread, before any other starts: the forkserver forks from here.
    warm.install()
    setup_signal_handlers_worker(os.getpid(), "the process worker", print)
    worker = WarmProcessWorker(
        name=args.name,
        work_pool_name=args.pool,
        limit=args.limit,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        flows=flows,
        heartbeat_sec=settings.orchestration.heartbeat_sec,
    )
    try:
        asyncio.run(worker.start(run_once=False, with_healthcheck=False, printer=print))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"Worker {worker.name!r} stopped!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
