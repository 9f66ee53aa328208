"""Request and response bodies, exactly as the contract shows them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

ID_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A trigger may qualify an id with its hypervisor: "hv:101".
QUALIFIED_ID_PATTERN = (
    r"^(?!.*\.\.)(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}:)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
)

Status = Literal["idle", "in_progress", "completed", "failed", "timeout", "error"]


class ErrorBody(BaseModel):
    detail: str = Field(examples=["No VM IDs specified"])


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_ids: list[str] = Field(
        description="VM ids (domain name, id or UUID; plain identifiers only), each optionally"
        ' qualified by its hypervisor ("hv:101"), or "all"',
        examples=[["101", "102"]],
        # Documented, checked in the route: an empty list must get the contract's own
        # "No VM IDs specified", which pydantic's constraint errors would not give.
        json_schema_extra={
            "minItems": 1,
            "items": {"type": "string", "maxLength": 257, "pattern": QUALIFIED_ID_PATTERN},
        },
    )


class TriggerResponse(BaseModel):
    status: Literal["scheduled"] = "scheduled"
    message: str = Field(examples=["Memory dump scheduled for 2 VM(s)"])
    vm_ids: list[str]
    timestamp: str = Field(examples=["2025-11-11T10:30:45.123456"])


class Record(BaseModel):
    timestamp: str = Field(description="When the dump started, ISO 8601 UTC, microseconds")
    dom: str
    vmid: str
    sha256: str = Field(description="SHA-256 of the raw (uncompressed) dump")
    duration_sec: float
    gzip_size_bytes: int
    ctime: int
    mtime: int
    atime: int
    dump_path: str
    # Documented extras (after the contract's fields).
    hypervisor: str = Field(description="Inventory name of the hypervisor")
    raw_size_bytes: int = Field(description="Bytes of the raw (uncompressed) dump")
    gz_sha256: str = Field(description="SHA-256 of the stored .mem.gz")
    manifest_sha256: str = Field(
        description="SHA-256 of the dump's manifest (<dump>.manifest.json); empty if none"
    )
    analysis: str = Field(
        description="Post-capture Volatility 3 check: passed, failed, error, skipped, or empty"
    )
    deleted_at: str = Field(
        description="When retention deleted the dump (the record stays); empty while kept"
    )
    # Every location of the dump (memdump.locations); empty where there is none, and in
    # records older than these fields (their dump_path is their only location).
    collector: str = Field("", description="The collector holding local_path")
    local_path: str = Field("", description="The local copy, on that collector")
    local_deleted_at: str = Field("", description="When retention deleted the local copy")
    s3_uri: str = Field("", description="The offloaded copy, s3://bucket/key")
    s3_version_id: str = Field("", description="Its S3 VersionId (versioned buckets)")
    s3_deleted_at: str = Field("", description="When retention deleted the S3 copy")
    # How the dump was taken (issue 12); empty/null in records older than these fields.
    capture_mode: str = Field("", description="paused or live: the capture mode used")
    live_fallback_reason: str = Field(
        "", description="Why a requested live capture fell back to paused; empty if it did not"
    )
    pause_ms: float | None = Field(
        None,
        description="The guest's measured pause, ms (live: QEMU's downtime; paused: the"
        " hypervisor script's window around the dump); null where unknown",
    )
    # What changed since the previous capture of the same VM (issue 14), from the two
    # dumps' chunk indexes; null/empty in records older than these fields.
    chunks_changed: int | None = Field(
        None,
        description="Chunks that differ from the previous capture of the same VM (same"
        " hypervisor and vmid); null when not compared (chunks_changed_reason says why)",
    )
    chunks_compared_with: str = Field("", description="That previous capture's dump_path")
    chunks_changed_reason: str = Field(
        "", description="Why chunks_changed is null (no previous capture, older format...)"
    )
    # S3 Object Lock on the S3 copy (issue 15); empty without one.
    s3_lock_mode: str = Field(
        "", description="S3 Object Lock of the S3 copy: GOVERNANCE or COMPLIANCE; empty if none"
    )
    s3_lock_until: str = Field(
        "", description="Until when the S3 copy cannot be deleted (ISO 8601 UTC); empty if none"
    )
    record_signature: str = Field(
        "",
        description="The collector's Ed25519 signature of this record (issue 15): a compact"
        " JSON envelope (algorithm, fields, key_fingerprint, public_key, signature,"
        " signed_at); empty in older records",
    )
    signature_status: Literal["valid", "unsigned", "bad-signature", "untrusted-key"] = Field(
        "unsigned",
        description="That signature checked by this API against MEMDUMP_TRUSTED_KEYS when"
        " the records were read: valid (by a trusted key), unsigned (older record),"
        " bad-signature (the record was edited, or the envelope is damaged), untrusted-key."
        " The record alone: /verify checks it against the dump and its manifest",
    )


class RecordsResponse(BaseModel):
    records: list[Record]
    count: int
    limit: int
    offset: int


class LastTrigger(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timestamp: str | None = None
    vm_ids: list[str] | None = None
    status: Status | None = None
    duration: float | None = None


VMState = Literal["pending", "running", "retrying", "completed", "failed", "timeout", "error"]


class VMStatus(BaseModel):
    """One VM of the last trigger's flow run (beyond the contract; see README)."""

    vm_id: str | None = Field(
        description='The VM id as requested (or as found, for "all"); null for a VM of an'
        ' "all" trigger that has not started streaming yet; "<hypervisor>:all" for a'
        " hypervisor whose VMs could not be listed (state failed, error says why) or that"
        " runs no VM (state completed, note says so)",
        examples=["vm-web-01"],
    )
    state: VMState = Field(
        description="pending (not started, or waiting for a capture slot), running (dumping,"
        " or offloading/recording the dump), retrying (waiting to retry after a retryable"
        " error), completed (captured, offloaded and recorded), failed, timeout (past"
        " MEMDUMP_CAPTURE_TIMEOUT_SEC), error (crashed, cancelled, or the run ended first)"
    )
    progress: float | None = Field(
        ge=0,
        le=100,
        description="Percent of the dump streamed (the capture's progress artifact, updated"
        " at most every 2 s, and at the end); null before streaming starts",
        examples=[42.5],
    )
    bytes_done: int | None = Field(
        description="Bytes of the dump streamed so far; null before streaming starts"
    )
    bytes_total: int | None = Field(
        description="The dump's size as its ELF headers declare it; null before streaming"
    )
    error: str | None = Field(description="Why the VM failed; null unless it did")
    note: str | None = Field(
        description='What an entry that is not a capture says: for "<hypervisor>:all" with'
        ' state completed, that the hypervisor was listed and runs no VM ("no running VM'
        ' on hypervisor ..."); null otherwise',
    )


class StatusResponse(BaseModel):
    last_trigger: dict[str, object] = Field(
        description="{} when idle; else timestamp, vm_ids, status and (when finished) duration"
    )
    status: Status
    vm_ids: list[str]
    timestamp: str | None
    duration: float | None
    error: str | None
    # Documented extra (after the contract's fields).
    vms: list[VMStatus] = Field(
        description="Per VM of the last run (beyond the contract): state, progress, error;"
        " [] when idle"
    )


class StatsResponse(BaseModel):
    total_dumps: int
    total_vms: int
    total_size_bytes: int
    avg_duration_sec: float
    last_dump: str | None


class OutboxResponse(BaseModel):
    depth: int = Field(description="Records captured but not yet in the record store")
    oldest_queued_at: str | None = Field(description="When the oldest waiting record was queued")
    last_error: str | None = Field(description="Why the store did not take the last one")


class VerifyRequest(BaseModel):
    """Which dump to verify: its ``dump_path`` as recorded, or its ``vmid`` and
    ``timestamp`` (as /records shows them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["dump_path"],
                    "not": {"anyOf": [{"required": ["vmid"]}, {"required": ["timestamp"]}]},
                },
                {"required": ["vmid", "timestamp"], "not": {"required": ["dump_path"]}},
            ]
        },
    )

    dump_path: Annotated[str, Field(max_length=4096)] | SkipJsonSchema[None] = None
    vmid: (
        Annotated[str, Field(max_length=128, json_schema_extra={"pattern": ID_PATTERN})]
        | SkipJsonSchema[None]
    ) = None
    timestamp: (
        Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]
        | SkipJsonSchema[None]
    ) = None
    # Beyond the first version of /verify: how to answer.
    wait: (
        Annotated[
            bool,
            Field(
                description="true: answer with the result (200) however long it takes;"
                " false: start a background job and answer 202 at once; omitted: a"
                " background job only when the .gz is larger than"
                " MEMDUMP_VERIFY__BACKGROUND_BYTES"
            ),
        ]
        | SkipJsonSchema[None]
    ) = None


class VerifyResponse(BaseModel):
    status: Literal[
        "verified", "mismatch", "missing", "unsigned", "bad-signature", "untrusted-key"
    ] = Field(
        description="verified: the hashes agree and a trusted key signed the manifest;"
        " mismatch; missing; else the hashes agree but the signature does not vouch"
        " for them: unsigned (an older dump), bad-signature, untrusted-key"
    )
    dump_path: str
    detail: str = Field(description="What matched, or what differs")
    checks: dict[str, Any] = Field(
        description="Each comparison: expected, actual, ok; for a chunked .mem.gz also"
        " chunks (chunk_count, checked, bad, and first_bad: number, raw_range,"
        " guest_ranges, reason)"
    )
    seconds: float
    signature: dict[str, Any] | None = Field(
        default=None,
        description="The manifest's signature (beyond the contract): status (valid,"
        " unsigned, bad-signature, untrusted-key, not-checked), detail, key_fingerprint,"
        " signed_at, role; and record: the record's signature (status valid, unsigned,"
        " bad-signature, untrusted-key; detail, key_fingerprint, signed_at)",
    )
    timestamp: dict[str, Any] | None = Field(
        default=None,
        description="The manifest's RFC 3161 timestamp token (beyond the contract): status"
        " (valid, missing, pending, bad-token, untrusted-tsa), detail, gen_time (the TSA's"
        " time: the manifest existed then; later than the capture when fetched later);"
        " null without a manifest",
    )
    custody: dict[str, Any] | None = Field(
        default=None,
        description="The dump's custody log (beyond the contract; it does not change"
        " status): status (intact, broken, missing, error), entries, head, problems"
        " (index, kind, detail), copies",
    )
    object_lock: dict[str, Any] | None = Field(
        default=None,
        description="The S3 copy's Object Lock (beyond the contract; it does not change"
        " status): status (locked, expired, none, not-checked, error), mode, retain_until,"
        " legal_hold, and recorded (what the offload put there, from the record)",
    )


class VerifyJobResponse(BaseModel):
    """A background verification (beyond the contract; see README)."""

    job_id: str = Field(description="Poll GET /api/memory-dumps/verify/{job_id}")
    state: Literal["running", "done", "error"] = Field(
        description="running; done (result holds the verification); error (detail says why)"
    )
    dump_path: str
    started_at: str = Field(description="ISO 8601 UTC")
    finished_at: str | None
    result: VerifyResponse | None = Field(description="The POST /verify answer, once done")
    detail: str | None = Field(description="Why the verification could not run (state error)")
