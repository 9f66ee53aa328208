"""Commands that never stop writing (or never stop), tagged with a unique marker so a
test can tell that exactly those processes are gone afterwards."""

from __future__ import annotations

import time
import uuid

from tests.helpers.procs import cmdline, pids

# "$1" is the marker: it lands in the command lines of the shell and of `yes`.
FLOOD_STDOUT = 'yes "$1"'
FLOOD_STDERR = 'yes "$1" >&2'
TRICKLE = 'while :; do printf x; sleep 0.1; done; : "$1"'


def marker() -> str:
    return f"memdump-runaway-{uuid.uuid4().hex}"


def alive(mark: str) -> list[int]:
    return [p for p in pids() if mark in cmdline(p)]


def wait_gone(mark: str, within: float = 15.0) -> list[int]:
    """The processes still carrying ``mark`` once they have had ``within`` s to go."""
    end = time.monotonic() + within
    while (left := alive(mark)) and time.monotonic() < end:
        time.sleep(0.05)
    return left
