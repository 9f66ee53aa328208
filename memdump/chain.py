"""The whole chain of one VM: capture (snapshot, dump, stream, analysis, manifest) ->
offload to S3 (when configured) -> record (the store, else the outbox).

Before the manifest is written, the new dump's chunk index is compared with that of the
previous capture of the same VM found in the record store (memdump.changes): how many
chunks differ goes into the manifest (``changes``) and the record (``chunks_changed``,
``chunks_compared_with``, ``chunks_changed_reason``), or why they could not be compared.

One function, :func:`run_chain`, that the Prefect task, ``memdump capture`` and tests
call alike (each finds the VM its own way; :func:`resolved` finds one id), so a capture
from the CLI leaves exactly what a trigger leaves (file, manifest, record, object). The
caller adds only what is its own: a concurrency slot held around the capture
(``slot``), a progress sink (``progress``), retries of a retryable capture error.
Nothing here retries a capture: once the dump exists, a later failure (offload, record)
is never retryable as a whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memdump import recordsig
from memdump.capture import Capture, Mode, capture
from memdump.changes import since_previous
from memdump.errors import MemdumpError, OffloadFailedError, RecordNotWrittenError
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.locations import Location
from memdump.manifest import SIDECAR_SUFFIXES, manifest_key, manifest_path
from memdump.pipeline import ProgressFn
from memdump.records import open_recorder
from memdump.records.model import DumpRecord
from memdump.records.outbox import OutboxState
from memdump.settings import Settings
from memdump.signing import collector_signer
from memdump.targets import find

if TYPE_CHECKING:
    from memdump import timestamping

log = logging.getLogger("memdump.chain")
# Needed once the dump is taken, not before: imported on a thread while the capture runs
# (about 0.1 s of imports, otherwise paid by every `memdump capture` before the dump).
AFTER_CAPTURE = ("memdump.custody", "memdump.timestamping")


def _preload() -> None:
    for name in AFTER_CAPTURE:
        # An import that fails here fails again, and is reported, where it is used.
        with contextlib.suppress(Exception):
            importlib.import_module(name)


Slot = Callable[[VMRef], AbstractContextManager[object]]
ProgressFor = Callable[[VMRef], ProgressFn | None]


@dataclass(frozen=True)
class ChainResult:
    capture: Capture
    record: DumpRecord  # as recorded: every location after the offload
    offloaded: Location | None  # the S3 object, when S3 is configured
    recorded: bool  # False: the record waits in the outbox (replayed later)
    outbox: OutboxState | None = None  # its outbox when it waits there
    # The manifest's trusted timestamp (memdump.timestamping): granted, or pending in the
    # queue; None when MEMDUMP_TSA_URL is unset.
    timestamp: timestamping.Stamp | None = None


@contextmanager
def resolved(
    settings: Settings, vm_id: str, hypervisor: str | None = None
) -> Iterator[tuple[Driver, VMRef]]:
    """VM ``vm_id`` (a plain or ``hypervisor:id`` id; ``hypervisor``: look only there) on
    the inventory, with its driver; the drivers opened to find it close at the end."""
    hvs = [settings.hypervisor(hypervisor)] if hypervisor else settings.inventory
    drivers = [open_driver(hv, settings.ssh) for hv in hvs]
    try:
        yield find(drivers, vm_id)
    finally:
        for d in drivers:
            d.close()


def run_chain(
    driver: Driver,
    ref: VMRef,
    settings: Settings,
    *,
    trigger: Mapping[str, str] | None = None,
    mode: Mode | None = None,
    slot: Slot | None = None,
    progress: ProgressFor | None = None,
) -> ChainResult:
    """Capture VM ``ref`` through ``driver``, then offload and record it. Raises the
    capture's errors as they are (the caller may retry a retryable one: nothing is
    kept), OffloadFailedError (the local file kept, no record) or RecordNotWrittenError
    (not even the outbox took it)."""
    # The signing key is loaded (made, on first use) before the guest is touched: a key
    # that cannot be read fails here, not after the dump, which would then be lost.
    signer = collector_signer(settings)
    threading.Thread(target=_preload, name="memdump-chain-preload", daemon=True).start()
    with slot(ref) if slot is not None else nullcontext():
        log.info("capturing %s on %s", ref.name, ref.hypervisor)
        captured = capture(
            driver,
            ref,
            settings,
            progress=progress(ref) if progress is not None else None,
            trigger=trigger,
            mode=mode,
            changes=lambda dump: since_previous(
                settings, ref.hypervisor, ref.vmid, dump
            ).manifest_section(),
            record_signature=recordsig.declaration(signer),
        )
    from memdump import custody

    _custody_captured(settings, captured, trigger)
    stamped = _stamp(settings, captured.record)
    record, obj = offload(with_changes(captured.record, captured.manifest), settings)
    if obj is not None:
        # The log's entries so far go beside the object too (memdump.custody).
        custody.record_event(
            settings,
            custody.targets(
                settings,
                local_dump=Path(captured.record.dump_path),
                s3_key=obj.key(settings.s3),
                manifest_sha256=record.manifest_sha256,
            ),
            "offloaded",
            {"uri": obj.where, "version_id": obj.version_id, "local_kept": bool(record.local_path)},
        )
    if stamped is not None:
        _stamped(settings, stamped, record, obj)
    # Signed now that every signed field is final (memdump.recordsig).
    record = recordsig.sign(record, signer)
    recorded, outbox = record_dump(record, settings)
    return ChainResult(captured, record, obj, recorded, outbox, stamped)


def _stamp(settings: Settings, record: DumpRecord) -> timestamping.Stamp | None:
    """The manifest's trusted timestamp (MEMDUMP_TSA_URL, memdump.timestamping): its token
    beside it before the offload takes it along, or the request queued. Never fails the
    capture."""
    if settings.tsa_url is None or not record.manifest_sha256:
        return None
    from memdump import timestamping

    mpath = manifest_path(Path(record.dump_path))
    return timestamping.stamp(settings, mpath, record.manifest_sha256)


def _stamped(
    settings: Settings, stamped: timestamping.Stamp, record: DumpRecord, obj: Location | None
) -> None:
    """A pending token goes where the manifest went (the S3 object); a granted one
    means the TSA is up: the tokens still pending are fetched now."""
    from memdump import timestamping

    try:
        queue = timestamping.TimestampQueue(timestamping.queue_path(settings))
        if stamped.status == "pending" and obj is not None:
            key = manifest_key(obj.key(settings.s3))
            queue.located(record.manifest_sha256, s3_key=key, local_kept=bool(record.local_path))
        elif stamped.status == "granted":
            timestamping.flush(settings)
    except Exception as exc:  # noqa: BLE001 - the capture is complete: a warning only
        log.warning("pending timestamps: %s", exc)


def _custody_captured(
    settings: Settings, captured: Capture, trigger: Mapping[str, str] | None
) -> None:
    """The log's first entries (memdump.custody): captured, then analysed. A failed
    append waits in the custody outbox; the capture goes on."""
    from memdump import custody

    rec = captured.record
    t = custody.targets(
        settings,
        local_dump=Path(rec.dump_path),
        s3_key=None,
        manifest_sha256=rec.manifest_sha256,
    )
    trig = dict(trigger or {})
    custody.record_event(
        settings,
        t,
        "captured",
        {
            "source": trig.get("source", ""),
            "run_id": trig.get("flow_run_id", ""),
            "trigger": trig,
            "collector_id": settings.collector_id,
            "hypervisor": rec.hypervisor,
            "vmid": rec.vmid,
            "dom": rec.dom,
            "dump": Path(rec.dump_path).name,
            "sha256": rec.sha256,
            "gz_sha256": rec.gz_sha256,
            "manifest_sha256": rec.manifest_sha256,
            "mode": captured.mode,
        },
    )
    analysis = captured.manifest.get("analysis")
    check = analysis if isinstance(analysis, Mapping) else {}
    custody.record_event(
        settings,
        t,
        "analysed",
        {
            "status": rec.analysis or str(check.get("status") or ""),
            "detail": str(check.get("detail") or "")[:500],
        },
    )


def with_changes(record: DumpRecord, doc: Mapping[str, Any]) -> DumpRecord:
    """The record with what its manifest says changed since the previous capture of the
    VM (its ``changes`` section, from memdump.changes): the same numbers in both."""
    changes = doc.get("changes")
    if not isinstance(changes, Mapping):
        return record
    previous = changes.get("previous") or {}
    return dataclasses.replace(
        record,
        chunks_changed=changes.get("chunks_changed"),
        chunks_compared_with=str(previous.get("dump_path") or ""),
        chunks_changed_reason=str(changes.get("reason") or ""),
    )


def offload(record: DumpRecord, settings: Settings) -> tuple[DumpRecord, Location | None]:
    """Upload the finished .mem.gz and its manifest to S3 (when configured) and verify
    them there, retrying a retryable S3 error ``offload_retries`` times. The local file
    is removed only after a verified upload and only if ``keep_local`` is off; then the
    record's dump_path is the s3:// URI. The record carries every location: the S3 URI
    and VersionId, and the local copy (cleared when it is removed here). A failed
    upload keeps the local file: OffloadFailedError, so no record ever claims an object
    that does not exist."""
    if settings.s3 is None:
        return record, None
    attempts = settings.orchestration.offload_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return _offload_once(record, settings)
        except Exception as exc:
            retryable = isinstance(exc, MemdumpError) and exc.retryable
            if not retryable or attempt == attempts:
                raise OffloadFailedError(
                    f"offload failed (local file kept): {exc}",
                    vm_id=record.vmid,
                    path=record.dump_path,
                    cause=type(exc).__name__,
                ) from exc
            log.warning(
                "offload of %s failed (attempt %d of %d), retrying: %s",
                record.vmid,
                attempt,
                attempts,
                exc,
            )
            time.sleep(settings.orchestration.capture_retry_delay_sec)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _offload_once(record: DumpRecord, settings: Settings) -> tuple[DumpRecord, Location]:
    from memdump.storage import S3Store
    from memdump.storage.s3 import iso_z

    s3 = settings.s3
    assert s3 is not None  # noqa: S101 - offload() returned before otherwise
    store = S3Store(s3)
    dump = Path(record.dump_path)
    obj = store.upload(dump, gz_sha256=record.gz_sha256, size=record.gzip_size_bytes)
    # The manifest goes beside the object (same key, .manifest.json), verified the same way.
    mpath = manifest_path(dump)
    if record.manifest_sha256:
        store.upload(mpath, gz_sha256=record.manifest_sha256, size=mpath.stat().st_size)
    # Its sidecars travel with it: the signature (<manifest key>.sig, memdump.signing) and
    # the trusted timestamp's token (.tsr, memdump.timestamping).
    sidecars = [mpath.with_name(mpath.name + suffix) for suffix in SIDECAR_SUFFIXES]
    for side in sidecars:
        if side.is_file():
            data = side.read_bytes()
            store.upload(side, gz_sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    where = Location("s3", obj.uri, version_id=obj.version_id or "")
    log.info("offloaded %s to %s (%d bytes)", record.vmid, obj.uri, obj.size)
    located = dataclasses.replace(
        record,
        s3_uri=where.where,
        s3_version_id=where.version_id,
        # The Object Lock the upload verified on the object (MEMDUMP_S3__OBJECT_LOCK_MODE).
        s3_lock_mode=obj.lock_mode or "",
        s3_lock_until=iso_z(obj.lock_retain_until) if obj.lock_retain_until else "",
    )
    if s3.keep_local:
        return located, where
    dump.unlink()
    mpath.unlink(missing_ok=True)
    for side in sidecars:
        side.unlink(missing_ok=True)
    return dataclasses.replace(located, dump_path=where.where, local_path="", collector=""), where


def record_dump(record: DumpRecord, settings: Settings) -> tuple[bool, OutboxState | None]:
    """Write the record; if the store cannot take it, it waits in the outbox (replayed by
    the runner and by later runs): (True, None) if stored,
    (False, the outbox's state) if queued. The capture is complete either way."""
    recorder = open_recorder(settings)
    try:
        if recorder.record(record):
            return True, None
    except Exception as exc:
        raise RecordNotWrittenError(
            f"record not written: {exc}", vm_id=record.vmid, path=record.dump_path
        ) from exc
    state = recorder.outbox.state()
    log.warning(
        "record store unavailable (%s): record of %s kept in the outbox (depth %d)",
        state.last_error,
        record.vmid,
        state.depth,
    )
    return False, state
