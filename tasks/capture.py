"""The capture task: one VM's whole chain (memdump.chain), with what only Prefect adds:
retries, the concurrency slot, the progress artifact, logs.

Retries happen only for errors whose ``retryable`` flag is set (a dropped connection,
a short dump), never for a wrong host key or an unknown VM. Prefect's own timeout
cannot interrupt a blocking call in a worker thread, so the capture enforces its own
deadline inside the stream loop and this task turns it into Prefect's TimedOut state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, State
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.context import get_task_and_flow_run_ids

from memdump.chain import Slot, resolved, run_chain
from memdump.errors import CaptureTimeoutError
from memdump.hypervisors import VMRef
from memdump.records.model import DumpRecord
from memdump.runinfo import CAPTURE_TASK, PROGRESS_KEY, TIMED_OUT, Progress, slug, step_tag
from memdump.settings import OrchestrationSettings, Settings
from tasks.busy_retries import busy_retried
from tasks.limits import GATE, GLOBAL_LIMIT, SLOTS, hypervisor_limit

# The progress artifact is written at most this often while a VM streams (and once more
# when the dump is complete): one Prefect write per VM and interval, the UI's bar and
# /status's byte counts at most this old.
PROGRESS_EVERY_SEC = 2.0


def _default(setting: str) -> Any:
    """A setting's default, for a decorator (flows pass the configured value with
    ``with_options``): written once, in memdump.settings."""
    return OrchestrationSettings.model_fields[setting].default


def retry_if_retryable(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Prefect retry condition: only memdump errors that say they are retryable."""
    if not state.is_failed():
        return False
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # result not available (e.g. not persisted): do not guess
        return False
    return bool(getattr(exc, "retryable", False))


class _Progress:
    """The capture's progress artifact: its percent is the data (the Prefect UI shows it),
    its byte counts the metadata (/status reads them back as data, memdump.runinfo).
    Created when the capture has its slot (progress 0); then, called from the stream
    loop, updated at most every PROGRESS_EVERY_SEC, counted from its creation, and once
    when the dump is complete: a capture shorter than that writes it twice in all."""

    def __init__(self, key: str, label: str) -> None:
        self.label = label
        task_run_id, flow_run_id = get_task_and_flow_run_ids()
        art = ArtifactCreate(
            type="progress",
            key=key,
            description=f"{label}: bytes streamed / dump size",
            data=0.0,
            task_run_id=task_run_id,
            flow_run_id=flow_run_id,
        )
        # Before the dump opens, and then from the stream loop: a busy server costs
        # milliseconds here, not Prefect's 2 s (tasks.busy_retries).
        client = get_client(sync_client=True)
        self.artifact_id = busy_retried(lambda: client.create_artifact(art)).id
        self.last = time.monotonic()
        self.sent: tuple[int, int] | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if not total or (done, total) == self.sent:
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_SEC or done >= total:
            self.last, self.sent = now, (done, total)
            p = Progress(done, total)
            update = ArtifactUpdate(
                data=p.percent,
                description=f"{self.label}: {done} of {total} bytes streamed",
                metadata_=p.to_metadata(),
            )
            client = get_client(sync_client=True)
            busy_retried(lambda: client.update_artifact(self.artifact_id, update))


@contextmanager
def _slot(settings: Settings, hypervisor: str, at_once: int | None = None) -> Iterator[None]:
    """A place at this process's gate (tasks.limits.GATE, no polling), then a slot of
    the global and the hypervisor's Prefect limit (Prefect acquires several limits
    all-or-nothing; they hold across runs and collectors). ``at_once``: this process's
    share of the global cap (a part of a fan-out, flows.capture), if it has one."""
    orch = settings.orchestration
    total = orch.max_concurrent_captures
    if at_once is not None:
        total = max(1, min(total, at_once))
    task_run_id, _ = get_task_and_flow_run_ids()
    # The UI's limit page names the task run that holds each slot.
    holder = task_run_id and ConcurrencyLeaseHolder(type="task_run", id=task_run_id)
    with (
        GATE.place(
            hypervisor,
            total=total,
            per_hypervisor=orch.max_captures_per_hypervisor,
        ),
        SLOTS.hold(
            [GLOBAL_LIMIT, hypervisor_limit(hypervisor)],
            lease_sec=orch.slot_lease_sec,
            holder=holder,
        ),
    ):
        yield


def _until_captured(held: ExitStack) -> Callable[[VMRef], AbstractContextManager[None]]:
    """The chain's slot when the task took it before opening the driver: the chain
    gives it back when its capture ends (the offload and the record run without it)."""

    @contextmanager
    def slot(ref: VMRef) -> Iterator[None]:
        try:
            yield
        finally:
            held.close()

    return slot


def _progress(ref: VMRef) -> _Progress:
    return _Progress(f"{PROGRESS_KEY}{slug(ref.vmid)}", f"{ref.name} on {ref.hypervisor}")


@task(
    name=CAPTURE_TASK,
    task_run_name=CAPTURE_TASK + "-{vm_id}",  # the Prefect UI names each run by its VM
    tags=[step_tag("capture")],  # which VM: its flow run's targets (memdump.runinfo.Target)
    retry_condition_fn=retry_if_retryable,
    retries=_default("capture_retries"),
    retry_delay_seconds=_default("capture_retry_delay_sec"),
)
def capture_vm(
    vm_id: str, hypervisor: str | None = None, source: str = "api", at_once: int | None = None
) -> DumpRecord | State[Any]:
    """The chain of one VM (memdump.chain): capture -> offload -> record. Only a
    retryable capture error is retried; an offload or record failure fails the VM with
    its dump kept. ``at_once``: see :func:`_slot`."""
    settings = Settings()
    logger = get_run_logger()
    trigger = {"source": source, "flow_run_id": str(flow_run.id or "")}
    try:
        with ExitStack() as held:
            slot: Slot
            if hypervisor is not None:
                # The hypervisor is known (listed for "all", located by the flow): the
                # task waits for its slot before its SSH connection is opened.
                held.enter_context(_slot(settings, hypervisor, at_once))
                slot = _until_captured(held)
            else:  # found by resolving it, then the slot (as the flow could not locate it)
                slot = lambda ref: _slot(settings, ref.hypervisor, at_once)  # noqa: E731
            with resolved(settings, vm_id, hypervisor) as (driver, ref):
                done = run_chain(
                    driver, ref, settings, trigger=trigger, slot=slot, progress=_progress
                )
    except CaptureTimeoutError as exc:
        return Failed(name=TIMED_OUT, message=f"{vm_id}: {exc}")
    rec = done.capture.record
    if done.capture.fallback_reason:  # never silently: also in the manifest and the record
        logger.warning(
            "live capture of %s not possible (%s): captured it paused",
            rec.vmid,
            done.capture.fallback_reason,
        )
    logger.info(
        "captured %s: %d bytes raw, %d gz, sha256 %s in %.3fs",
        rec.vmid,
        rec.raw_size_bytes,
        rec.gzip_size_bytes,
        rec.sha256,
        rec.duration_sec,
    )
    if done.offloaded is not None:
        logger.info("offloaded %s to %s", rec.vmid, done.offloaded.where)
    if done.outbox is not None:
        logger.warning(
            "record store unavailable (%s): record of %s kept in the outbox (depth %d)",
            done.outbox.last_error,
            rec.vmid,
            done.outbox.depth,
        )
    if done.timestamp is not None and done.timestamp.status != "granted":
        # The capture is complete; its RFC 3161 token is fetched later (memdump.timestamping).
        logger.warning(
            "trusted timestamp of %s %s: %s", rec.vmid, done.timestamp.status, done.timestamp.detail
        )
    return done.record
