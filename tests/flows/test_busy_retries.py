"""tasks.busy_retries: a Prefect client call answered busy is tried again after
memdump's short delays, each try sent once (outside Prefect's retry loop), then once
with Prefect's retries."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient

import tasks.busy_retries
from memdump.runinfo import BUSY_RETRY_DELAYS
from tasks.busy_retries import busy_retried


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
