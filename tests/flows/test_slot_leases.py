"""tasks.limits.SlotLeases on the harness's real Prefect server: a slot of each limit for
the block, all or none, given back at the end, renewed while held, refused ones waited
for."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

import tasks.busy_retries
import tasks.limits
from memdump.errors import ConfigError
from memdump.runinfo import BUSY_RETRY_DELAYS
from tasks.limits import SlotLeases


@pytest.fixture
def limits() -> Iterator[dict[str, str]]:
    """Two fresh limits: "all" of 2 slots, "hv" of 1."""
    tag = uuid.uuid4().hex[:8]
    names = {"all": f"test-all-{tag}", "hv": f"test-hv-{tag}"}
    with get_client(sync_client=True) as c:
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=names["all"], limit=2))
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=names["hv"], limit=1))
    yield names
    with get_client(sync_client=True) as c:
        for name in names.values():
            c.delete_global_concurrency_limit_by_name(name)


def _active(name: str) -> int:
    with get_client(sync_client=True) as c:
        return c.read_global_concurrency_limit_by_name(name).active_slots


def test_a_slot_of_each_limit_is_held_for_the_block_and_given_back(
    limits: dict[str, str],
) -> None:
    slots = SlotLeases()
    with slots.hold([limits["all"], limits["hv"]], lease_sec=60):
        assert (_active(limits["all"]), _active(limits["hv"])) == (1, 1)
        assert slots.held() == 1
    assert (_active(limits["all"]), _active(limits["hv"])) == (0, 0)
    assert slots.held() == 0


def test_given_back_when_the_block_raises(limits: dict[str, str]) -> None:
    slots = SlotLeases()
    with pytest.raises(RuntimeError), slots.hold([limits["hv"]], lease_sec=60):
        raise RuntimeError("capture failed")
    assert _active(limits["hv"]) == 0 and slots.held() == 0


def test_a_refused_slot_is_waited_for_and_the_cap_holds(
    limits: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server answers 423 with a Retry-After of about avg occupancy: keep it short.
    monkeypatch.setattr(tasks.limits, "_MAX_RETRY_AFTER_SEC", 0.2)
    slots = SlotLeases()
    inside, most, lock = [0], [0], threading.Lock()
    refused = []
    real = SyncPrefectClient.increment_concurrency_slots_with_lease

    def counting(self: Any, *a: Any, **kw: Any) -> Any:
        try:
            return real(self, *a, **kw)
        except Exception as exc:
            refused.append(getattr(getattr(exc, "response", None), "status_code", None))
            raise

    monkeypatch.setattr(SyncPrefectClient, "increment_concurrency_slots_with_lease", counting)

    def capture() -> None:
        with slots.hold([limits["all"], limits["hv"]], lease_sec=60):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(1.0)  # the others' requests reach the server meanwhile
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=capture) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert most[0] == 1  # "hv" has one slot: one capture at a time
    # The others were refused (423), then let in; a busy server's 503 (SQLite locked by
    # the other requests) is seen here too now, asked again by SlotLeases, not Prefect.
    assert 423 in refused and set(refused) <= {423, 503}
    assert (_active(limits["all"]), _active(limits["hv"])) == (0, 0)


def test_a_missing_limit_is_a_config_error_and_holds_nothing(limits: dict[str, str]) -> None:
    slots = SlotLeases()
    with (
        pytest.raises(ConfigError, match="do not exist") as ei,
        slots.hold([limits["all"], "no-such-limit-" + uuid.uuid4().hex], lease_sec=60),
    ):
        pytest.fail("held without its limit")
    assert ei.value.fields["limits"][0].startswith("no-such-limit-")
    assert _active(limits["all"]) == 0 and slots.held() == 0


def test_held_leases_are_renewed_and_given_back_ones_are_not(
    limits: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks.limits, "_RENEW_AFTER", 0.002)  # 60 s lease: every 0.12 s
    renewed: list[uuid.UUID] = []
    real = SyncPrefectClient.renew_concurrency_lease

    def counting(self: Any, lease_id: uuid.UUID, lease_duration: float) -> Any:
        out = real(self, lease_id, lease_duration)  # raises if the server has no such lease
        renewed.append(lease_id)
        return out

    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", counting)
    slots = SlotLeases()
    with slots.hold([limits["hv"]], lease_sec=60) as lease:
        deadline = time.monotonic() + 20
        while renewed.count(lease) < 2:
            assert time.monotonic() < deadline, "the held lease was not renewed"
            time.sleep(0.05)
    time.sleep(0.5)
    n = len(renewed)
    time.sleep(0.5)
    assert len(renewed) == n  # nothing held, nothing renewed
    assert _active(limits["hv"]) == 0


@pytest.mark.parametrize(
    "method",
    ["increment_concurrency_slots_with_lease", "release_concurrency_slots_with_lease"],
    ids=["taken", "given-back"],
)
def test_a_busy_server_is_asked_again_in_milliseconds(
    limits: dict[str, str], monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The server's SQLite answering "database is locked" (503, twice here) costs the
    slot milliseconds, not Prefect's client's 2 s and more: SlotLeases tries again
    itself, each request sent once, outside Prefect's retry loop; when the slot is
    taken, and when it is given back (another VM waits for it: free right after the
    block). (tests/flows/test_busy_retries.py has the 503s come from the HTTP layer.)"""
    import httpx

    real = getattr(SyncPrefectClient, method)
    client_retries: list[bool] = []

    def busy_twice(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> Any:
        client_retries.append(getattr(tasks.busy_retries._quick, "on", False))
        if len(client_retries) <= 2:
            request = httpx.Request("POST", "http://prefect.test/api/v2/concurrency_limits")
            response = httpx.Response(503, request=request, json={"detail": "locked"})
            raise httpx.HTTPStatusError("503", request=request, response=response)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SyncPrefectClient, method, busy_twice)
    slept: list[float] = []
    monkeypatch.setattr(tasks.busy_retries, "_sleep", slept.append)
    with SlotLeases().hold([limits["all"], limits["hv"]], lease_sec=60):
        assert (_active(limits["all"]), _active(limits["hv"])) == (1, 1)
    assert (_active(limits["all"]), _active(limits["hv"])) == (0, 0)
    assert slept == list(BUSY_RETRY_DELAYS[:2])
    assert client_retries == [True] * 3  # Prefect's client left the retrying to memdump
    assert not getattr(tasks.busy_retries._quick, "on", False)  # only inside those requests
