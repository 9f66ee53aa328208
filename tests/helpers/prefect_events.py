"""Prefect's events worker is one per process, keyed by its client type only (not by the
API URL or credential it was made with: prefect/events/worker.py), and task runs reach
the server as events. A worker made while this process pointed at one server (the e2e
stack's, with its credential) keeps sending there after the fixture points elsewhere,
so a later server never learns of the task runs (seen: /status's per-VM detail missing
a failed list-vms task). Drain and stop it whenever a fixture switches servers: the next
event starts a worker for the server then in force."""

from __future__ import annotations

from prefect.events.worker import EventsWorker


def reset_events_worker() -> None:
    EventsWorker.drain_all(timeout=10)
