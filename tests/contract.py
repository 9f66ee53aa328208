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
