"""tasks.busy_retries: a Prefect client call answered busy is tried again after
memdump's short delays with the client's own retries off, then once with them on."""

from __future__ import annotations

import httpx
import pytest
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

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
        seen.append(PREFECT_CLIENT_MAX_RETRIES.value())
        if len(seen) <= 3:
            raise _error([503, 502, 429][len(seen) - 1])
        return "made"

    assert busy_retried(call) == "made"
    assert slept == list(BUSY_RETRY_DELAYS[:3]) and seen == [0, 0, 0, 0]


def test_after_the_quick_tries_prefects_client_retries_its_way(slept: list[float]) -> None:
    seen: list[int] = []

    def call() -> str:
        seen.append(PREFECT_CLIENT_MAX_RETRIES.value())
        if len(seen) <= len(BUSY_RETRY_DELAYS):
            raise _error(503)
        return "made"

    assert busy_retried(call) == "made"
    assert slept == list(BUSY_RETRY_DELAYS)
    assert seen[:-1] == [0] * len(BUSY_RETRY_DELAYS) and seen[-1] > 0


@pytest.mark.parametrize("code", [400, 404, 409, 423])
def test_other_answers_are_raised_at_once(slept: list[float], code: int) -> None:
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        raise _error(code)

    with pytest.raises(httpx.HTTPStatusError):
        busy_retried(call)
    assert calls == [1] and slept == []
