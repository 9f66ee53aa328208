"""tasks.busy_retries: a Prefect client call answered busy is tried again after
memdump's short delays, each try sent once (outside Prefect's retry loop), then once
with Prefect's retries."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient

import tasks.busy_retries
from memdump.runinfo import BUSY_RETRY_DELAYS
from tasks.busy_retries import busy_retried, retry_busy_everywhere


def _error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://prefect.test/api/artifacts/")
    response = httpx.Response(code, request=request, json={"detail": "x"})
    return httpx.HTTPStatusError(str(code), request=request, response=response)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    out: list[float] = []
    monkeypatch.setattr(tasks.busy_retries, "_sleep", out.append)
    return out


def test_busy_answers_are_asked_again_quickly(slept: list[float]) -> None:
    seen: list[int] = []

    def call() -> str:
        seen.append(tasks.busy_retries._quick.on)
        if len(seen) <= 3:
            raise _error([503, 502, 429][len(seen) - 1])
        return "made"

    assert busy_retried(call) == "made"
    assert slept == list(BUSY_RETRY_DELAYS[:3]) and seen == [True] * 4


def test_after_the_quick_tries_prefects_client_retries_its_way(slept: list[float]) -> None:
    seen: list[int] = []

    def call() -> str:
        seen.append(getattr(tasks.busy_retries._quick, "on", False))
        if len(seen) <= len(BUSY_RETRY_DELAYS):
            raise _error(503)
        return "made"

    assert busy_retried(call) == "made"
    assert slept == list(BUSY_RETRY_DELAYS)
    assert seen == [True] * len(BUSY_RETRY_DELAYS) + [False]


@pytest.mark.parametrize("code", [400, 404, 409, 423])
def test_other_answers_are_raised_at_once(slept: list[float], code: int) -> None:
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        raise _error(code)

    with pytest.raises(httpx.HTTPStatusError):
        busy_retried(call)
    assert calls == [1] and slept == []


def test_a_busy_answer_is_not_slept_on_by_prefects_client(
    slept: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's own HTTP retry loop, with its retries at 0, still slept 2 s after a 503
    before returning it (2026-12-01: a fleet capture's slot request took 1.8-2.4 s on
    each "database is locked"). Here the 503s come from the HTTP layer under Prefect's
    real client: only memdump's delays are slept."""
    lease = str(uuid4())
    answers = [503, 503, 200]
    sent: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):  # the client's CSRF support
            expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            token = {"token": "t0k", "client": request.url.params["client"], "expiration": expires}
            return httpx.Response(200, json=token)
        sent.append(request.url.path)
        assert request.headers["Prefect-Csrf-Token"] == "t0k"  # as Prefect's loop adds it
        code = answers.pop(0)
        if code != 200:
            return httpx.Response(code, json={"detail": "database is locked"})
        return httpx.Response(200, json={"lease_id": lease, "limits": []})

    prefect_slept: list[float] = []
    monkeypatch.setattr(time, "sleep", prefect_slept.append)
    monkeypatch.setattr(tasks.busy_retries, "_everywhere", False)  # a flow run's process only
    client = SyncPrefectClient(
        "http://prefect.test/api", httpx_settings={"transport": httpx.MockTransport(server)}
    )
    with client:
        answer = busy_retried(
            lambda: client.increment_concurrency_slots_with_lease(
                names=["memdump-captures"], slots=1, mode="concurrency", lease_duration=60
            )
        )
        assert answer.json()["lease_id"] == lease
        # Outside busy_retried, the same client keeps Prefect's retry loop.
        answers.extend([503, 200])
        client.increment_concurrency_slots_with_lease(
            names=["memdump-captures"], slots=1, mode="concurrency", lease_duration=60
        )
    assert slept == list(BUSY_RETRY_DELAYS[:2])
    assert len(prefect_slept) == 1 and prefect_slept[0] > 0.5
    assert sent == ["/api/v2/concurrency_limits/increment-with-lease"] * 5


def _busy_then(answers: list[tuple[int, dict[str, str]]], sent: list[str]) -> Any:
    """A Prefect API that answers the given (status, headers) in turn, then 200."""

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):
            expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            token = {"token": "t0k", "client": request.url.params["client"], "expiration": expires}
            return httpx.Response(200, json=token)
        sent.append(request.url.path)
        code, headers = answers.pop(0) if answers else (200, {})
        if code != 200:
            return httpx.Response(code, headers=headers, json={"detail": "database is locked"})
        return httpx.Response(201, json={"id": str(uuid4())})

    return httpx.MockTransport(server)


@pytest.mark.parametrize(
    ("answers", "quick", "prefects", "requests"),
    [
        ([(503, {}), (503, {})], [0.05, 0.1], [], 3),
        # A wait the server asks for is Prefect's loop's to honour.
        ([(503, {"Retry-After": "3"})] * 2, [], [3.0], 3),
        # Past memdump's delays, Prefect's loop as before.
        ([(503, {})] * 6, list(BUSY_RETRY_DELAYS), [2.0], 7),
    ],
    ids=["busy-twice", "retry-after", "still-busy"],
)
def test_in_a_flow_runs_process_every_busy_answer_is_retried_quickly(
    slept: list[float],
    monkeypatch: pytest.MonkeyPatch,
    answers: list[tuple[int, dict[str, str]]],
    quick: list[float],
    prefects: list[float],
    requests: int,
) -> None:
    """retry_busy_everywhere (a capture flow run's first call): any Prefect request of the
    process, Prefect's engine's own (here: a task run's creation) included."""
    prefect_slept: list[float] = []
    monkeypatch.setattr(time, "sleep", prefect_slept.append)
    monkeypatch.setattr(tasks.busy_retries, "_everywhere", False)
    sent: list[str] = []
    client = SyncPrefectClient(
        "http://prefect.test/api", httpx_settings={"transport": _busy_then(answers, sent)}
    )
    retry_busy_everywhere()
    with client:
        client.request("POST", "/task_runs/", json={})
    assert slept == quick
    # Prefect's own waits (jittered up from the Retry-After, or around its 2 s).
    assert len(prefect_slept) == len(prefects)
    assert all(p * 0.7 <= got <= p * 1.5 for p, got in zip(prefects, prefect_slept, strict=True))
    assert sent == ["/api/task_runs/"] * requests


def test_prefects_async_client_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's engine checks a task run's tags against tag concurrency limits with its
    async client: a 503 there held a fleet's listing 2 s, then 2 + 4 s (2026-12-01)."""
    import anyio
    from prefect.client.orchestration import PrefectClient

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(anyio, "sleep", sleep)  # memdump's waits and Prefect's loop's
    monkeypatch.setattr(tasks.busy_retries, "_everywhere", False)
    sent: list[str] = []
    transport = _busy_then([(503, {}), (503, {})], sent)

    async def create() -> None:
        client = PrefectClient("http://prefect.test/api", httpx_settings={"transport": transport})
        async with client:
            await client.request("POST", "/task_runs/", json={})

    retry_busy_everywhere()
    asyncio.run(create())
    assert waits == list(BUSY_RETRY_DELAYS[:2])
    assert sent == ["/api/task_runs/"] * 3


def test_a_connection_the_server_closed_is_sent_again_as_prefect_would(
    slept: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent once outside Prefect's loop, a request on a keep-alive connection the server
    had closed failed its capture ("Server disconnected without sending a response", CI
    2026-12-01): the errors Prefect's loop retries are left to it."""
    prefect_slept: list[float] = []
    monkeypatch.setattr(time, "sleep", prefect_slept.append)
    sent: list[str] = []
    inner = _busy_then([], sent)
    failures = [httpx.RemoteProtocolError("Server disconnected without sending a response.")]

    def server(request: httpx.Request) -> httpx.Response:
        if failures and not request.url.path.endswith("/csrf-token"):
            raise failures.pop()
        return inner.handle_request(request)

    client = SyncPrefectClient(
        "http://prefect.test/api", httpx_settings={"transport": httpx.MockTransport(server)}
    )
    with client:
        answer = busy_retried(lambda: client.request("POST", "/task_runs/", json={}))
    assert answer.status_code == 201 and not failures
    assert slept == [] and sent == ["/api/task_runs/"]
    assert prefect_slept == []  # sent again at once, not after Prefect's 2 s
