"""Capture one VM: snapshot -> dump -> stream into a verified .mem.gz -> a DumpRecord."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from memdump import manifest
from memdump.analysis import analyze
from memdump.errors import InsufficientSpaceError, MemdumpError, VMNotRunningError
from memdump.fsperm import private_dir
from memdump.hypervisors import Driver, VMInfo, VMRef
from memdump.locations import dump_name
from memdump.pipeline import PipelineResult, ProgressFn, write_dump
from memdump.records.model import DumpRecord
from memdump.settings import Settings


@dataclass(frozen=True)
class Capture:
    record: DumpRecord
    info: VMInfo
    pipeline: PipelineResult
    manifest: dict[str, Any]


def capture(
    driver: Driver,
    ref: VMRef,
    settings: Settings,
    *,
    progress: ProgressFn | None = None,
    trigger: Mapping[str, str] | None = None,
) -> Capture:
    """``trigger``: what started the capture (``source``: api, schedule, cli; and the
    orchestrator's run id), recorded in the manifest."""
    info = driver.snapshot(ref)
    if not info.running:
        raise VMNotRunningError(
            f"VM {ref.name} on {ref.hypervisor} is {info.state}, not running",
            vm_id=ref.vmid,
            hypervisor=ref.hypervisor,
            state=info.state,
        )
    _check_space(settings, info)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    deadline = t0 + settings.capture_timeout_sec
    # hypervisor + vmid + microsecond time + random: two collectors capturing pve1:100 and
    # pve2:100 in the same second never share a file name or an S3 key.
    filename = dump_name(ref.hypervisor, ref.vmid, started)
    source = driver.open_dump(ref, staging=settings.staging, margin=settings.disk_space_margin)
    result = write_dump(
        source,
        settings.dump_dir.resolve(),
        filename,
        level=settings.compression_level,
        progress=progress,
        deadline=deadline,
    )
    duration = round(time.monotonic() - t0, 3)
    ended = datetime.now(UTC)
    # After the guest runs again: the check reads the finished file, not the stream.
    analysis = (
        analyze(
            result.path,
            samples=settings.analysis_samples,
            banners=settings.analysis_banners,
            work_dir=settings.analysis_work_dir,
        )
        if settings.analysis
        else None
    )
    doc = manifest.build(
        info,
        result,
        started=started,
        ended=ended,
        pause_window=getattr(source, "pause_window", None),
        dump_format=getattr(source, "dump_format", "elf"),
        staging=getattr(source, "staging", "fifo"),
        compression=f"gzip (ISA-L level {settings.compression_level})",
        trigger=trigger,
        analysis=analysis.to_dict() if analysis else None,
        driver=getattr(driver, "kind", type(driver).__name__),
    )
    try:
        _, manifest_sha = manifest.write(result.path, doc)
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
    )
    return Capture(record, info, result, doc)


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
