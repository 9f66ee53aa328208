"""The manifest's capture section (issue 12, item 4): version 2 says which mode was asked
for and used, why a live capture fell back, the measured pause, and for a live capture
the acquisition hash of the migration stream beside the ELF's. Version 1 manifests, as
memdump wrote them before, stay readable and verify."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memdump import chunkedgz, manifest
from memdump.capture import capture
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.pipeline import PipelineResult
from memdump.records.model import DumpRecord
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.capture_modes import REF, LiveDriver
from tests.helpers.signing import trusting

T0 = datetime(2026, 11, 29, 4, 0, tzinfo=UTC)
INFO = VMInfo(VMRef("lab", "vm-1", "vm-1"), "uuid", "1", "running", 1 << 20, "host")


def result(tmp_path: Path) -> PipelineResult:
    builder = chunkedgz.IndexBuilder(chunkedgz.DEFAULT_CHUNK_SIZE)
    builder.add(chunkedgz.data_member(0, bytes(10), 1))
    _, index = builder.finish()
    return PipelineResult(tmp_path / "x.mem.gz", 10, "a" * 64, 5, "b" * 64, index)


def build(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return manifest.build(
        INFO,
        result(tmp_path),
        started=T0,
        ended=T0 + timedelta(seconds=2),
        pause_window=(T0, T0 + timedelta(seconds=1.5)),
        dump_format="ELF64 core: test",
        staging="fifo",
        compression="gzip",
        trigger={"source": "cli"},
        analysis=None,
        driver="libvirt",
        **kw,
    )


def test_paused_section(tmp_path: Path) -> None:
    c = build(tmp_path)["capture"]
    assert (c["mode_requested"], c["mode"], c["fallback_reason"], c["live"]) == (
        "paused",
        "paused",
        None,
        None,
    )
    assert c["pause_ms"] == 1500.0 and c["pause_window_sec"] == 1.5


def test_fallback_section(tmp_path: Path) -> None:
    doc = build(tmp_path, mode_requested="live", fallback_reason="QEMU 5.2 is older than 6.0")
    c = doc["capture"]
    assert (c["mode_requested"], c["mode"]) == ("live", "paused")
    assert c["fallback_reason"] == "QEMU 5.2 is older than 6.0" and c["live"] is None
    assert manifest.capture_summary(doc) == {
        "mode_requested": "live",
        "mode": "paused",
        "fallback_reason": "QEMU 5.2 is older than 6.0",
    }


def test_live_section_from_flat_fields_and_json_safe(tmp_path: Path) -> None:
    live = {
        "stream_sha256": "c" * 64,
        "stream_bytes": 1234,
        "pages": {"normal": 2},
        "downtime_ms": 3.25,
        "setup_ms": 1,
        "total_ms": 400,
        "snapshot_at": T0,
        "userfaultfd": "root",
        "taint": "custom-monitor",
        "odd": object(),  # whatever a driver adds is kept, as text if not JSON
    }
    doc = build(tmp_path, mode="live", mode_requested="live", live=live)
    json.loads(manifest.encode(doc))  # encodable
    c = doc["capture"]
    assert c["pause_ms"] == 3.25
    sec = c["live"]
    assert sec["acquisition_sha256"] == "c" * 64 and sec["stream_bytes"] == 1234
    assert sec["downtime_ms"] == 3.25 and (sec["setup_ms"], sec["total_ms"]) == (1, 400)
    assert sec["snapshot_at"] == "2026-11-29T04:00:00.000000Z"
    assert sec["userfaultfd"] == "root" and sec["taint"] == "custom-monitor"
    assert sec["userfaultfd_window_ms"] is None  # root: no window
    assert sec["details"]["odd"].startswith("<object")


def test_live_section_from_query_migrate_stats(tmp_path: Path) -> None:
    # A driver that passes QEMU's final query-migrate answer as it came.
    stats = {"status": "completed", "downtime": 9, "setup-time": 3, "total-time": 700}
    doc = build(tmp_path, mode="live", mode_requested="live", live={"stats": stats})
    sec = doc["capture"]["live"]
    assert (sec["downtime_ms"], sec["setup_ms"], sec["total_ms"]) == (9, 3, 700)
    assert doc["capture"]["pause_ms"] == 9.0


def test_live_without_a_measured_pause(tmp_path: Path) -> None:
    doc = build(tmp_path, mode="live", mode_requested="live", live={"stream_sha256": "d" * 64})
    assert doc["capture"]["pause_ms"] is None  # unknown, not the migration window
    assert doc["capture"]["live"]["downtime_ms"] is None


# -- version 1 manifests ---------------------------------------------------------------

V1_CAPTURE = {
    "format": "ELF64 core: virsh dump --memory-only --format elf",
    "staging": "fifo",
    "started_at": "2026-11-01T10:00:00.000000Z",
    "ended_at": "2026-11-01T10:00:03.000000Z",
    "duration_sec": 3.0,
    "guest_paused_at": "2026-11-01T10:00:00.100000Z",
    "guest_resumed_at": "2026-11-01T10:00:02.900000Z",
    "pause_window_sec": 2.8,
    "trigger": {"source": "schedule"},
}


def stored_v1(dump_dir: Path) -> DumpRecord:
    """A dump and its manifest exactly as memdump wrote them before version 2."""
    dump_dir.mkdir(mode=0o700)
    raw = b"\x7fELF" + bytes(4092)
    path = dump_dir / "lab_vm-1_20261101T100000.000000Z_abcdef.mem.gz"
    path.write_bytes(gzip.compress(raw))
    gz = path.read_bytes()
    doc = {
        "manifest_version": 1,
        "memdump_version": "0.1.0",
        "vm": {"name": "vm-1", "vmid": "vm-1"},
        "hypervisor": {"name": "lab", "driver": "libvirt"},
        "capture": V1_CAPTURE,
        "output": {
            "file": path.name,
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
            "raw_bytes": len(raw),
            "gz_sha256": hashlib.sha256(gz).hexdigest(),
            "gz_bytes": len(gz),
            "compression": "gzip (ISA-L level 1)",
        },
        "analysis": {"status": "skipped"},
    }
    _, msha = manifest.write(path, doc)
    return DumpRecord(
        datetime(2026, 11, 1, 10, tzinfo=UTC), "vm-1", "vm-1", hashlib.sha256(raw).hexdigest(),
        3.0, len(gz), 1, 2, 3, str(path), hashlib.sha256(gz).hexdigest(), len(raw), "lab",
        manifest_sha256=msha,
    )  # fmt: skip


def test_version_1_manifest_still_verifies_and_reads_as_paused(tmp_path: Path) -> None:
    rec = stored_v1(tmp_path / "dumps")
    v = verify(rec.api_dict(), Settings(dump_dir=tmp_path / "dumps"))
    # Issue 15: an older, unsigned manifest is `unsigned`, every hash still matching.
    assert v.status == "unsigned", v.detail
    assert v.signature is not None and v.signature["status"] == "unsigned"
    assert v.checks["manifest_sha256"]["ok"] and v.checks["sha256"]["ok"]
    doc = json.loads(manifest.manifest_path(Path(rec.dump_path)).read_bytes())
    assert manifest.capture_summary(doc) == {
        "mode_requested": "paused",
        "mode": "paused",
        "fallback_reason": None,
    }


def test_version_2_live_manifest_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    s = Settings(dump_dir=tmp_path / "dumps", analysis={"enabled": False}, capture_mode="live")
    s = trusting(s, tmp_path)  # signed by a trusted key: `verified` (issue 15)
    cap = capture(LiveDriver(), REF, s)  # type: ignore[arg-type]
    assert cap.manifest["manifest_version"] == 3 and cap.manifest["capture"]["live"]
    v = verify(cap.record.api_dict(), s)
    assert v.status == "verified", v.detail
