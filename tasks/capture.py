"""Thin Prefect tasks over memdump's engine: capture, offload, record.

Retries happen only for errors whose ``retryable`` flag is set (a dropped connection,
a short dump), never for a wrong host key or an unknown VM. Prefect's own timeout
cannot interrupt a blocking call in a worker thread, so the capture enforces its own
deadline inside the stream loop and this task turns it into Prefect's TimedOut state.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.client.schemas.objects import State
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.context import get_task_and_flow_run_ids

from memdump.capture import capture
from memdump.errors import CaptureTimeoutError
from memdump.hypervisors import open_driver
from memdump.manifest import manifest_path
from memdump.records import open_recorder
from memdump.records.model import DumpRecord
from memdump.runinfo import (
    CAPTURE_TASK,
    OFFLOAD_TASK,
    PROGRESS_KEY,
    RECORD_TASK,
    TIMED_OUT,
    Progress,
    slug,
    step_tag,
)
from memdump.settings import OrchestrationSettings, Settings
from memdump.targets import find
from tasks.limits import GLOBAL_LIMIT, hypervisor_limit


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
    Updated at most once a second (called from the stream loop)."""

    def __init__(self, key: str, label: str) -> None:
        self.label = label
        task_run_id, flow_run_id = get_task_and_flow_run_ids()
        self.artifact_id = (
            get_client(sync_client=True)
            .create_artifact(
                ArtifactCreate(
                    type="progress",
                    key=key,
                    description=f"{label}: bytes streamed / dump size",
                    data=0.0,
                    task_run_id=task_run_id,
                    flow_run_id=flow_run_id,
                )
            )
            .id
        )
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if total and (now - self.last >= 1.0 or done >= total):
            self.last = now
            p = Progress(done, total)
            get_client(sync_client=True).update_artifact(
                self.artifact_id,
                ArtifactUpdate(
                    data=p.percent,
                    description=f"{self.label}: {done} of {total} bytes streamed",
                    metadata_=p.to_metadata(),
                ),
            )


@task(
    name=CAPTURE_TASK,
    task_run_name=CAPTURE_TASK + "-{vm_id}",  # the Prefect UI names each run by its VM
    tags=[step_tag("capture")],  # the flow adds the VM's tags (memdump.runinfo.vm_tags)
    retry_condition_fn=retry_if_retryable,
    retries=_default("capture_retries"),
    retry_delay_seconds=_default("capture_retry_delay_sec"),
)
def capture_vm(
    vm_id: str, hypervisor: str | None = None, source: str = "api"
) -> DumpRecord | State[Any]:
    """snapshot -> dump -> stream of one VM into a verified .mem.gz (+ its manifest)."""
    settings = Settings()
    logger = get_run_logger()
    hvs = [settings.hypervisor(hypervisor)] if hypervisor else settings.inventory
    drivers = [open_driver(hv, settings.ssh) for hv in hvs]
    try:
        driver, ref = find(drivers, vm_id)
        names = [GLOBAL_LIMIT, hypervisor_limit(ref.hypervisor)]
        with concurrency(names, occupy=1, strict=True, lease_duration=settings.slot_lease_sec):
            progress = _Progress(
                f"{PROGRESS_KEY}{slug(ref.vmid)}", f"{ref.name} on {ref.hypervisor}"
            )
            logger.info("capturing %s on %s", ref.name, ref.hypervisor)
            try:
                trigger = {"source": source, "flow_run_id": str(flow_run.id or "")}
                result = capture(
                    driver,
                    ref,
                    settings,
                    progress=progress,
                    trigger=trigger,
                )
            except CaptureTimeoutError as exc:
                return Failed(name=TIMED_OUT, message=f"{ref.vmid}: {exc}")
        rec = result.record
        if result.fallback_reason:  # never silently: also in the manifest and the record
            logger.warning(
                "live capture of %s not possible (%s): captured it paused",
                rec.vmid,
                result.fallback_reason,
            )
        logger.info(
            "captured %s: %d bytes raw, %d gz, sha256 %s in %.3fs",
            rec.vmid,
            rec.raw_size_bytes,
            rec.gzip_size_bytes,
            rec.sha256,
            rec.duration_sec,
        )
        return rec
    finally:
        for d in drivers:
            d.close()


@task(
    name=OFFLOAD_TASK,
    tags=[step_tag("offload")],
    retry_condition_fn=retry_if_retryable,
    retries=_default("offload_retries"),
    retry_delay_seconds=_default("capture_retry_delay_sec"),
)
def offload_dump(record: DumpRecord) -> DumpRecord:
    """Upload the finished .mem.gz to S3 (when configured) and verify it there. The local
    file is removed only after a verified upload and only if ``keep_local`` is off; then
    the record's dump_path is the s3:// URI. A failed upload keeps the local file and
    fails the VM, so no record ever claims an object that does not exist. The record
    carries every location: the S3 URI and VersionId, and the local copy (cleared when
    it is removed here)."""
    s3 = Settings().s3
    if s3 is None:
        return record
    from memdump.storage import S3Store

    store = S3Store(s3)
    dump = Path(record.dump_path)
    obj = store.upload(dump, gz_sha256=record.gz_sha256, size=record.gzip_size_bytes)
    # The manifest goes beside the object (same key, .manifest.json), verified the same way.
    mpath = manifest_path(dump)
    if record.manifest_sha256:
        store.upload(mpath, gz_sha256=record.manifest_sha256, size=mpath.stat().st_size)
    get_run_logger().info("offloaded %s to %s (%d bytes)", record.vmid, obj.uri, obj.size)
    located = dataclasses.replace(record, s3_uri=obj.uri, s3_version_id=obj.version_id or "")
    if s3.keep_local:
        return located
    dump.unlink()
    mpath.unlink(missing_ok=True)
    return dataclasses.replace(located, dump_path=obj.uri, local_path="", collector="")


@task(name=RECORD_TASK, tags=[step_tag("record")])
def record_dump(record: DumpRecord) -> DumpRecord:
    """Write the record; if the store cannot take it, it waits in the outbox (replayed by
    the runner and by later runs). The capture is complete either way."""
    recorder = open_recorder(Settings())
    if not recorder.record(record):
        state = recorder.outbox.state()
        get_run_logger().warning(
            "record store unavailable (%s): record of %s kept in the outbox (depth %d)",
            state.last_error,
            record.vmid,
            state.depth,
        )
    return record
