"""Capture one VM: snapshot -> dump -> stream into a verified .mem.gz -> a DumpRecord.

Two capture modes (issue 12): "paused", the hypervisor's dump (the guest is stopped for
the whole dump), and "live", QEMU's background-snapshot migration turned into the same ELF
core on the collector (memdump.livecore; the guest pauses for milliseconds). The mode is
``mode`` if given (`memdump capture --mode`), else the hypervisor's ``capture_mode``, else
``Settings.capture_mode``. A live capture the driver finds it cannot do
(LiveCaptureUnsupportedError, before the guest is touched) or a driver without a live
mode is captured paused instead, never silently: a warning, and the reason in the
manifest (``capture.fallback_reason``) and the record (``live_fallback_reason``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from memdump import manifest, volatility
from memdump.analysis import analyze
from memdump.bannerscan import BannerScan
from memdump.chunkedgz import index_hint
from memdump.errors import (
    InsufficientSpaceError,
    LiveCaptureUnsupportedError,
    MemdumpError,
    VMNotRunningError,
)
from memdump.fsperm import private_dir
from memdump.hypervisors import Driver, VMInfo, VMRef
from memdump.locations import dump_name
from memdump.pipeline import DumpSource, PipelineResult, ProgressFn, write_dump
from memdump.records.model import DumpRecord
from memdump.settings import HypervisorConfig, Settings

Mode = Literal["paused", "live"]
# The finished dump -> the manifest's "changes" section (memdump.changes, via the chain).
ChangesFn = Callable[[Path], Mapping[str, Any]]
log = logging.getLogger("memdump.capture")
LIVE_FORMAT = "memdump.livecore, from a QEMU background-snapshot migration stream"


@dataclass(frozen=True)
class Capture:
    record: DumpRecord
    info: VMInfo
    pipeline: PipelineResult
    manifest: dict[str, Any]
    mode: Mode = "paused"  # the mode used
    mode_requested: Mode = "paused"
    fallback_reason: str = ""  # why a requested live capture was taken paused


def capture_mode(settings: Settings, hypervisor: str, hv: HypervisorConfig | None = None) -> Mode:
    """The configured mode for a hypervisor's VMs: its inventory entry's ``capture_mode``
    (``hv``, else the entry named ``hypervisor``), else the global one."""
    if hv is None:
        hv = next((h for h in settings.inventory if h.name == hypervisor), None)
    return (hv.capture_mode if hv is not None else None) or settings.capture_mode


def has_live_mode(driver: Driver) -> bool:
    """Whether the driver's open_dump takes a capture ``mode`` (drivers gain live mode one
    by one; one that does not know the argument has none)."""
    try:
        params = inspect.signature(driver.open_dump).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False
    return any(p.name == "mode" or p.kind is p.VAR_KEYWORD for p in params)


def _unsupported(exc: BaseException) -> LiveCaptureUnsupportedError | None:
    """The LiveCaptureUnsupportedError behind ``exc``, if any: the converter may report the
    driver's refusal as the cause of its own error (a stream that ended before it began)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, LiveCaptureUnsupportedError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def capture(
    driver: Driver,
    ref: VMRef,
    settings: Settings,
    *,
    progress: ProgressFn | None = None,
    trigger: Mapping[str, str] | None = None,
    mode: Mode | None = None,
    hv: HypervisorConfig | None = None,
    changes: ChangesFn | None = None,
    record_signature: Mapping[str, str] | None = None,
) -> Capture:
    """``trigger``: what started the capture (``source``: api, schedule, cli; and the
    orchestrator's run id), recorded in the manifest. ``mode``: "paused" or "live",
    overriding the configured one (capture_mode); ``hv``: the driver's inventory entry
    (else found by ``ref.hypervisor``). ``changes``: given the finished dump, the
    manifest's ``changes`` section (the capture chain's comparison with the previous
    capture, memdump.changes), written with the rest of the manifest.
    ``record_signature``: the manifest's statement that the record will be signed, and by
    which key (memdump.recordsig.declaration; the chain's, which signs every record)."""
    requested: Mode = mode or capture_mode(settings, ref.hypervisor, hv)
    if settings.analysis.enabled:
        # Volatility's import (~0.3 s, mostly Python) overlaps the dump instead of
        # following it: the check right after the capture then only stacks and reads.
        threading.Thread(
            target=_preload_volatility, name="memdump-vol-preload", daemon=True
        ).start()
    # A live capture's preflight (read-only) runs while the snapshot is taken: one remote
    # command fewer on the way to the snapshot instant (about 0.35 s on the lab).
    preflight = _Preflight.start(driver, ref) if requested == "live" else None
    try:
        once = functools.partial(
            _capture_once, changes=changes, preflight=preflight, record_signature=record_signature
        )
        return _capture(driver, ref, settings, requested, preflight, progress, trigger, once)
    finally:
        if preflight is not None:
            preflight.wait()  # never left running on a transport the caller closes


def _capture(
    driver: Driver,
    ref: VMRef,
    settings: Settings,
    requested: Mode,
    preflight: _Preflight | None,
    progress: ProgressFn | None,
    trigger: Mapping[str, str] | None,
    once: Callable[..., Capture],
) -> Capture:
    info = driver.snapshot(ref)
    if not info.running:
        raise VMNotRunningError(
            f"VM {ref.name} on {ref.hypervisor} is {info.state}, not running",
            vm_id=ref.vmid,
            hypervisor=ref.hypervisor,
            state=info.state,
        )
    _check_space(settings, info)
    # One deadline for the whole capture, a fallback included.
    deadline = time.monotonic() + settings.capture_timeout_sec
    reason = ""
    if requested == "live":
        kind = str(getattr(driver, "kind", type(driver).__name__))
        if not has_live_mode(driver):
            reason = f"driver {kind} has no live mode"
        elif short := _live_space_shortfall(settings, info):
            reason = short
        else:
            try:
                return once(driver, ref, settings, info, "live", deadline, progress, trigger)
            except MemdumpError as exc:
                refused = _unsupported(exc)
                if refused is None:
                    raise
                reason = str(refused.fields.get("reason") or refused)
        log.warning(
            "live capture of %s on %s not possible (%s): capturing it paused",
            ref.name,
            ref.hypervisor,
            reason,
        )
    return once(
        driver, ref, settings, info, "paused", deadline, progress, trigger, requested, reason
    )


class _Preflight:
    """A driver's ``live_preflight(ref)`` on a thread of its own; ``result()`` gives what
    it returned or raises what it raised. Only for drivers whose ``open_dump`` takes the
    result (``preflight=``): the others make their own."""

    def __init__(self, driver: Driver, ref: VMRef) -> None:
        self._fn: Callable[[VMRef], Any] = getattr(driver, "live_preflight")  # noqa: B009
        self._ref = ref
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="memdump-preflight", daemon=True)

    @classmethod
    def start(cls, driver: Driver, ref: VMRef) -> _Preflight | None:
        if not has_live_mode(driver) or not callable(getattr(driver, "live_preflight", None)):
            return None
        try:
            params = inspect.signature(driver.open_dump).parameters
        except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
            return None
        if "preflight" not in params:
            return None
        pre = cls(driver, ref)
        pre._thread.start()
        return pre

    def _run(self) -> None:
        try:
            self._value = self._fn(self._ref)
        except BaseException as exc:  # handed to the capture's thread by result()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _preload_volatility() -> None:
    # Errors are the check's to report (memdump.analysis calls load() again).
    with contextlib.suppress(Exception):
        volatility.load()


def _capture_once(
    driver: Driver,
    ref: VMRef,
    settings: Settings,
    info: VMInfo,
    mode: Mode,
    deadline: float,
    progress: ProgressFn | None,
    trigger: Mapping[str, str] | None,
    requested: Mode | None = None,
    fallback_reason: str = "",
    *,
    changes: ChangesFn | None = None,
    preflight: _Preflight | None = None,
    record_signature: Mapping[str, str] | None = None,
) -> Capture:
    started = datetime.now(UTC)
    t0 = time.monotonic()
    # hypervisor + vmid + microsecond time + random: two collectors capturing pve1:100 and
    # pve2:100 in the same second never share a file name or an S3 key.
    filename = dump_name(ref.hypervisor, ref.vmid, started)
    dump_dir = settings.dump_dir.resolve()
    source: DumpSource
    if mode == "live":
        # Pages the guest wrote ahead of QEMU's sweep wait in memory, then in a 0600 temp
        # file in the (0700) dump directory.
        # Any signature: has_live_mode() checked that this driver takes the mode.
        open_live: Callable[..., DumpSource] = driver.open_dump
        # The preflight's refusal (LiveCaptureUnsupportedError) is raised here, as the
        # driver's open_dump would raise it.
        extra = {} if preflight is None else {"preflight": preflight.result()}
        source = open_live(
            ref,
            **extra,
            staging=settings.staging,
            margin=settings.disk_space_margin,
            mode="live",
            spill_dir=dump_dir,
            buffer_bytes=settings.live_buffer_bytes,
            max_bandwidth=settings.live_max_bandwidth_bytes,
        )
    else:
        source = driver.open_dump(ref, staging=settings.staging, margin=settings.disk_space_margin)
    # The check's banners are looked for in the stream as it passes (memdump.bannerscan).
    check_banners = settings.analysis.enabled and settings.analysis.banners
    scan = BannerScan() if check_banners else None
    result = write_dump(
        source,
        dump_dir,
        filename,
        level=settings.compression_level,
        chunk_size=settings.chunk_size,
        threads=settings.compression_workers,
        scan=scan,
        progress=progress,
        deadline=deadline,
    )
    duration = round(time.monotonic() - t0, 3)
    ended = datetime.now(UTC)
    # The comparison with the previous capture reads the new file's index and the record
    # store: beside the check, not after it (both only read the finished file).
    changed: Future[Mapping[str, Any]] | None = None
    if changes is not None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="memdump-changes")
        changed = pool.submit(changes, result.path)
        pool.shutdown(wait=False)  # its one task still runs; the thread ends with it
    # After the guest runs again: the check reads the finished file, not the stream. The
    # index as written goes with it (chunkedgz.index_hint): its Merkle root is checked
    # against the file's without hashing again the runs of chunks the two share.
    with index_hint(result.path, result.chunks):
        analysis = (
            analyze(
                result.path,
                samples=settings.analysis.samples,
                banners=settings.analysis.banners,
                work_dir=settings.analysis.work_dir,
                stream_scan=scan,
                hashed_as_written=True,
            )
            if settings.analysis.enabled
            else None
        )
    pause_window = getattr(source, "pause_window", None)
    live = dict(getattr(source, "live", None) or {}) if mode == "live" else None
    dump_format = str(getattr(source, "dump_format", "elf"))
    if mode == "live" and not dump_format.startswith("ELF64 core"):
        dump_format = f"ELF64 core: {LIVE_FORMAT}"
    doc = manifest.build(
        info,
        result,
        started=started,
        ended=ended,
        pause_window=pause_window,
        dump_format=dump_format,
        staging=getattr(source, "staging", "fifo"),
        compression=(
            f"gzip (ISA-L level {settings.compression_level}), "
            f"{settings.chunk_size}-byte chunks, one member each"
        ),
        trigger=trigger,
        analysis=analysis.to_dict() if analysis else None,
        driver=getattr(driver, "kind", type(driver).__name__),
        mode=mode,
        mode_requested=requested or mode,
        fallback_reason=fallback_reason or None,
        live=live,
    )
    if changes is not None:
        assert changed is not None  # noqa: S101 - submitted above
        doc["changes"] = dict(changed.result())
    if record_signature is not None:
        # Signed with the manifest: a record stripped of its signature in the store is
        # then caught by verify, not taken for an older, unsigned one.
        doc["record_signature"] = dict(record_signature)
    try:
        _, manifest_sha = manifest.write(result.path, doc, settings=settings)  # signed
    except MemdumpError:
        # A dump without its manifest is not evidence we can stand behind: nothing kept.
        result.path.unlink(missing_ok=True)
        raise
    st = os.stat(result.path)
    record = DumpRecord(
        timestamp=started,
        dom=ref.name,
        vmid=ref.vmid,
        sha256=result.raw_sha256,
        duration_sec=duration,
        gzip_size_bytes=result.gz_bytes,
        ctime=int(st.st_ctime),
        mtime=int(st.st_mtime),
        atime=int(st.st_atime),
        dump_path=str(result.path),
        gz_sha256=result.gz_sha256,
        raw_size_bytes=result.raw_bytes,
        hypervisor=ref.hypervisor,
        manifest_sha256=manifest_sha,
        analysis=analysis.status if analysis else "skipped",
        collector=settings.collector_id,
        local_path=str(result.path),
        capture_mode=mode,
        live_fallback_reason=fallback_reason,
        pause_ms=doc["capture"]["pause_ms"],
    )
    return Capture(record, info, result, doc, mode, requested or mode, fallback_reason)


def _live_space_shortfall(settings: Settings, info: VMInfo) -> str:
    """Why dump_dir cannot take a live capture ("" if it can). Besides the image, the
    converter may hold up to the guest's whole memory in its spill file there: QEMU's
    sweep restarts at every page the guest writes during the capture (ram.c,
    ram_find_and_save_block), so a busy guest's pages mostly arrive out of order."""
    dump_dir = settings.dump_dir.resolve()
    free = shutil.disk_usage(dump_dir).free
    need = int(info.memory_bytes * settings.disk_space_margin) + info.memory_bytes
    if free >= need:
        return ""
    return (
        f"not enough space in {dump_dir} for a live capture: {free} bytes free, {need} "
        f"needed (the image, {info.memory_bytes} bytes of memory x "
        f"{settings.disk_space_margin}, plus as much again for the converter's spill file)"
    )


def _check_space(settings: Settings, info: VMInfo) -> None:
    """Fail before the guest is paused, not halfway through its dump."""
    dump_dir = settings.dump_dir.resolve()
    private_dir(dump_dir)
    free = shutil.disk_usage(dump_dir).free
    need = int(info.memory_bytes * settings.disk_space_margin)
    if free < need:
        raise InsufficientSpaceError(
            f"not enough space in {dump_dir} for {info.ref.name}: {free} bytes free, "
            f"{need} needed ({info.memory_bytes} bytes of memory x "
            f"{settings.disk_space_margin})",
            path=str(dump_dir),
            free_bytes=free,
            needed_bytes=need,
            vm_id=info.ref.vmid,
        )
