"""The capture flow: one run per trigger (API call or schedule), one task chain per VM."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from memdump.errors import MemdumpError
from memdump.escaping import md_text
from memdump.hypervisors import open_driver
from memdump.records.model import DumpRecord
from memdump.runinfo import (
    ALL,
    CAPTURE_FLOW,
    CAPTURE_PART_FLOW,
    HYPERVISOR_TAG,
    SUMMARY_KEY,
    TIMED_OUT,
    Target,
    unlisted_id,
)
from memdump.settings import Settings
from memdump.targets import locate, require_hypervisors
from tasks.busy_retries import retry_busy_everywhere
from tasks.capture import capture_vm
from tasks.fanout import VMOutcome, deal, publish_outcome, run_capture_part
from tasks.limits import ensure_limits
from tasks.listing import list_vms
from tasks.targets import publish_targets


@dataclass(frozen=True)
class Targets:
    """What a trigger's ids come to: (vm id, hypervisor or None) per VM to capture,
    (hypervisor, reason) per hypervisor of "all" whose VMs could not be listed, and the
    hypervisors of "all" that were listed and run no VM."""

    vms: list[tuple[str, str | None]]
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def list_targets(settings: Settings, vm_ids: list[str]) -> Targets:
    """ "all" is every running VM of every hypervisor, each listed on its own (an inventory
    without a hypervisor is a ConfigError, not an empty capture). Plain ids come with no
    hypervisor here (see :func:`_placed`); one the flow cannot place is resolved by its
    capture task, so an unknown id fails only its own VM."""
    listed: list[tuple[str, str | None]] = []
    unlisted: list[tuple[str, str]] = []
    empty: list[str] = []
    if ALL in vm_ids:
        require_hypervisors(settings, f'"{ALL}" has nothing to capture')
        names = [hv.name for hv in settings.inventory]
        lister = list_vms.with_options(
            retries=settings.orchestration.capture_retries,
            retry_delay_seconds=settings.orchestration.capture_retry_delay_sec,
        )
        futures = []
        for name in names:
            with tags(f"{HYPERVISOR_TAG}{name}"):  # /status: which hypervisor's part of "all"
                futures.append(lister.submit(name))
        wait(futures)
        for name, fut in zip(names, futures, strict=True):
            result, vms, error = _outcome(fut)
            if result == "completed":
                listed.extend((vm, name) for vm in vms)
                if not vms:
                    empty.append(name)
            else:
                unlisted.append((name, error or "cannot list its VMs"))
    targets: list[tuple[str, str | None]] = []
    for vm_id in dict.fromkeys(vm_ids):
        targets.extend(_taking_turns(listed) if vm_id == ALL else [(vm_id, None)])
    return Targets(list(dict.fromkeys(targets)), unlisted, empty)


def _taking_turns(listed: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """The VMs of "all", one hypervisor after the other in turn (each hypervisor's in its
    listed order): the captures are queued in this order for a bounded pool of threads
    (:func:`_pool`), so those at the gate are spread over the hypervisors, and one whose
    hypervisor is full does not keep a free place of the global cap empty."""
    by_hv: dict[str | None, list[tuple[str, str | None]]] = {}
    for target in listed:
        by_hv.setdefault(target[1], []).append(target)
    turns = [iter(vms) for vms in by_hv.values()]
    out: list[tuple[str, str | None]] = []
    while turns:
        for it in list(turns):
            nxt = next(it, None)
            if nxt is None:
                turns.remove(it)
            else:
                out.append(nxt)
    return out


def _outcome(future: PrefectFuture[Any]) -> tuple[str, Any, str]:
    # Its final state as the task's thread left it: one that as_completed gave back is
    # done, but until waited on its state is read from the server, which may lag.
    future.wait()
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


def _flag(analysis: str) -> str:
    # A dump Volatility could not open is kept (it is still the memory) but never
    # passed off as analysis-ready.
    return analysis if analysis in ("passed", "skipped", "") else f"**{md_text(analysis.upper())}**"


def _no_running_vm(empty: Sequence[str]) -> str:
    return f"no running VM on hypervisor(s) {', '.join(empty)}"


def _summary(
    rows: Sequence[Row], unlisted: Sequence[tuple[str, str]] = (), empty: Sequence[str] = ()
) -> str:
    # Every value from a request, a hypervisor or an error is escaped (md_text): a VM
    # name or a stderr line is shown as text, never as markup or a new table cell.
    lines = []
    if empty and not rows and not unlisted:  # above the table, where an operator looks
        lines += [f"**Nothing captured**: {md_text(_no_running_vm(empty))}.", ""]
    lines += [
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
            f"| {md_text(unlisted_id(hv))} | failed | | | | | | "
            f"{md_text(f'cannot list the VMs of hypervisor {hv}: {error}', 300)} |"
        )
    for hv in empty:
        lines.append(
            f"| {md_text(unlisted_id(hv))} | no running VM | | | | | | "
            f"{md_text(f'no running VM on hypervisor {hv}: nothing to capture there', 300)} |"
        )
    return "\n".join(lines)


def _final(
    rows: list[Row],
    source: str,
    unlisted: Sequence[tuple[str, str]] = (),
    empty: Sequence[str] = (),
) -> State[Any]:
    """The run's state: failed if any VM failed or any hypervisor could not be listed
    (the VMs of the others are captured all the same). Hypervisors of "all" with no
    running VM are named in the message (and the summary) whatever the state: a
    completed run that captured nothing says so."""
    not_listed = f", {len(unlisted)} hypervisor(s) not listed" if unlisted else ""
    no_vm = f", {len(empty)} hypervisor(s) with no running VM" if empty else ""
    create_markdown_artifact(
        markdown=_summary(rows, unlisted, empty),
        key=SUMMARY_KEY,
        description=f"{len(rows)} VM(s){not_listed}{no_vm}, trigger: {md_text(source)}",
    )
    bad = [(vm, r, e) for vm, r, _, e in rows if r != "completed"]
    also = f"; {_no_running_vm(empty)}" if empty else ""
    if not rows and not unlisted:
        if empty:
            return Completed(message=f"nothing captured: {_no_running_vm(empty)}")
        return Completed(message="no VMs to capture")
    if not bad and not unlisted:
        return Completed(message=f"{len(rows)} VM(s) captured{also}")
    parts = []
    if bad or not unlisted:
        detail = "; ".join(f"{vm}: {e}" for vm, _, e in bad)
        parts.append(f"{len(bad)} of {len(rows)} VM(s) failed" + (f": {detail}" if bad else ""))
    if unlisted:
        detail = "; ".join(f"{unlisted_id(hv)}: {e}" for hv, e in unlisted)
        parts.append(f"{len(unlisted)} hypervisor(s) could not list their VMs: {detail}")
    message = "; ".join(parts) + also
    if any(r == "timeout" for _, r, _ in bad):
        return Failed(name=TIMED_OUT, message=message)
    return Failed(message=message)


def _placed(
    settings: Settings, targets: Sequence[tuple[str, str | None]]
) -> Iterator[tuple[str, str | None]]:
    """The targets with their hypervisor, in order, each as soon as it is known: listed
    for "all"; for an id asked for, where memdump.targets.locate finds it, every
    hypervisor asked once per run (one connection each) instead of once per VM by every
    capture task. An id it cannot place (None) is resolved by its task as before."""
    asked = [vm for vm, hv in targets if hv is None]
    if not asked:
        yield from targets
        return
    drivers = [open_driver(hv, settings.ssh) for hv in settings.inventory]
    where = locate(drivers, asked)
    try:
        for vm_id, hypervisor in targets:
            yield (vm_id, hypervisor) if hypervisor is not None else next(where)
    finally:
        where.close()
        for d in drivers:
            d.close()


def _pool(settings: Settings, at_once: int | None = None) -> ThreadPoolTaskRunner[Any]:
    """The threads a flow run's captures run on: twice the global cap, and one more per
    hypervisor (those waiting at the gate, tasks.limits.GATE, then span the
    hypervisors: :func:`_taking_turns`). The rest wait in the pool's queue, known by
    their task run id (the targets, which /status shows as pending) but not yet a task
    run: a trigger over 100 VMs created all their task runs at once, and that burst of
    writes (each answered "database is locked" by the embedded server's SQLite now and
    then, retried by Prefect's engine after 2 s, 4 s) delayed the first capture by 4 to
    10 s (2026-12-01). ``at_once``: the run's share of the global cap, if it has one."""
    orch = settings.orchestration
    total = orch.max_concurrent_captures if at_once is None else max(1, at_once)
    return ThreadPoolTaskRunner(max_workers=2 * total + len(settings.inventory))


def _captured(
    settings: Settings,
    targets: Iterable[tuple[str, str | None]],
    source: str,
    ended: Callable[[str, str | None, Row], None] | None = None,
    at_once: int | None = None,
) -> list[Row]:
    """One capture task run per VM (its whole chain, memdump.chain), on the flow run's
    pool of capture threads (:func:`_pool`). All are queued at once, then the flow run's
    targets (which VM each task run is for) are published, which /status reads; each
    waits for its place at the process's gate (tasks.limits.GATE) before it opens its
    connection. ``ended(vm_id, hypervisor, row)`` is called as each VM's chain ends;
    ``at_once``: the run's share of the global cap (a part's). The rows are in the
    targets' order."""
    capture = capture_vm.with_options(
        retries=settings.orchestration.capture_retries,
        retry_delay_seconds=settings.orchestration.capture_retry_delay_sec,
    )
    with _pool(settings, at_once) as pool:
        futures = []
        placed = []
        for vm_id, hypervisor in targets:
            params: dict[str, Any] = {"vm_id": vm_id, "hypervisor": hypervisor, "source": source}
            if at_once is not None:
                params["at_once"] = at_once
            future = pool.submit(capture, params)
            futures.append((vm_id, hypervisor, future))
            placed.append(Target(str(future.task_run_id), vm_id, hypervisor))
        _publish(placed)
        rows: dict[Any, Row] = {}
        which = {f.task_run_id: (vm, hv) for vm, hv, f in futures}
        for end in as_completed([f for _, _, f in futures]):
            vm_id, hypervisor = which[end.task_run_id]
            rows[end.task_run_id] = row = (vm_id, *_outcome(end))
            if ended is not None:
                ended(vm_id, hypervisor, row)
        return [rows[f.task_run_id] for _, _, f in futures]


def _publish(targets: list[Target]) -> None:
    run = FlowRunContext.get()
    if run is not None and run.flow_run is not None and targets:
        publish_targets(run.flow_run.id, targets)


@flow(name=CAPTURE_FLOW, log_prints=True)
def capture_vms(vm_ids: list[str], source: str = "api") -> State[Any]:
    """Capture the memory of ``vm_ids`` ("all" = every running VM of the inventory)."""
    retry_busy_everywhere()
    settings = Settings()
    logger = get_run_logger()
    logger.info("trigger from %s for %s", source, vm_ids)
    ensure_limits(settings)
    try:
        found = list_targets(settings, vm_ids)
    except MemdumpError as exc:
        return Failed(message=f"cannot list VMs: {exc}")
    if settings.orchestration.fanout == "deployments":
        return _fan_out(settings, found, source)
    rows = _captured(settings, _placed(settings, found.vms), source)
    return _final(rows, source, found.unlisted, found.empty)


@flow(name=CAPTURE_PART_FLOW, log_prints=True)
def capture_part(
    targets: list[tuple[str, str | None]], source: str = "api", at_once: int | None = None
) -> State[Any]:
    """Some of a trigger's VMs (VM id, hypervisor or None), each VM's chain as in
    capture_vms: what a trigger's flow run starts per part with
    ``MEMDUMP_ORCHESTRATION__FANOUT=deployments``, so any worker of the pool takes it.
    At most ``at_once`` of them capture at once (the part's share of the global cap).
    Each VM's outcome is published as its chain ends (tasks.fanout.publish_outcome)."""
    retry_busy_everywhere()
    # The trigger's run placed them (flows.capture._placed); one it could not is found by
    # its task, as find would (not located a second time here).
    rows = _captured(Settings(), targets, source, ended=_published, at_once=at_once)
    return _final(rows, source)


def _published(vm_id: str, hypervisor: str | None, row: Row) -> None:
    _, result, record, error = row
    try:
        publish_outcome(VMOutcome(vm_id, hypervisor, result, record, error))
    except Exception as exc:  # the VMs still capturing go on; this one's outcome is lost
        # The trigger's run then counts the VM failed, or captures it again if this flow
        # run crashes: a second record of it, never none.
        get_run_logger().warning("%s: outcome not published: %r", vm_id, exc)


def _fan_out(settings: Settings, found: Targets, source: str) -> State[Any]:
    """The VMs dealt into parts, as many as the global cap lets capture at once (more
    would not capture more at once; fewer would leave a place of the cap empty when one
    part's workers are busy), a flow run each, any worker taking it. Each part captures
    its share of the cap at once: parts in processes of their own asking the Prefect
    server for more slots than there are get refused and wait the server's Retry-After
    while a freed slot sits idle (tasks.limits.SLOTS)."""
    placed = list(_placed(settings, found.vms))
    cap = settings.orchestration.max_concurrent_captures
    parts = deal(placed, cap)
    at_once = max(1, cap // max(1, len(parts)))
    futures = []
    part_of: dict[tuple[str, str | None], str] = {}
    for number, part in enumerate(parts, start=1):
        future = run_capture_part.submit(part, source, number, at_once)
        futures.append((part, future))
        part_of.update({target: str(future.task_run_id) for target in part})
    # In the order listed (or asked for), as /status shows them.
    _publish([Target(part_of[(vm_id, hv)], vm_id, hv) for vm_id, hv in placed])
    wait([f for _, f in futures])
    ended: dict[tuple[str, str | None], VMOutcome] = {}
    for part, future in futures:
        for o in _part_outcomes(part, future):
            ended[o.target] = o
    rows: list[Row] = [(o.vm_id, o.result, o.record, o.error) for o in (ended[t] for t in placed)]
    return _final(rows, source, found.unlisted, found.empty)


def _part_outcomes(
    part: list[tuple[str, str | None]], future: PrefectFuture[Any]
) -> list[VMOutcome]:
    """Each VM's outcome in a part; the part's error for each if its task run has none."""
    state = future.state
    value = state.result(raise_on_failure=False) if state.is_final() else None
    if isinstance(value, list) and all(isinstance(o, VMOutcome) for o in value):
        return value
    error = str(value) if isinstance(value, BaseException) else (state.message or state.name or "")
    return [VMOutcome(vm_id, hv, "failed", error=error) for vm_id, hv in part]
