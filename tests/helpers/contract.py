"""The contract's record fields, in its order, written out independently of the code."""

RECORD_FIELDS = [
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
]

# /records and its CSV: the contract's fields, then memdump's documented extras (README).
EXTRA_RECORD_FIELDS = [
    "hypervisor",
    "raw_size_bytes",
    "gz_sha256",
    "manifest_sha256",
    "analysis",
    "deleted_at",
    # every location of the dump (issue 11, item 3)
    "collector",
    "local_path",
    "local_deleted_at",
    "s3_uri",
    "s3_version_id",
    "s3_deleted_at",
    # how the dump was taken (issue 12)
    "capture_mode",
    "live_fallback_reason",
    "pause_ms",
    # what changed since the previous capture of the VM (issue 14, item 5)
    "chunks_changed",
    "chunks_compared_with",
    "chunks_changed_reason",
    # the S3 Object Lock on the S3 copy (issue 15, item 5)
    "s3_lock_mode",
    "s3_lock_until",
    # the collector's signature of the record (issue 15, item 2)
    "record_signature",
]
# What a store gives back for a record.
STORED_RECORD_FIELDS = RECORD_FIELDS + EXTRA_RECORD_FIELDS
# /records adds what the API's check of the record's signature found (issue 15, item 6).
API_RECORD_FIELDS = STORED_RECORD_FIELDS + ["signature_status"]
