"""The chain-of-custody manifest written beside every dump (``<name>.manifest.json``).

It says what was captured (VM identity and definition digest), from where (hypervisor,
its verified SSH host key, versions), how and when (format, staging, the guest's pause
window, start and end, what triggered it) and what came out (both hashes, both sizes,
the analysis result). The record carries the manifest's own SHA-256, so a manifest
edited later no longer matches its record (memdump.verify).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from memdump import __version__
from memdump.errors import StorageError
from memdump.hypervisors.base import VMInfo
from memdump.pipeline import PipelineResult
from memdump.records.model import iso_utc

MANIFEST_VERSION = 1
SUFFIX = ".manifest.json"


def manifest_path(dump: Path) -> Path:
    """``101_1699520400.mem.gz`` -> ``101_1699520400.manifest.json`` (same directory)."""
    name = dump.name.removesuffix(".gz").removesuffix(".mem")
    return dump.with_name(name + SUFFIX)


def manifest_key(dump_key: str) -> str:
    """The same naming for an object key (S3: the manifest sits beside the object)."""
    head, _, name = dump_key.rpartition("/")
    stem = name.removesuffix(".gz").removesuffix(".mem")
    return f"{head}/{stem}{SUFFIX}" if head else stem + SUFFIX


def _ts(value: datetime | None) -> str | None:
    return None if value is None else iso_utc(value) + "Z"


def build(
    info: VMInfo,
    result: PipelineResult,
    *,
    started: datetime,
    ended: datetime,
    pause_window: tuple[datetime, datetime] | None,
    dump_format: str,
    staging: str,
    compression: str,
    trigger: Mapping[str, str] | None,
    analysis: Mapping[str, Any] | None,
    driver: str,
) -> dict[str, Any]:
    paused, resumed = pause_window if pause_window else (None, None)
    window = None
    if pause_window:
        window = round((pause_window[1] - pause_window[0]).total_seconds(), 3)
    return {
        "manifest_version": MANIFEST_VERSION,
        "memdump_version": __version__,
        "vm": {
            "name": info.ref.name,
            "vmid": info.ref.vmid,
            "uuid": info.uuid,
            "domain_id": info.domain_id,
            "state_before": info.state,
            "memory_bytes": info.memory_bytes,
            "domain_xml_sha256": info.domain_xml_sha256,
        },
        "hypervisor": {
            "name": info.ref.hypervisor,
            "driver": driver,
            "host": info.hypervisor_host,
            "ssh_host_key": info.host_key,
            "versions": dict(info.versions),
        },
        "capture": {
            "format": dump_format,
            "staging": staging,
            "started_at": _ts(started),
            "ended_at": _ts(ended),
            "duration_sec": round((ended - started).total_seconds(), 3),
            # Measured by the hypervisor-side script around the dump tool (its clock): the
            # guest was paused inside this window, so it bounds the downtime from outside.
            "guest_paused_at": _ts(paused),
            "guest_resumed_at": _ts(resumed),
            "pause_window_sec": window,
            "trigger": dict(trigger or {}),
        },
        "output": {
            "file": result.path.name,
            "raw_sha256": result.raw_sha256,
            "raw_bytes": result.raw_bytes,
            "gz_sha256": result.gz_sha256,
            "gz_bytes": result.gz_bytes,
            "compression": compression,
        },
        "analysis": dict(analysis) if analysis is not None else {"status": "skipped"},
    }


def encode(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes written and hashed (stable key order, UTF-8, final newline)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write(dump: Path, manifest: Mapping[str, Any]) -> tuple[Path, str]:
    """Write the manifest beside ``dump`` (0600, never over an existing one, on disk
    before returning); returns its path and SHA-256."""
    data = encode(manifest)
    path = manifest_path(dump)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(
            f"cannot write manifest {path}: {exc.strerror or exc}", path=str(path), errno=exc.errno
        ) from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise StorageError(
            f"cannot write manifest {path}: {exc.strerror or exc}", path=str(path), errno=exc.errno
        ) from exc
    os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path, hashlib.sha256(data).hexdigest()
