"""The chain-of-custody manifest written beside every dump (``<name>.manifest.json``).

It says what was captured (VM identity and definition digest), from where (hypervisor,
its verified SSH host key, versions), how and when (format, staging, the guest's pause
window, start and end, what triggered it) and what came out (both hashes, both sizes,
the analysis result). The record carries the manifest's own SHA-256, so a manifest
edited later no longer matches its record (memdump.verify).

Version 2 (issue 12) adds to ``capture``: ``mode_requested`` and ``mode`` ("paused" or
"live"), ``fallback_reason`` (why a requested live capture fell back to paused, else
null), ``pause_ms`` (the guest's measured pause) and ``live`` (null unless the mode used
was live: the acquisition hash of the migration stream and what QEMU reported, see
live_section). Version 1 manifests stay valid as written: they are read as paused
captures (``capture_summary``), and verification reads only ``output`` in both.

Captures through the chain (memdump.chain) also carry ``changes``: how many chunks differ
from the previous capture of the same VM, or why that is not known (memdump.changes,
``Changes.manifest_section``), added by memdump.capture before the manifest is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from memdump import __version__
from memdump.errors import StorageError
from memdump.records.model import iso_utc

if TYPE_CHECKING:  # types only: memdump.stored (`memdump diff`) needs no capture stack
    from memdump.hypervisors.base import VMInfo
    from memdump.pipeline import PipelineResult
    from memdump.settings import Settings

MANIFEST_VERSION = 3  # 3: output.chunks (the chunked .mem.gz)
SUFFIX = ".manifest.json"
# Files beside the manifest (<manifest>.sig, <manifest>.tsr) that travel with it to S3 and
# go with the dump: named here once for the writers (memdump.signing, memdump.timestamping)
# and for what moves, reads, locks and deletes them (memdump.chain, memdump.stored).
SIG_SUFFIX = ".sig"  # its signature (memdump.signing)
TSR_SUFFIX = ".tsr"  # its RFC 3161 timestamp token (memdump.timestamping)
SIDECAR_SUFFIXES = (SIG_SUFFIX, TSR_SUFFIX)


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


Mode = Literal["paused", "live"]


def _json_safe(value: Any) -> Any:
    """What a driver or the converter reports, as plain JSON (datetimes as ISO 8601 UTC)."""
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _first(live: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present in ``live`` or in QEMU's final query-migrate answer
    the driver passed along (``stats``)."""
    stats = live.get("stats")
    for key in keys:
        if live.get(key) is not None:
            return live[key]
        if isinstance(stats, Mapping) and stats.get(key) is not None:
            return stats[key]
    return None


def live_section(
    live: Mapping[str, Any], pause_window: tuple[datetime, datetime] | None
) -> dict[str, Any]:
    """``capture.live`` of a live capture, from memdump.livecore.LiveCoreSource.live (the
    converter's stream hash, size and page counts, and the driver's live stats: QEMU's
    final ``query-migrate``, the userfaultfd method, libvirt's taint).

    ``acquisition_sha256`` is the SHA-256 of the migration stream as QEMU wrote it, the
    bytes acquired from the hypervisor; ``output.raw_sha256`` is that of the ELF core made
    from them. Everything the converter and the driver reported is kept under
    ``details`` as they gave it."""
    window = None
    if pause_window:
        window = {"from": _ts(pause_window[0]), "to": _ts(pause_window[1])}
    downtime = _first(live, "downtime_ms", "downtime")
    return {
        "acquisition_sha256": live.get("stream_sha256"),
        "stream_bytes": live.get("stream_bytes"),
        "pages": _json_safe(live.get("pages") or {}),
        # QEMU's measure of the guest's pause (query-migrate "downtime"), milliseconds.
        "downtime_ms": downtime,
        # The same pause from QEMU's STOP and RESUME events, where the driver saw them.
        "pause_ms_events": _first(live, "pause_ms_events"),
        # The instant the image shows: when QEMU stopped the vCPUs to arm write tracking.
        "snapshot_at": _json_safe(_first(live, "snapshot_at", "snapshot_instant")),
        "setup_ms": _first(live, "setup_ms", "setup_time_ms", "setup-time"),
        "total_ms": _first(live, "total_ms", "total_time_ms", "total-time"),
        "userfaultfd": _first(live, "userfaultfd"),
        "userfaultfd_window_ms": _first(live, "userfaultfd_window_ms"),
        "taint": _json_safe(_first(live, "taint", "tainted")),
        # The drivers' window on the hypervisor's clock: from just before `migrate` until
        # QEMU resumed the guest; its pause (downtime_ms) lies inside.
        "pause_window": window,
        "details": _json_safe(live),
    }


def pause_ms(
    mode: Mode, live: Mapping[str, Any] | None, pause_window: tuple[datetime, datetime] | None
) -> float | None:
    """The guest's measured pause: live, QEMU's downtime; paused, the script's window
    around the dump (the guest was stopped inside it). None when unknown."""
    if mode == "live":
        value = _first(live or {}, "downtime_ms", "downtime")
        return None if value is None else round(float(value), 3)
    if pause_window:
        return round((pause_window[1] - pause_window[0]).total_seconds() * 1000, 3)
    return None


def capture_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The capture mode of a manifest of any version: a version 1 manifest (before live
    capture existed) is a paused capture with no fallback."""
    cap = manifest.get("capture") or {}
    if int(manifest.get("manifest_version", 1)) < 2:
        return {"mode_requested": "paused", "mode": "paused", "fallback_reason": None}
    return {k: cap.get(k) for k in ("mode_requested", "mode", "fallback_reason")}


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
    mode: Mode = "paused",
    mode_requested: Mode = "paused",
    fallback_reason: str | None = None,
    live: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``mode``: the capture mode used; ``mode_requested``: the one asked for (they differ
    after a fallback, whose ``fallback_reason`` says why); ``live``: the converter's
    ``live`` dict of a live capture."""
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
            # Live: from just before `migrate` until QEMU resumed the guest (pause_ms inside).
            "guest_paused_at": _ts(paused),
            "guest_resumed_at": _ts(resumed),
            "pause_window_sec": window,
            "trigger": dict(trigger or {}),
            "mode_requested": mode_requested,
            "mode": mode,
            "fallback_reason": fallback_reason,
            "pause_ms": pause_ms(mode, live, pause_window),
            "live": live_section(live or {}, pause_window) if mode == "live" else None,
        },
        "output": {
            "file": result.path.name,
            "raw_sha256": result.raw_sha256,
            "raw_bytes": result.raw_bytes,
            "gz_sha256": result.gz_sha256,
            "gz_bytes": result.gz_bytes,
            "compression": compression,
            # The chunked .mem.gz's index (memdump.chunkedgz): what `verify` checks the
            # file's own trailer and index against.
            "chunks": result.chunks.summary(),
        },
        "analysis": dict(analysis) if analysis is not None else {"status": "skipped"},
    }


def encode(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes written and hashed (stable key order, UTF-8, final newline)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write(
    dump: Path, manifest: Mapping[str, Any], *, settings: Settings | None = None
) -> tuple[Path, str]:
    """Write the manifest beside ``dump`` (0600, never over an existing one, on disk
    before returning); returns its path and SHA-256. With ``settings``, it is signed by
    the collector's key (memdump.signing): the envelope beside it (``.sig``, 0600, never
    over an existing one). The key is loaded before anything is written, and a manifest
    whose signature could not be written is removed (StorageError): no half-signed
    evidence."""
    signer = None
    if settings is not None:
        from memdump import signing

        signer = signing.collector_signer(settings)
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
    digest = hashlib.sha256(data).hexdigest()
    if signer is not None:
        from memdump import signing

        # What was written, as a reader parses it back: the bytes a verifier canonicalises.
        doc = json.loads(data)
        env = signing.envelope(doc, signer, file=path.name, manifest_sha256=digest)
        try:
            signing.write_signature(path, env)
        except StorageError:
            path.unlink(missing_ok=True)
            raise
    return path, digest
