"""The verification flow's tasks: list the recent records, re-read one dump."""

from __future__ import annotations

from typing import Any

from prefect import task

from memdump.records import open_store
from memdump.runinfo import LIST_RECORDED_TASK, VERIFY_TASK
from memdump.settings import Settings
from memdump.verify import recorded_since, verify


@task(name=LIST_RECORDED_TASK)
def list_recorded(days: float) -> list[dict[str, Any]]:
    """Every record of the last ``days`` days, newest first."""
    return recorded_since(open_store(Settings()), days)


@task(name=VERIFY_TASK, tags=["memdump-verify"])
def verify_dump(row: dict[str, Any]) -> dict[str, Any]:
    """Re-read one dump and compare both hashes and its manifest with the record."""
    return verify(row, Settings(), by="flow").to_dict()
