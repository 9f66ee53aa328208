"""The record of one complete dump, in the contract's field order."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

CONTRACT_FIELDS = (
    "timestamp",
    "dom",
    "vmid",
    "sha256",
    "duration_sec",
    "gzip_size_bytes",
    "ctime",
    "mtime",
    "atime",
    "dump_path",
)


# Documented extras, after the contract's fields in /records and CSV: where the dump
# came from, its .gz hash and raw size, the sha256 of its manifest (memdump.manifest) and
# the result of the post-capture analysis ("passed", "failed", "error", "skipped"), and
# when retention deleted the dump itself (the record stays; "" while the dump is kept).
# Then every location of the dump (memdump.locations): the local copy and the collector
# that holds it (MEMDUMP_COLLECTOR_ID), the S3 object and its VersionId (versioned
# buckets), and when retention deleted each copy. deleted_at is set once every copy is
# gone. "" where there is no such copy, and in records older than these fields (their
# dump_path is their only location).
EXTRA_FIELDS = (
    "hypervisor",
    "raw_size_bytes",
    "gz_sha256",
    "manifest_sha256",
    "analysis",
    "deleted_at",
    "collector",
    "local_path",
    "local_deleted_at",
    "s3_uri",
    "s3_version_id",
    "s3_deleted_at",
    "capture_mode",
    "live_fallback_reason",
    "pause_ms",
    "chunks_changed",
    "chunks_compared_with",
    "chunks_changed_reason",
    "s3_lock_mode",
    "s3_lock_until",
    "record_signature",
)
# Then what changed since the previous capture of the same VM (memdump.changes), then the
# S3 Object Lock the offload put on the S3 copy (memdump.storage.s3): its mode and date.
# Then the collector's signature of the record (memdump.recordsig: which fields, why).
# Extras added after the first release: stores add their columns to an older table and
# read rows without them as "" (the numeric ones in NUMERIC_LATER_FIELDS as None).
LATER_FIELDS = EXTRA_FIELDS[EXTRA_FIELDS.index("manifest_sha256") :]
NUMERIC_LATER_FIELDS = ("pause_ms", "chunks_changed")
INTEGER_LATER_FIELDS = ("chunks_changed",)  # of NUMERIC_LATER_FIELDS, the whole numbers
API_FIELDS = CONTRACT_FIELDS + EXTRA_FIELDS


def iso_utc(ts: datetime) -> str:
    """The contract's timestamp: ISO 8601, microseconds, UTC, no offset suffix."""
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class DumpRecord:
    timestamp: datetime  # when the dump started (UTC)
    dom: str
    vmid: str
    sha256: str  # of the raw (uncompressed) dump
    duration_sec: float
    gzip_size_bytes: int
    ctime: int
    mtime: int
    atime: int
    dump_path: str
    # Beyond the contract (EXTRA_FIELDS).
    gz_sha256: str
    raw_size_bytes: int
    hypervisor: str
    manifest_sha256: str = ""  # "" for records older than manifests
    analysis: str = ""  # "" when no analysis ran
    deleted_at: str = ""  # ISO 8601 UTC, set by retention (memdump.retention)
    collector: str = ""  # the collector holding local_path
    local_path: str = ""
    local_deleted_at: str = ""
    s3_uri: str = ""
    s3_version_id: str = ""
    s3_deleted_at: str = ""
    capture_mode: str = ""  # "paused" or "live": the mode used; "" in older records
    live_fallback_reason: str = ""  # why a live capture fell back to paused; "" if it did not
    pause_ms: float | None = None  # the guest's measured pause; None where unknown
    # Chunks that differ from the previous capture of the same VM (memdump.changes), from
    # the two chunk indexes; None when not compared, chunks_changed_reason saying why.
    chunks_changed: int | None = None
    chunks_compared_with: str = ""  # that previous capture's dump_path
    chunks_changed_reason: str = ""
    # S3 Object Lock on the S3 copy as the offload verified it: "GOVERNANCE"/"COMPLIANCE"
    # and its retain-until date (ISO 8601 UTC); "" without a lock.
    s3_lock_mode: str = ""
    s3_lock_until: str = ""
    # The collector's Ed25519 signature of the record's final fields (memdump.recordsig),
    # a compact JSON envelope; "" in records older than it.
    record_signature: str = ""

    def contract_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timestamp"] = iso_utc(self.timestamp)
        return {k: d[k] for k in CONTRACT_FIELDS}

    def api_dict(self) -> dict[str, Any]:
        """/records' row: the contract's fields in order, then EXTRA_FIELDS."""
        d = asdict(self)
        d["timestamp"] = iso_utc(self.timestamp)
        return {k: d[k] for k in API_FIELDS}

    def full_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timestamp"] = iso_utc(self.timestamp)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DumpRecord:
        """Inverse of full_dict() (the outbox keeps records as JSON)."""
        ts = datetime.fromisoformat(d["timestamp"]).replace(tzinfo=UTC)
        return cls(**{**d, "timestamp": ts})

    @property
    def dump_name(self) -> str:
        return self.dump_path.rsplit("/", 1)[-1]

    @property
    def key(self) -> str:
        """Idempotency key: a replayed write of the same dump is the same record."""
        return f"{self.vmid}|{iso_utc(self.timestamp)}|{self.sha256}"
