"""Helpers for tests of the REST API: a fake Runs backend, and TestClients that send an
allowed Host header (the API refuses Starlette's default "testserver")."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.runs import RunSummary, TriggerBusy, Triggered, TriggerView

BASE_URL = "http://localhost"


def client(app: FastAPI, **kwargs: Any) -> TestClient:
    """A TestClient whose requests say ``Host: localhost``."""
    kwargs.setdefault("base_url", BASE_URL)
    return TestClient(app, **kwargs)


class FakeRuns:
    """Records triggers; ``run`` is what latest() answers. exclusive() is a process-local
    lock with this machine's clock (the real one is a Prefect concurrency slot)."""

    def __init__(self) -> None:
        self.triggered: list[tuple[list[str], str]] = []
        self.run: RunSummary | None = None
        self.fail = False
        self.now: datetime | None = None  # the "server" clock; None: datetime.now
        self._lock = threading.Lock()

    def trigger(self, vm_ids: list[str], source: str, at: datetime | None = None) -> Triggered:
        if self.fail:
            raise ConnectionError("Prefect is down")
        self.triggered.append((vm_ids, source))
        return Triggered("run-1", at or datetime.now(UTC))

    def latest(self) -> RunSummary | None:
        return self.run

    @contextmanager
    def exclusive(self) -> Iterator[TriggerView]:
        if not self._lock.acquire(blocking=False):
            raise TriggerBusy
        try:
            yield TriggerView(self.now or datetime.now(UTC), self.run)
        finally:
            self._lock.release()
