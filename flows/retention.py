"""The retention flow: delete what retention settings say is too old or too many, keep
the records, report what was freed and warn when storage crosses its threshold."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from memdump import retention
from memdump.errors import ConfigError
from memdump.records import open_store
from memdump.settings import Settings


@flow(name="apply-retention")
def apply_retention(
    days: float | None = None, keep_last: int | None = None, dry_run: bool = False
) -> State[Any]:
    """Parameters override MEMDUMP_RETENTION__DAYS / MEMDUMP_RETENTION__KEEP_LAST and are
    held to the same bounds (days above 0, keep_last at least 1: anyone who may start a
    flow run must not be able to delete every dump). ``dry_run``: the artifact lists what
    would be deleted; nothing is."""
    logger = get_run_logger()
    try:
        # Before anything is opened: a refused parameter touches nothing.
        retention.check_bounds(days, keep_last)
        settings = Settings()
        report = retention.apply(
            settings, open_store(settings), days=days, keep_last=keep_last, dry_run=dry_run
        )
    except ConfigError as exc:
        logger.error("retention refused: %s", exc)
        return Failed(message=f"retention refused: {exc}")
    text = retention.describe(report)
    key = "retention-dry-run" if dry_run else "retention-report"
    create_markdown_artifact(markdown=text, key=key, description=text.splitlines()[0][:200])
    logger.info("%s", text.splitlines()[0])
    if report.over_threshold:
        logger.warning(
            "stored dumps: %d bytes, above the %d-byte threshold (MEMDUMP_STORAGE_WARN_BYTES)",
            report.stored_bytes,
            report.warn_bytes,
        )
    if report.errors:
        return Failed(message=f"{len(report.errors)} dump(s) could not be deleted: {text}")
    if report.over_threshold:
        # Completed, but named so the Prefect UI (and /status-like dashboards) show it.
        return Completed(name="StorageWarning", message=text.splitlines()[0])
    return Completed(message=text.splitlines()[0])
