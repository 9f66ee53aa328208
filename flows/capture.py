"""The capture flow: one run per trigger (API call or schedule), one task chain per VM."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed

from memdump.errors import MemdumpError
from memdump.hypervisors import open_driver
from memdump.records.model import DumpRecord
from memdump.settings import Settings
from memdump.targets import ALL
from tasks.capture import TIMED_OUT, capture_vm, offload_dump, record_dump
from tasks.limits import ensure_limits


@task(name="list-targets")
def list_targets(vm_ids: list[str]) -> list[tuple[str, str | None]]:
    """(vm id, hypervisor or None) per VM to capture; "all" is every running VM of every
    hypervisor. Plain ids are resolved by the capture task, so an unknown id fails only
    its own VM."""
    settings = Settings()
    targets: list[tuple[str, str | None]] = []
    for vm_id in dict.fromkeys(vm_ids):
        if vm_id != ALL:
            targets.append((vm_id, None))
            continue
        for hv in settings.inventory:
            driver = open_driver(hv, settings.ssh)
            try:
                targets.extend((ref.vmid, hv.name) for ref in driver.list_vms())
            finally:
                driver.close()
    return list(dict.fromkeys(targets))


def _outcome(future: PrefectFuture[Any]) -> tuple[str, DumpRecord | None, str]:
    state = future.state
    if state.is_completed():
        return "completed", future.result(), ""
    value = state.result(raise_on_failure=False) if state.is_failed() else None
    error = str(value) if isinstance(value, BaseException) else (state.message or state.name or "")
    if state.name == TIMED_OUT:
        return "timeout", None, error
    return "failed", None, error


def _flag(analysis: str) -> str:
    # A dump Volatility could not open is kept (it is still the memory) but never
    # passed off as analysis-ready.
    return analysis if analysis in ("passed", "skipped", "") else f"**{analysis.upper()}**"


def _summary(rows: list[tuple[str, str, DumpRecord | None, str]]) -> str:
    lines = [
        "| VM | result | size (raw) | .gz | sha256 | seconds | analysis | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vm, result, rec, error in rows:
        if rec is not None:
            lines.append(
                f"| {vm} | {result} | {rec.raw_size_bytes} | {rec.gzip_size_bytes} | "
                f"`{rec.sha256}` | {rec.duration_sec:.3f} | {_flag(rec.analysis)} | |"
            )
        else:
            lines.append(f"| {vm} | {result} | | | | | | {error.replace('|', '/')[:300]} |")
    return "\n".join(lines)


@flow(name="capture-vms", log_prints=True)
def capture_vms(vm_ids: list[str], source: str = "api") -> State[Any]:
    """Capture the memory of ``vm_ids`` ("all" = every running VM of the inventory)."""
    settings = Settings()
    logger = get_run_logger()
    logger.info("trigger from %s for %s", source, vm_ids)
    ensure_limits(settings)
    try:
        targets = list_targets(vm_ids)
    except MemdumpError as exc:
        return Failed(message=f"cannot list VMs: {exc}")
    capture = capture_vm.with_options(
        retries=settings.capture_retries, retry_delay_seconds=settings.capture_retry_delay_sec
    )
    captured = capture.map(
        [t[0] for t in targets], [t[1] for t in targets], source=unmapped(source)
    )
    offload = offload_dump.with_options(
        retries=settings.offload_retries, retry_delay_seconds=settings.capture_retry_delay_sec
    )
    offloaded = offload.map(captured)
    recorded = record_dump.map(offloaded)
    recorded.wait()

    rows: list[tuple[str, str, DumpRecord | None, str]] = []
    for (vm_id, _), cap, off, rec in zip(targets, captured, offloaded, recorded, strict=True):
        result, record, error = _outcome(cap)
        if result == "completed":
            # The first step that did not complete decides: the capture, then the offload
            # (its S3 error, the local file kept), then the record.
            result, record, error = _outcome(off)
            if result != "completed":
                error = f"offload failed (local file kept): {error}"
            elif not rec.state.is_completed():
                result, record, error = "failed", None, f"record not written: {rec.state.message}"
            else:
                record = rec.result()
        rows.append((vm_id, result, record, error))
    create_markdown_artifact(
        markdown=_summary(rows),
        key="capture-summary",
        description=f"{len(rows)} VM(s), trigger: {source}",
    )

    bad = [(vm, r, e) for vm, r, _, e in rows if r != "completed"]
    if not rows:
        return Completed(message="no VMs to capture")
    if not bad:
        return Completed(message=f"{len(rows)} VM(s) captured")
    detail = "; ".join(f"{vm}: {e}" for vm, _, e in bad)
    message = f"{len(bad)} of {len(rows)} VM(s) failed: {detail}"
    if any(r == "timeout" for _, r, _ in bad):
        return Failed(name=TIMED_OUT, message=message)
    return Failed(message=message)
