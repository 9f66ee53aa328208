"""A trigger's flow run is created with memdump's own short retries when the Prefect
server answers 503 (its SQLite "database is locked" while a fleet's runs write), 502 or
429: Prefect's client waited 2, 4, 8, 16 s between tries (one trigger of 40 sent back to
back took 34 s, 2026-11-30). Every try carries the same idempotency key, so a try the
server took but whose answer was lost is not a second run."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest

import api.runs
from api.runs import CREATE_RETRY_DELAYS, PrefectRuns


def _flow_run_json(body: dict[str, Any]) -> dict[str, Any]:
    from prefect.client.schemas.objects import FlowRun

    run = FlowRun(flow_id=uuid4(), parameters=body["parameters"], tags=body["tags"])
    out: dict[str, Any] = run.model_dump(mode="json")
    return out


class Prefect:
    """A Prefect API that answers ``codes`` in turn to create_flow_run, then 201."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/create_flow_run")
        body = json.loads(request.content)
        self.bodies.append(body)
        if len(self.bodies) <= len(self.codes):
            return httpx.Response(self.codes[len(self.bodies) - 1], json={"detail": "locked"})
        return httpx.Response(201, json=_flow_run_json(body))


class FallbackClient:
    """Prefect's own client, as the last resort: what it was asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def create_flow_run_from_deployment(self, deployment_id: Any, **kw: Any) -> Any:
        from prefect.client.schemas.objects import FlowRun

        self.calls.append(kw)
        return FlowRun(flow_id=uuid4(), parameters=kw["parameters"])


def _runs(
    monkeypatch: pytest.MonkeyPatch, prefect: Callable[[httpx.Request], httpx.Response]
) -> tuple[PrefectRuns, list[float], FallbackClient]:
    runs = PrefectRuns("capture-vms", "on-demand")
    runs._deployment_id = uuid4()  # noqa: SLF001 - looked up before; not this test's part
    fallback = FallbackClient()
    http = httpx.Client(base_url="http://prefect.test/api/", transport=httpx.MockTransport(prefect))
    monkeypatch.setattr(runs, "_client", lambda: fallback)
    monkeypatch.setattr(runs, "_http", lambda: http)
    slept: list[float] = []
    monkeypatch.setattr(api.runs, "_sleep", slept.append)
    return runs, slept, fallback


def test_a_locked_prefect_database_is_retried_in_milliseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefect = Prefect([503, 502, 429])
    runs, slept, fallback = _runs(monkeypatch, prefect)
    at = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    got = runs.trigger(["vm-web-01"], "api", at)
    assert slept == list(CREATE_RETRY_DELAYS[:3]) and sum(slept) < 0.5
    assert len(prefect.bodies) == 4 and not fallback.calls
    keys = {b["idempotency_key"] for b in prefect.bodies}
    assert len(keys) == 1 and None not in keys
    body = prefect.bodies[0]
    assert body["parameters"] == {"vm_ids": ["vm-web-01"], "source": "api"}
    assert body["tags"] == ["memdump", "source:api"]
    assert body["state"]["type"] == "SCHEDULED"
    assert datetime.fromisoformat(body["state"]["state_details"]["scheduled_time"]) == at
    assert got.triggered_at is not None


def test_after_the_retries_prefects_client_tries_with_the_same_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefect = Prefect([503] * (len(CREATE_RETRY_DELAYS) + 1))
    runs, slept, fallback = _runs(monkeypatch, prefect)
    runs.trigger(["vm-web-01"], "api")
    assert slept == list(CREATE_RETRY_DELAYS)
    assert len(prefect.bodies) == len(CREATE_RETRY_DELAYS) + 1
    (call,) = fallback.calls
    assert call["idempotency_key"] == prefect.bodies[0]["idempotency_key"]
    assert call["parameters"] == {"vm_ids": ["vm-web-01"], "source": "api"}


def test_a_refusal_is_not_retried_and_a_gone_deployment_is_looked_up_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs, slept, fallback = _runs(monkeypatch, Prefect([403]))
    runs.trigger(["vm-web-01"], "api")
    assert slept == [] and len(fallback.calls) == 1  # e.g. a CSRF-protected server
    runs, slept, fallback = _runs(monkeypatch, Prefect([404]))
    with pytest.raises(httpx.HTTPStatusError):
        runs._create(fallback, ["vm-web-01"], "api", None, None)  # noqa: SLF001
    assert slept == [] and not fallback.calls


def test_a_connection_error_goes_to_prefects_client_with_the_same_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefect's client retries a lost connection its own way: it gets the request."""
    sent: list[dict[str, Any]] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        raise httpx.ConnectError("connection refused", request=request)

    runs, _, fallback = _runs(monkeypatch, refuse)
    runs.trigger(["vm-web-01"], "api")
    (call,) = fallback.calls
    assert len(sent) == 1 and call["idempotency_key"] == sent[0]["idempotency_key"]


def test_the_rate_checks_read_is_retried_in_milliseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read of the last run goes the same way: a trigger behind one 503 of that read
    took 6.7 s through Prefect's client (2 then 4 s apart; benchmarks/api.py,
    2026-11-30 21:22, when the trigger lock's request took that path)."""
    from prefect.client.schemas.objects import FlowRun

    last = FlowRun(flow_id=uuid4(), parameters={"vm_ids": ["vm-web-01"]})
    codes = [503, 503]
    asked: list[dict[str, Any]] = []

    def prefect(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/flow_runs/filter")
        asked.append(json.loads(request.content))
        if len(asked) <= len(codes):
            return httpx.Response(codes[len(asked) - 1], json={"detail": "locked"})
        date = {"date": "Mon, 30 Nov 2026 06:00:07 GMT"}
        return httpx.Response(200, json=[last.model_dump(mode="json")], headers=date)

    runs, slept, fallback = _runs(monkeypatch, prefect)
    view = runs.view()
    assert slept == list(CREATE_RETRY_DELAYS[:2]) and len(asked) == 3
    assert view.now == datetime(2026, 11, 30, 6, 0, 7, tzinfo=UTC)
    assert view.last is not None and view.last.id == str(last.id)
    assert asked[0]["limit"] == 1 and asked[0]["sort"] == "EXPECTED_START_TIME_DESC"


def test_a_date_header_behind_by_its_resolution_is_no_skew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn's Date drops fractions and is refreshed once a second: on one machine it
    reads up to 2 s behind. Taken as skew, a run this machine made a moment ago would be
    "not due yet" to the next read (a flaky /status after a trigger, seen in
    tests/api/test_trigger_timestamp.py); a real skew (an hour) is still corrected."""
    from email.utils import format_datetime

    behind: list[timedelta] = [timedelta(seconds=1.9), timedelta(seconds=1.9)]
    asked: list[dict[str, Any]] = []

    def prefect(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content))
        date = format_datetime(datetime.now(UTC) - behind[len(asked) - 1], usegmt=True)
        return httpx.Response(200, json=[], headers={"date": date})

    runs, _, _ = _runs(monkeypatch, prefect)
    runs.view()
    sent = datetime.now(UTC)
    runs.view()
    due = datetime.fromisoformat(asked[1]["flow_runs"]["expected_start_time"]["before_"])
    assert due >= sent  # a run due at any moment up to this read counts

    behind[:] = [timedelta(hours=1), timedelta(hours=1)]
    asked.clear()
    runs.view()
    runs.view()
    due = datetime.fromisoformat(asked[1]["flow_runs"]["expected_start_time"]["before_"])
    assert abs(due - (datetime.now(UTC) - timedelta(hours=1))) < timedelta(seconds=5)
