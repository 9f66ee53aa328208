"""The capture flow: one run per trigger (API call or schedule), one task chain per VM."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed

from memdump.errors import CollectorLostError, MemdumpError
from memdump.escaping import md_text
from memdump.hypervisors import open_driver
from memdump.records import open_store
from memdump.records.base import RecordQuery
from memdump.records.model import DumpRecord
from memdump.settings import Settings
from memdump.targets import ALL, list_one
from tasks.capture import TIMED_OUT, capture_vm, offload_dump, record_dump, retry_if_retryable
from tasks.limits import ensure_limits


@task(
    name="list-vms",
    # /status finds a hypervisor whose listing failed by this name (api/runs.py).
    task_run_name="list-vms-{hypervisor}",
    retry_condition_fn=retry_if_retryable,
)
def list_vms(hypervisor: str) -> list[str]:
    """The running VMs of one hypervisor: its part of "all". A failure fails this task
    only; the flow fails that hypervisor's VMs with the reason and captures the rest."""
    settings = Settings()
    driver = open_driver(settings.hypervisor(hypervisor), settings.ssh)
    try:
        listing = list_one(driver)
    finally:
        driver.close()
    if listing.error is not None:
        raise listing.error
    return [ref.vmid for ref in listing.vms]


def list_targets(
    settings: Settings, vm_ids: list[str]
) -> tuple[list[tuple[str, str | None]], list[tuple[str, str]]]:
    """(vm id, hypervisor or None) per VM to capture, and (hypervisor, reason) per
    hypervisor whose VMs could not be listed. "all" is every running VM of every
    hypervisor, each listed on its own. Plain ids are resolved by the capture task, so an
    unknown id fails only its own VM."""
    listed: list[tuple[str, str | None]] = []
    unlisted: list[tuple[str, str]] = []
    if ALL in vm_ids:
        names = [hv.name for hv in settings.inventory]
        lister = list_vms.with_options(
            retries=settings.capture_retries,
            retry_delay_seconds=settings.capture_retry_delay_sec,
        )
        futures = lister.map(names)
        futures.wait()
        for name, fut in zip(names, futures, strict=True):
            result, vms, error = _outcome(fut)
            if result == "completed":
                listed.extend((vm, name) for vm in vms)
            else:
                unlisted.append((name, error or "cannot list its VMs"))
    targets: list[tuple[str, str | None]] = []
    for vm_id in dict.fromkeys(vm_ids):
        targets.extend(listed if vm_id == ALL else [(vm_id, None)])
    return list(dict.fromkeys(targets)), unlisted


def _outcome(future: PrefectFuture[Any]) -> tuple[str, Any, str]:
    state = future.state
    if state.is_completed():
        return "completed", future.result(), ""
    value = state.result(raise_on_failure=False) if state.is_failed() else None
    error = str(value) if isinstance(value, BaseException) else (state.message or state.name or "")
    if state.name == TIMED_OUT:
        return "timeout", None, error
    return "failed", None, error


# (VM id, result, its record or None, error)
Row = tuple[str, str, DumpRecord | None, str]

_DUMP_PATH = re.compile(r"; dump_path=(\S+)$")


def _flag(analysis: str) -> str:
    # A dump Volatility could not open is kept (it is still the memory) but never
    # passed off as analysis-ready.
    return analysis if analysis in ("passed", "skipped", "") else f"**{md_text(analysis.upper())}**"


def _summary(rows: Sequence[Row], unlisted: Sequence[tuple[str, str]] = ()) -> str:
    # Every value from a request, a hypervisor or an error is escaped (md_text): a VM
    # name or a stderr line is shown as text, never as markup or a new table cell.
    lines = [
        "| VM | result | size (raw) | .gz | sha256 | seconds | analysis | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vm, result, rec, error in rows:
        if rec is not None:
            lines.append(
                f"| {md_text(vm)} | {result} | {rec.raw_size_bytes} | {rec.gzip_size_bytes} | "
                f"{md_text(rec.sha256)} | {rec.duration_sec:.3f} | {_flag(rec.analysis)} | |"
            )
        else:
            lines.append(f"| {md_text(vm)} | {result} | | | | | | {md_text(error, 300)} |")
    for hv, error in unlisted:
        lines.append(
            f"| {md_text(_unlisted_id(hv))} | failed | | | | | | "
            f"{md_text(f'cannot list the VMs of hypervisor {hv}: {error}', 300)} |"
        )
    return "\n".join(lines)


def _unlisted_id(hypervisor: str) -> str:
    """How a hypervisor whose VMs could not be listed appears among the VMs: its part of
    "all" (the same id /status shows for it)."""
    return f"{hypervisor}:{ALL}"


def _chain_outcome(
    cap: PrefectFuture[Any], off: PrefectFuture[Any], rec: PrefectFuture[Any]
) -> tuple[str, DumpRecord | None, str]:
    # The first step that did not complete decides: the capture, then the offload (its
    # S3 error, the local file kept), then the record.
    result, record, error = _outcome(cap)
    if result != "completed":
        return result, record, error
    result, record, error = _outcome(off)
    if result != "completed":
        return result, record, f"offload failed (local file kept): {error}"
    if not rec.state.is_completed():
        return "failed", None, f"record not written: {rec.state.message}"
    return "completed", rec.result(), ""


def _final(rows: list[Row], source: str, unlisted: Sequence[tuple[str, str]] = ()) -> State[Any]:
    """The run's state: failed if any VM failed or any hypervisor could not be listed
    (the VMs of the others are captured all the same)."""
    not_listed = f", {len(unlisted)} hypervisor(s) not listed" if unlisted else ""
    create_markdown_artifact(
        markdown=_summary(rows, unlisted),
        key="capture-summary",
        description=f"{len(rows)} VM(s){not_listed}, trigger: {md_text(source)}",
    )
    bad = [(vm, r, e) for vm, r, _, e in rows if r != "completed"]
    if not rows and not unlisted:
        return Completed(message="no VMs to capture")
    if not bad and not unlisted:
        return Completed(message=f"{len(rows)} VM(s) captured")
    parts = []
    if bad or not unlisted:
        detail = "; ".join(f"{vm}: {e}" for vm, _, e in bad)
        parts.append(f"{len(bad)} of {len(rows)} VM(s) failed" + (f": {detail}" if bad else ""))
    if unlisted:
        detail = "; ".join(f"{_unlisted_id(hv)}: {e}" for hv, e in unlisted)
        parts.append(f"{len(unlisted)} hypervisor(s) could not list their VMs: {detail}")
    message = "; ".join(parts)
    if any(r == "timeout" for _, r, _ in bad):
        return Failed(name=TIMED_OUT, message=message)
    return Failed(message=message)


def _chain_tasks(settings: Settings) -> tuple[Any, Any]:
    capture = capture_vm.with_options(
        retries=settings.capture_retries, retry_delay_seconds=settings.capture_retry_delay_sec
    )
    offload = offload_dump.with_options(
        retries=settings.offload_retries, retry_delay_seconds=settings.capture_retry_delay_sec
    )
    return capture, offload


@flow(name="capture-vms", log_prints=True)
def capture_vms(vm_ids: list[str], source: str = "api") -> State[Any]:
    """Capture the memory of ``vm_ids`` ("all" = every running VM of the inventory)."""
    settings = Settings()
    logger = get_run_logger()
    logger.info("trigger from %s for %s", source, vm_ids)
    ensure_limits(settings)
    try:
        targets, unlisted = list_targets(settings, vm_ids)
    except MemdumpError as exc:
        return Failed(message=f"cannot list VMs: {exc}")
    if settings.fanout == "deployments":
        return _fan_out(settings, targets, source, unlisted)
    capture, offload = _chain_tasks(settings)
    captured = capture.map(
        [t[0] for t in targets], [t[1] for t in targets], source=unmapped(source)
    )
    offloaded = offload.map(captured)
    recorded = record_dump.map(offloaded)
    recorded.wait()
    rows = [
        (vm_id, *_chain_outcome(cap, off, rec))
        for (vm_id, _), cap, off, rec in zip(targets, captured, offloaded, recorded, strict=True)
    ]
    return _final(rows, source, unlisted)


@flow(name="capture-one-vm", log_prints=True)
def capture_one_vm(vm_id: str, hypervisor: str | None = None, source: str = "api") -> State[Any]:
    """The chain of one VM as a flow run of its own: what a trigger's flow run starts
    per VM with ``MEMDUMP_FANOUT=deployments``, so any worker of the pool can take it."""
    settings = Settings()
    capture, offload = _chain_tasks(settings)
    cap = capture.submit(vm_id, hypervisor, source=source)
    off = offload.submit(cap)
    rec = record_dump.submit(off)
    rec.wait()
    row = (vm_id, *_chain_outcome(cap, off, rec))
    state = _final([row], source)
    if row[2] is not None:  # where the trigger's flow run finds the record
        state.message = f"{state.message}; dump_path={row[2].dump_path}"
    return state


@task(
    name="capture-vm-run",
    task_run_name="capture-vm-{vm_id}",  # as the chain's capture task: /status reads it
    retry_condition_fn=retry_if_retryable,
    retries=1,
)
def run_capture_flow(vm_id: str, hypervisor: str | None, source: str) -> State[Any] | str:
    """Start VM ``vm_id``'s flow run (any worker of the pool takes it) and wait for it.
    A run that crashed (its worker or machine died) is tried once more, elsewhere."""
    from prefect.deployments import run_deployment

    settings = Settings()
    child = run_deployment(
        name=settings.child_deployment,
        parameters={"vm_id": vm_id, "hypervisor": hypervisor, "source": source},
        timeout=None,
        as_subflow=True,
        tags=["memdump"],
    )
    state = child.state  # type: ignore[union-attr]  # sync call: a FlowRun
    name = child.name  # type: ignore[union-attr]
    if state is not None and state.is_completed():
        m = _DUMP_PATH.search(state.message or "")
        return m.group(1) if m else ""
    if state is not None and state.is_crashed():
        raise CollectorLostError(
            f"{vm_id}: flow run {name} crashed (its worker is gone): {state.message}",
            vm_id=vm_id,
            flow_run=name,
        )
    message = f"flow run {name}: {state.message if state else 'no state'}"
    if state is not None and state.name == TIMED_OUT:
        return Failed(name=TIMED_OUT, message=message)
    return Failed(message=message)


def _fan_out(
    settings: Settings,
    targets: list[tuple[str, str | None]],
    source: str,
    unlisted: Sequence[tuple[str, str]] = (),
) -> State[Any]:
    runs = run_capture_flow.map(
        [t[0] for t in targets], [t[1] for t in targets], source=unmapped(source)
    )
    runs.wait()
    rows: list[Row] = []
    for (vm_id, _), fut in zip(targets, runs, strict=True):
        result, dump_path, error = _outcome(fut)
        rows.append((vm_id, result, _stored(settings, dump_path), error))
    return _final(rows, source, unlisted)


def _stored(settings: Settings, dump_path: Any) -> DumpRecord | None:
    """A VM's record, from the store: a flow run's return value stays with that run (its
    result storage may be another collector's disk). None if the store cannot say (the
    record may wait in that collector's outbox); the VM still counts as captured."""
    if not dump_path or not isinstance(dump_path, str):
        return None
    try:
        found = open_store(settings).list(1, 0, RecordQuery(dump_path=dump_path))
    except MemdumpError:
        return None
    return DumpRecord.from_dict(found[0]) if found else None
