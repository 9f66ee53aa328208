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
    them; once more at once after an error the loop would retry, then the loop) and
    its answer is what busy_retried sees. Installed once per process;
    every other request keeps Prefect's loop, after memdump's quick tries where
    :func:`retry_busy_everywhere` was called."""
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
        if getattr(_quick, "on", False):
            # A connection the server closed while idle (a capture waits at the gate for
            # seconds), a timeout: what Prefect's loop retries is sent again at once (on
            # a new connection), then left to that loop. Sent once only, it failed a
            # fleet's VM (CI, 2026-12-01: "Server disconnected without sending a response").
            retried = tuple(kwargs.get("retry_exceptions", ()))
            for _ in range(2):
                try:
                    return _once(self, request, send, send_args, send_kwargs)
                except retried:
                    continue
            return original(self, request, send, send_args, send_kwargs, *args, **kwargs)
        if _everywhere:
            for delay in BUSY_RETRY_DELAYS:
                try:
                    response = _once(self, request, send, send_args, send_kwargs)
                except Exception:  # noqa: BLE001 - Prefect's loop sends it again, its way
                    break
                again = _send_again(response)
                if again is None:
                    return response
                if not again:
                    break
                _sleep(delay)
        return original(self, request, send, send_args, send_kwargs, *args, **kwargs)

    send_with_retry.memdump_quick = True  # type: ignore[attr-defined]
    PrefectHttpxSyncClient._send_with_retry = send_with_retry  # type: ignore[method-assign]


def _install_async() -> None:
    """The same for Prefect's async client, which only retry_busy_everywhere changes:
    Prefect's engine checks a task run's tags against tag concurrency limits through
    it (one request per new set of tags), and a 503 there held a fleet's listing of
    one hypervisor 2 s, of another 2 + 4 s, before it started (2026-12-01)."""
    import anyio
    from prefect.client.base import PrefectHttpxAsyncClient

    original = PrefectHttpxAsyncClient._send_with_retry
    if getattr(original, "memdump_quick", False):
        return

    @functools.wraps(original)
    async def send_with_retry(
        self: Any,
        request: Any,
        send: Callable[..., Any],
        send_args: tuple[Any, ...],
        send_kwargs: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if _everywhere:
            for delay in BUSY_RETRY_DELAYS:
                try:
                    if self.enable_csrf_support and request.method.lower() in _CHANGES:
                        await self._add_csrf_headers(request=request)
                    response = await send(request, *send_args, **send_kwargs)
                except Exception:  # noqa: BLE001 - Prefect's loop sends it again, its way
                    break
                again = _send_again(response)
                if again is None:
                    return response
                if not again:
                    break
                await anyio.sleep(delay)
        return await original(self, request, send, send_args, send_kwargs, *args, **kwargs)

    send_with_retry.memdump_quick = True  # type: ignore[attr-defined]
    PrefectHttpxAsyncClient._send_with_retry = send_with_retry  # type: ignore[method-assign]


def _send_again(response: Any) -> bool | None:
    """What a retry_busy_everywhere request does with an answer: None, it is the answer;
    True, busy: sent again after memdump's next delay; False, busy with a wait the
    server asks for (Retry-After), which Prefect's loop honours."""
    if response.status_code not in BUSY_STATUS:
        return None
    return "Retry-After" not in response.headers


def _once(
    client: Any,
    request: Any,
    send: Callable[..., Any],
    send_args: tuple[Any, ...],
    send_kwargs: dict[str, Any],
) -> Any:
    """The request sent once, with the CSRF headers Prefect's loop would add."""
    if client.enable_csrf_support and request.method.lower() in _CHANGES:
        client._add_csrf_headers(request=request)
    return send(request, *send_args, **send_kwargs)


_CHANGES = frozenset({"post", "put", "patch", "delete"})  # what Prefect's loop adds CSRF to
_install_lock = threading.Lock()
_installed = False
_everywhere = False  # every Prefect request of the process: see retry_busy_everywhere


def _install() -> None:
    global _installed
    if not _installed:
        with _install_lock:
            _install_quick_send()
            _install_async()
            _installed = True


def retry_busy_everywhere() -> None:
    """Every Prefect client request of this process, sync or async (Prefect's engine's
    own included: a task run's creation, its states, its tags' limit check) that is
    answered busy without a Retry-After is sent again after BUSY_RETRY_DELAYS, before
    Prefect's retry loop takes over with its 2 s, 4 s. A capture flow run calls it: a
    fleet's queued captures each create their task run as a thread takes them, and
    one stall of the embedded server's SQLite held every new one for Prefect's 2 + 4 s
    (2026-12-01: 6.5 s with no capture started, 100 VMs). Prefect's own loop sends the
    same request again too: sending it sooner changes only the wait."""
    global _everywhere
    _install()
    _everywhere = True


@contextmanager
def quick() -> Iterator[None]:
    """This thread's Prefect client requests in the block are sent once: a busy answer
    comes back at once, without Prefect's retry loop or its 2 s sleep."""
    _install()
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
