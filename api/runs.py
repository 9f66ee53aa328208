"""Starting capture runs and reading the last one, from Prefect (never process memory:
the status survives an API restart and every API replica sees the same)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun


@dataclass(frozen=True)
class RunSummary:
    id: str
    state_type: str
    state_name: str
    vm_ids: list[str]
    triggered_at: datetime
    duration: float | None
    message: str | None


class Runs(Protocol):
    def trigger(self, vm_ids: list[str], source: str) -> str:
        """Create a flow run (returns at once) and return its id."""
        ...

    def latest(self) -> RunSummary | None:
        """The newest capture run that is due (not a future scheduled one)."""
        ...


class PrefectRuns:
    def __init__(self, flow_name: str, deployment: str) -> None:
        self.flow_name = flow_name
        self.deployment = deployment

    def trigger(self, vm_ids: list[str], source: str) -> str:
        from prefect.deployments import run_deployment

        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync call: not a coroutine
            name=f"{self.flow_name}/{self.deployment}",
            parameters={"vm_ids": vm_ids, "source": source},
            timeout=0,  # return once the run exists; the runner picks it up
            tags=["memdump", f"source:{source}"],
        )
        return str(run.id)

    def latest(self) -> RunSummary | None:
        from prefect import get_client
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterExpectedStartTime,
        )
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[self.flow_name])),
                # The scheduler creates next week's run ahead of time; it is not "the last".
                flow_run_filter=FlowRunFilter(
                    expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC))  # type: ignore[arg-type]
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            )
        if not runs:
            return None
        run = runs[0]
        state = run.state
        duration = None
        if state is not None and state.is_final() and run.start_time and run.end_time:
            duration = round((run.end_time - run.start_time).total_seconds(), 3)
        vm_ids = run.parameters.get("vm_ids") or []
        return RunSummary(
            id=str(run.id),
            state_type=state.type.value if state else "SCHEDULED",
            state_name=(state.name or "") if state else "Scheduled",
            vm_ids=[str(v) for v in vm_ids],
            triggered_at=_stdlib(run.expected_start_time or run.created),
            duration=duration,
            message=state.message if state else None,
        )


def _stdlib(ts: datetime | None) -> datetime:
    """Prefect hands out pendulum datetimes; keep plain ones past this boundary."""
    if ts is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(ts.timestamp(), UTC)


class LatestRunCache:
    """/status under load: one Prefect query per ``ttl`` seconds, shared by every request
    of this API process (the others wait for that one answer instead of each asking).
    A trigger through this process drops the cached answer, so its own run shows at
    once; another replica may show the previous run for at most ``ttl`` seconds."""

    def __init__(self, runs: Runs, ttl: float) -> None:
        self._runs = runs
        self._ttl = ttl
        self._lock = threading.Lock()
        self._value: RunSummary | None = None
        self._at = -math.inf

    def get(self) -> RunSummary | None:
        with self._lock:
            if time.monotonic() - self._at >= self._ttl:
                self._value = self._runs.latest()
                self._at = time.monotonic()
            return self._value

    def invalidate(self) -> None:
        with self._lock:
            self._at = -math.inf
