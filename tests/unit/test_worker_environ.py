"""What deployments.worker sets for the Prefect worker it starts and the flow runs that
inherit it (the worker itself: tests/e2e/test_collectors.py)."""

from __future__ import annotations

from deployments.worker import prefect_environ
from memdump.settings import Settings


def test_the_worker_polls_as_often_as_the_runner_and_runs_beat_for_the_automation() -> None:
    got = prefect_environ(Settings(), {})
    # Not Prefect's 10 s: a fan-out trigger waits for a poll for its run, then its parts.
    assert got == {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    tuned = Settings(orchestration={"runner_poll_sec": 3, "heartbeat_sec": 45})
    assert prefect_environ(tuned, {}) == {
        "PREFECT_WORKER_QUERY_SECONDS": "3",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45",
    }


def test_an_operators_own_poll_interval_is_kept() -> None:
    got = prefect_environ(Settings(), {"PREFECT_WORKER_QUERY_SECONDS": "5"})
    assert "PREFECT_WORKER_QUERY_SECONDS" not in got
