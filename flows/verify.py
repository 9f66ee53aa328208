"""The verification flow: re-read every dump recorded in the last N days and check it
(memdump.verify), on a schedule, so silent damage is found before anyone needs the dump."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from memdump.escaping import md_text
from memdump.settings import Settings
from tasks.verify import list_recorded, verify_dump


def _summary(results: list[dict[str, Any]]) -> str:
    lines = ["| dump | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:  # record values and error texts: shown as text (memdump.escaping)
        lines.append(
            f"| {md_text(r['dump_path'])} | {md_text(r['status'])} | {md_text(r['seconds'])} "
            f"| {md_text(r['detail'], 300)} |"
        )
    return "\n".join(lines)


@flow(name="verify-dumps", log_prints=False)
def verify_dumps(days: float | None = None) -> State[Any]:
    """Verify every dump recorded in the last ``days`` days (default: MEMDUMP_VERIFY__DAYS,
    read when the run starts, so the schedule follows the setting)."""
    if days is None:
        days = Settings().verify.days
    rows = list_recorded(days)
    # One at a time: each check reads a whole dump, and captures need the disk more.
    results = [verify_dump(row) for row in rows]
    bad = [r for r in results if r["status"] != "verified"]
    create_markdown_artifact(
        markdown=_summary(results) if results else "No dumps recorded in that period.",
        key="verify-summary",
        description=f"{len(results)} dump(s) of the last {days:g} day(s), {len(bad)} not verified",
    )
    get_run_logger().info("%d dump(s) checked, %d not verified", len(results), len(bad))
    if bad:
        listed = "; ".join(f"{r['dump_path']}: {r['status']} ({r['detail']})" for r in bad)
        return Failed(message=f"{len(bad)} of {len(results)} dump(s) not verified: {listed}")
    return Completed(message=f"{len(results)} dump(s) verified")
