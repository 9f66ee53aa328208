"""/verify under load: a bound on verifications running at once in this API process
(each reads and inflates a whole dump), and background jobs for the long ones, which the
client polls (``GET /verify/{job_id}``) instead of holding a request open for minutes.

Jobs live in the memory of the API process that accepted them: with several replicas
behind a balancer, poll the same one (sticky sessions) or verify with ``"wait": true``.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

JobState = Literal["running", "done", "error"]


class VerifyBusy(Exception):
    """Every verification slot of this process is taken."""


@dataclass
class VerifyJob:
    id: str
    dump_path: str
    started_at: datetime
    state: JobState = "running"
    result: dict[str, Any] | None = None
    detail: str | None = None
    finished_at: datetime | None = None


class VerifyJobs:
    def __init__(self, max_concurrent: int, kept: int) -> None:
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._kept = kept
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, VerifyJob] = OrderedDict()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One verification slot for the caller's own thread, or VerifyBusy at once
        (never a queue: a waiting request would hold its connection and a thread)."""
        if not self._slots.acquire(blocking=False):
            raise VerifyBusy
        try:
            yield
        finally:
            self._slots.release()

    def start(
        self,
        dump_path: str,
        work: Callable[[], dict[str, Any]],
        describe: Callable[[Exception], str],
    ) -> VerifyJob:
        """Run ``work`` in a background thread holding a slot (VerifyBusy if none is free);
        its result, or ``describe(exception)``, is kept for polling."""
        if not self._slots.acquire(blocking=False):
            raise VerifyBusy
        job = VerifyJob(secrets.token_hex(16), dump_path, datetime.now(UTC))
        with self._lock:
            self._jobs[job.id] = job
            self._prune()

        def run() -> None:
            try:
                result = work()
            except Exception as exc:
                with self._lock:
                    job.state, job.detail = "error", describe(exc)
            else:
                with self._lock:
                    job.state, job.result = "done", result
            finally:
                with self._lock:
                    job.finished_at = datetime.now(UTC)
                self._slots.release()

        threading.Thread(target=run, name=f"verify-{job.id[:8]}", daemon=True).start()
        return job

    def get(self, job_id: str) -> VerifyJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else VerifyJob(**vars(job))  # a consistent copy

    def _prune(self) -> None:
        # Running jobs are never dropped (at most max_concurrent of them); the oldest
        # finished ones go first.
        finished = [k for k, j in self._jobs.items() if j.state != "running"]
        for k in finished[: max(0, len(self._jobs) - self._kept)]:
            del self._jobs[k]
