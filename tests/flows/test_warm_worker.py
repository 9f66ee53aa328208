"""deployments.warm_worker: a collector's Prefect worker (real, against the test harness's
Prefect server) starts a flow run of one of the project's deployments as a fork of the
warm forkserver, any other flow run Prefect's way (a new interpreter)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tests.helpers.stack import REPO
from tests.helpers.warm_flow import where_am_i

POOL = "memdump-warm-test"
OURS = "tests/helpers/warm_flow.py:where_am_i"


def _deploy(client: Any, name: str, entrypoint: str, **job_variables: Any) -> Any:
    flow_id = client.create_flow(where_am_i)
    return client.create_deployment(
        flow_id, name, entrypoint=entrypoint, work_pool_name=POOL, job_variables=job_variables
    )


def test_our_flow_runs_are_forked_warm_and_others_go_prefects_way(
    warm_runs: int, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from deployments.warm_worker import WarmProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=POOL,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )
        ours = _deploy(client, "ours", OURS)
        # The same flow under an entrypoint the worker was not given: not one of ours.
        # (Run from the checkout, as prefect.yaml's pull step has a collector's runs run.)
        theirs = _deploy(client, "theirs", "./" + OURS, working_dir=str(REPO))
        runs = {}
        for key, dep in (("ours", ours), ("theirs", theirs)):
            out = tmp_path / f"{key}.json"
            runs[key] = (
                client.create_flow_run_from_deployment(
                    dep, parameters={"out": str(out), "module": "memdump.pipeline"}
                ).id,
                out,
            )

    async def work() -> None:
        async with WarmProcessWorker(work_pool_name=POOL, flows={OURS: where_am_i}) as worker:
            await worker.get_and_submit_flow_runs()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [(await worker.client.read_flow_run(i)).state for i, _ in runs.values()]
                if all(s is not None and s.is_final() for s in states):
                    break
                await asyncio.sleep(0.5)

    asyncio.run(work())
    with get_client(sync_client=True) as client:
        for key, (run_id, _) in runs.items():
            state = client.read_flow_run(run_id).state
            assert state is not None and state.is_completed(), (key, state)
    seen = {key: json.loads(out.read_text()) for key, (_, out) in runs.items()}
    assert seen["ours"]["ppid"] == warm_runs and seen["ours"]["preloaded"]
    assert seen["theirs"]["ppid"] != warm_runs and not seen["theirs"]["preloaded"]
