"""Prefect client calls on a capture's way to its first byte, and the return of its slot
at its end, tried again quickly when the Prefect server is busy.

The embedded server's SQLite answers 503 ("database is locked") while a run's other
writes go in, for milliseconds; Prefect's own client then waits 2 s, 4 s, ... before
its next try. On 2026-11-30 half the triggers of one lab VM paid that 2 s once between
the flow's start and the dump's first byte (the capture's slot, its progress artifact).
Here such a call is sent once, outside Prefect's retry loop (:func:`quick`), and tried
again after BUSY_RETRY_DELAYS (memdump.runinfo, as the API's own requests), then once
more with Prefect's retries on.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from memdump.runinfo import BUSY_RETRY_DELAYS, BUSY_STATUS

T = TypeVar("T")

_sleep = time.sleep  # the waits between tries (tests replace it)

_quick = threading.local()  # .on: this thread's Prefect requests are sent once


def _install_quick_send() -> None:
    """Prefect's sync client sends each request through a retry loop that, after a busy
    answer, sleeps 2 s (jittered) before it looks at its retry count: with its retries
    set to 0 it still slept 2 s and then returned the 503. A capture's slot request
    paid that on every "database is locked" (measured 2026-12-01: 13-18 of 100 fleet
    captures held their place 1.8-2.4 s longer). In a ``quick`` block the loop is left
    out: the request is sent once (with the client's CSRF headers, as the loop adds
    them) and its answer is what busy_retried sees. Installed once per process;
    every other request keeps Prefect's loop."""
    from prefect.client.base import PrefectHttpxSyncClient

    original = PrefectHttpxSyncClient._send_with_retry
    if getattr(original, "memdump_quick", False):
        return

    @functools.wraps(original)
    def send_with_retry(
        self: Any,
        request: Any,
        send: Callable[..., Any],
        send_args: tuple[Any, ...],
        send_kwargs: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if not getattr(_quick, "on", False):
            return original(self, request, send, send_args, send_kwargs, *args, **kwargs)
        if self.enable_csrf_support and request.method.lower() in _CHANGES:
            self._add_csrf_headers(request=request)
        return send(request, *send_args, **send_kwargs)

    send_with_retry.memdump_quick = True  # type: ignore[attr-defined]
    PrefectHttpxSyncClient._send_with_retry = send_with_retry  # type: ignore[method-assign]


_CHANGES = frozenset({"post", "put", "patch", "delete"})  # what Prefect's loop adds CSRF to
_install_lock = threading.Lock()
_installed = False


@contextmanager
def quick() -> Iterator[None]:
    """This thread's Prefect client requests in the block are sent once: a busy answer
    comes back at once, without Prefect's retry loop or its 2 s sleep."""
    global _installed
    if not _installed:
        with _install_lock:
            _install_quick_send()
            _installed = True
    was = getattr(_quick, "on", False)
    _quick.on = True
    try:
        yield
    finally:
        _quick.on = was


def busy_retried(call: Callable[[], T]) -> T:
    """``call()``, a Prefect client request, tried again after each of BUSY_RETRY_DELAYS
    while the server answers busy (BUSY_STATUS); any other error is raised at once."""
    import httpx

    for delay in BUSY_RETRY_DELAYS:
        try:
            with quick():
                return call()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in BUSY_STATUS:
                raise
        _sleep(delay)
    return call()
