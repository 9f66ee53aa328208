"""Prefect flow-run state -> the contract's status values (DESIGN.md, "Status mapping")."""

from __future__ import annotations

from api.models import Status
from memdump.runinfo import IN_PROGRESS, TIMED_OUT


def map_state(state_type: str | None, state_name: str | None) -> Status:
    if state_type is None:
        return "idle"
    if state_type in IN_PROGRESS:
        return "in_progress"
    if state_type == "COMPLETED":
        return "completed"
    if state_type == "FAILED":
        return "timeout" if state_name == TIMED_OUT else "failed"
    # CRASHED, CANCELLED and anything Prefect adds later: not a capture outcome.
    return "error"
