"""One Prefect test harness (a real, temporary Prefect server) for every flow test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.testing.utilities import prefect_test_harness

from tests.helpers.prefect_events import reset_events_worker


@pytest.fixture(scope="session", autouse=True)
def harness() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    # Telemetry off: its heartbeat races the harness's fresh SQLite ("database is locked").
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DO_NOT_TRACK", "1")
    with prefect_test_harness(server_startup_timeout=120):
        reset_events_worker()  # events go to this harness, not to a server of before
        yield
    mp.undo()
