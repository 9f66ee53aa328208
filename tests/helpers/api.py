"""Helpers for tests of the REST API: a fake Runs backend, and TestClients that send an
allowed Host header (the API refuses Starlette's default "testserver")."""

from __future__ import annotations

import threading
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
    """Records triggers; ``run`` is what latest() and view() answer, with this machine's
    clock unless ``now`` is set. Like Prefect with api.runs.AFTER_KEY, it makes one run
    per view: a second trigger decided on the same view is TriggerBusy."""

    def __init__(self) -> None:
        self.triggered: list[tuple[list[str], str]] = []
        self.run: RunSummary | None = None
        self.fail = False
        self.now: datetime | None = None  # the "server" clock; None: datetime.now
        self._lock = threading.Lock()
        self._claimed: set[str | None] = set()

    def trigger(
        self,
        vm_ids: list[str],
        source: str,
        at: datetime | None = None,
        after: TriggerView | None = None,
    ) -> Triggered:
        if self.fail:
            raise ConnectionError("Prefect is down")
        with self._lock:
            if after is not None:
                key = None if after.last is None else after.last.id
                if key in self._claimed:
                    raise TriggerBusy
                self._claimed.add(key)
            self.triggered.append((vm_ids, source))
        return Triggered("run-1", at or datetime.now(UTC))

    def latest(self) -> RunSummary | None:
        return self.run

    def view(self) -> TriggerView:
        return TriggerView(self.now or datetime.now(UTC), self.run)
