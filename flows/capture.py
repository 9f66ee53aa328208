"""The capture flow: one run per trigger (API call or schedule), one task chain per VM."""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed

from memdump.errors import CollectorLostError, MemdumpError
from memdump.hypervisors import open_driver
from memdump.records import open_store
from memdump.records.base import RecordQuery
from memdump.records.model import DumpRecord
from memdump.settings import Settings
from memdump.targets import ALL
from tasks.capture import TIMED_OUT, capture_vm, offload_dump, record_dump, retry_if_retryable
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


_DUMP_PATH = re.compile(r"; dump_path=(\S+)$")


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


def _final(rows: list[tuple[str, str, DumpRecord | None, str]], source: str) -> State[Any]:
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
        targets = list_targets(vm_ids)
    except MemdumpError as exc:
        return Failed(message=f"cannot list VMs: {exc}")
    if settings.fanout == "deployments":
        return _fan_out(settings, targets, source)
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
    return _final(rows, source)


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


def _fan_out(settings: Settings, targets: list[tuple[str, str | None]], source: str) -> State[Any]:
    runs = run_capture_flow.map(
        [t[0] for t in targets], [t[1] for t in targets], source=unmapped(source)
    )
    runs.wait()
    rows: list[tuple[str, str, DumpRecord | None, str]] = []
    for (vm_id, _), fut in zip(targets, runs, strict=True):
        result, dump_path, error = _outcome(fut)
        rows.append((vm_id, result, _stored(settings, dump_path), error))
    return _final(rows, source)


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
