"""Capture one VM: snapshot -> dump -> stream into a verified .mem.gz -> a DumpRecord."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from memdump.errors import InsufficientSpaceError, VMNotRunningError
from memdump.hypervisors import Driver, VMInfo, VMRef
from memdump.pipeline import PipelineResult, ProgressFn, write_dump
from memdump.records.model import DumpRecord
from memdump.settings import Settings


@dataclass(frozen=True)
class Capture:
    record: DumpRecord
    info: VMInfo
    pipeline: PipelineResult


def capture(
    driver: Driver,
    ref: VMRef,
    settings: Settings,
    *,
    progress: ProgressFn | None = None,
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
    started = datetime.now(UTC)
    t0 = time.monotonic()
    deadline = t0 + settings.capture_timeout_sec
    filename = f"{ref.vmid}_{int(started.timestamp())}.mem.gz"
    result = write_dump(
        driver.open_dump(ref),
        settings.dump_dir.resolve(),
        filename,
        level=settings.compression_level,
        progress=progress,
        deadline=deadline,
    )
    duration = round(time.monotonic() - t0, 3)
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
    )
    return Capture(record, info, result)


def _check_space(settings: Settings, info: VMInfo) -> None:
    """Fail before the guest is paused, not halfway through its dump."""
    dump_dir = settings.dump_dir.resolve()
    dump_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
