"""/status's cache (issue 17): a slow read of Prefect holds no request up while a recent
enough answer is at hand (stale-while-revalidate); the first request, one after a
trigger, one after a failed read and one past the staleness bound wait for a fresh
read. Fakes only: a Runs whose reads block until the test lets them go, and the cache's
clock in the test's hands (nothing here is timed)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.runs import LatestRunCache, RunSummary
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns, client

BASE = "/api/memory-dumps"
HOLD_SEC = 30  # how long a held read waits at most, so a broken cache fails, not hangs


def _run(name: str, state: str = "RUNNING") -> RunSummary:
    return RunSummary(name, state, state.title(), ["101"], datetime.now(UTC), None, None)


class HeldRuns(FakeRuns):
    """latest() answers ``run``; while ``held`` a read waits until ``go`` is set (and
    answers what ``run`` is then). Counts reads; ``fail`` makes a read raise."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.held = False
        self.started = threading.Event()  # a held read is waiting
        self.go = threading.Event()
        self.timed_out = False

    def latest(self) -> RunSummary | None:
        self.reads += 1
        if self.held:
            self.started.set()
            if not self.go.wait(HOLD_SEC):
                self.timed_out = True
        if self.fail:
            raise ConnectionError("Prefect is down")
        return self.run


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _app(tmp_path: Path, runs: HeldRuns, cache: LatestRunCache) -> TestClient:
    settings = Settings(data_dir=tmp_path, api={"trigger_min_interval_sec": 0})
    app = create_app(settings, store=SQLiteRecordStore(tmp_path / "r.db"), runs=runs)
    app.state.latest_run = cache
    return client(app)


def test_a_slow_read_holds_no_request_up(tmp_path: Path) -> None:
    runs, clock = HeldRuns(), Clock()
    cache = LatestRunCache(runs, ttl=1, stale=5, clock=clock)
    c = _app(tmp_path, runs, cache)
    runs.run = _run("a")
    assert c.get(f"{BASE}/status").json()["status"] == "in_progress"
    assert runs.reads == 1

    # Past the ttl, Prefect slow: every request is answered from the last answer while
    # one read (not one per request) runs in the background.
    clock.now = 2
    runs.held, runs.run = True, _run("a", "COMPLETED")
    answers = [c.get(f"{BASE}/status").json()["status"] for _ in range(5)]
    assert runs.started.wait(HOLD_SEC)
    assert answers == ["in_progress"] * 5
    assert runs.reads == 2
    runs.go.set()
    # Once the answer the held read began with is too old too (ttl + stale), a request
    # waits for the newer one instead of being answered from the old.
    clock.now = 6.5
    assert c.get(f"{BASE}/status").json()["status"] == "completed"
    assert not runs.timed_out


def test_a_trigger_is_seen_at_once_even_while_an_older_read_runs(tmp_path: Path) -> None:
    runs, clock = HeldRuns(), Clock()
    cache = LatestRunCache(runs, ttl=1, stale=5, clock=clock)
    c = _app(tmp_path, runs, cache)
    assert c.get(f"{BASE}/status").json()["status"] == "idle"
    clock.now = 2
    runs.held = True
    assert c.get(f"{BASE}/status").json()["status"] == "idle"
    assert runs.started.wait(HOLD_SEC)  # a read begun before the trigger, still out

    runs.held = False
    runs.run = _run("triggered")
    assert c.post(f"{BASE}/trigger", json={"vm_ids": ["101"]}).status_code == 200
    # Not the answer before the trigger, nor the read begun before it: a read of its own.
    assert c.get(f"{BASE}/status").json()["status"] == "in_progress"
    assert runs.reads == 3
    runs.run = None
    runs.go.set()  # the older read ends (it saw no run): it replaces nothing newer
    assert c.get(f"{BASE}/status").json()["status"] == "in_progress"
    assert not runs.timed_out


def test_a_failed_read_is_not_hidden_behind_the_last_answer(tmp_path: Path) -> None:
    runs, clock = HeldRuns(), Clock()
    later: list[Callable[[], None]] = []  # the background reads, run when the test says
    cache = LatestRunCache(runs, ttl=1, stale=5, clock=clock, spawn=later.append)
    c = _app(tmp_path, runs, cache)
    runs.run = _run("a")
    assert c.get(f"{BASE}/status").status_code == 200
    clock.now = 2
    runs.fail = True
    assert c.get(f"{BASE}/status").json()["status"] == "in_progress"
    (read,) = later
    read()  # fails
    r = c.get(f"{BASE}/status")
    assert r.status_code == 500 and r.json() == {"detail": "Error fetching status: Prefect is down"}
    runs.fail = False
    assert c.get(f"{BASE}/status").json()["status"] == "in_progress"
    assert runs.reads == 4


def test_concurrent_first_requests_share_one_read() -> None:
    runs = HeldRuns()
    cache = LatestRunCache(runs, ttl=1, stale=5, clock=Clock())
    runs.held, runs.run = True, _run("a")
    got: list[RunSummary | None] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get())) for _ in range(10)]
    threads[0].start()
    assert runs.started.wait(HOLD_SEC)  # the first request's read is out: the others join it
    for t in threads[1:]:
        t.start()
    runs.go.set()
    for t in threads:
        t.join(HOLD_SEC)
    assert got == [runs.run] * 10 and runs.reads == 1


def test_a_background_read_that_cannot_start_leaves_nothing_to_wait_for() -> None:
    runs, clock = HeldRuns(), Clock()
    refuse = [True]

    def spawn(work: Callable[[], None]) -> None:
        if refuse[0]:
            raise RuntimeError("can't start new thread")
        work()

    cache = LatestRunCache(runs, ttl=1, stale=5, clock=clock, spawn=spawn)
    runs.run = _run("a")
    assert cache.get() == runs.run
    clock.now = 2
    with pytest.raises(RuntimeError):
        cache.get()
    refuse[0] = False
    clock.now = 10  # past ttl + stale: waits for a read, which must not be the one refused
    runs.run = _run("b")
    got: list[RunSummary | None] = []
    waits = threading.Thread(target=lambda: got.append(cache.get()), daemon=True)
    waits.start()
    waits.join(HOLD_SEC)
    assert got == [runs.run] and runs.reads == 2


def test_a_run_started_elsewhere_shows_within_a_second_past_the_ttl() -> None:
    # The scheduler's run, or another replica's trigger, is not an invalidation here: the
    # default staleness bound is what keeps /status from showing the previous run for
    # long (it was 5 s past the ttl: an e2e test saw the previous run's "completed").
    runs, clock = HeldRuns(), Clock()
    cache = LatestRunCache(runs, ttl=0.5, clock=clock)
    runs.run = _run("previous", "COMPLETED")
    assert cache.get() is runs.run and runs.reads == 1
    runs.run = _run("scheduled")  # started elsewhere
    clock.now = 1.6  # past ttl + 1 s: the old answer is not served, the new run is read
    got = cache.get()
    assert got is not None and got.id == "scheduled" and runs.reads == 2
