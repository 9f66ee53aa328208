"""Which files and sockets a piece of code opens, through Python's audit hooks (PEP 578):
for tests that prove a check writes nothing and touches no network."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

Event = tuple[str, tuple[Any, ...]]
_events: list[Event] | None = None
_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    # File opens, directories made, sockets, urllib requests.
    if _events is not None and (
        event in ("open", "os.mkdir") or event.startswith(("socket.", "urllib."))
    ):
        _events.append((event, args))


@contextmanager
def audited() -> Iterator[list[Event]]:
    """The watched events raised inside the block (a hook cannot be removed: it is
    installed once per process and records nothing outside a block)."""
    global _events, _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    events: list[Event] = []
    _events = events
    try:
        yield events
    finally:
        _events = None


def written(events: list[Event]) -> list[tuple[str, str]]:
    """(event, path) of every directory made or file opened for writing, but os.devnull
    (where memdump.volatility points Volatility's validation cache)."""
    found = []
    for event, args in events:
        path, mode, flags = (args + (None, None))[:3]
        writing = event == "os.mkdir" or (
            any(c in str(mode) for c in "wax+")
            if isinstance(mode, str)
            else isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing and path != os.devnull:
            found.append((event, str(path)))
    return found
