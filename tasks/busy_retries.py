"""Prefect client calls on a capture's way to its first byte, and the return of its slot
at its end, tried again quickly when the Prefect server is busy.

The embedded server's SQLite answers 503 ("database is locked") while a run's other
writes go in, for milliseconds; Prefect's own client then waits 2 s, 4 s, ... before
its next try. On 2026-11-30 half the triggers of one lab VM paid that 2 s once between
the flow's start and the dump's first byte (the capture's slot, its progress artifact).
Here such a call is sent with the client's retries off and tried again after
BUSY_RETRY_DELAYS (memdump.runinfo, as the API's own requests), then once more with
Prefect's retries on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from memdump.runinfo import BUSY_RETRY_DELAYS, BUSY_STATUS

T = TypeVar("T")

_sleep = time.sleep  # the waits between tries (tests replace it)

# Prefect's settings with its client's retries off, one per settings object seen: made
# once (~45 ms), entered in ~0.1 ms (temporary_settings builds one each time: ~68 ms).
_QUICK: dict[int, tuple[Any, Any]] = {}


@contextmanager
def no_client_retries() -> Iterator[None]:
    """This thread's Prefect client requests in the block are not retried by the client
    (it reads PREFECT_CLIENT_MAX_RETRIES per request from the thread's settings context)."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    ctx = get_settings_context()
    seen = _QUICK.get(id(ctx.settings))
    if seen is None or seen[0] is not ctx.settings:
        quick = ctx.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
        seen = _QUICK[id(ctx.settings)] = (ctx.settings, quick)
    with SettingsContext(profile=ctx.profile, settings=seen[1]):
        yield


def busy_retried(call: Callable[[], T]) -> T:
    """``call()``, a Prefect client request, tried again after each of BUSY_RETRY_DELAYS
    while the server answers busy (BUSY_STATUS); any other error is raised at once."""
    import httpx

    for delay in BUSY_RETRY_DELAYS:
        try:
            with no_client_retries():
                return call()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in BUSY_STATUS:
                raise
        _sleep(delay)
    return call()
