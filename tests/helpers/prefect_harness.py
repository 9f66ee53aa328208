"""A temporary Prefect server in this process's settings (Prefect's own test harness),
and deployments no runner serves, so a run created on one stays Scheduled until the
test moves it on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


@contextmanager
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    mp = pytest.MonkeyPatch()
    # Telemetry off: its heartbeat races the harness's fresh SQLite ("database is locked").
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DO_NOT_TRACK", "1")
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        mp.undo()


def idle_deployment(flow: str, name: str = "on-demand") -> None:
    """Flow ``flow`` with deployment ``name`` and no runner."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow)
        client.create_deployment(flow_id=flow_id, name=name)


def flow_runs(flow: str) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return list(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow]))))
