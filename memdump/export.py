"""``memdump copy``: a recorded dump copied out for an examiner (a case directory, removable
media), with everything that vouches for it, and the copy written into its custody log
(issue 15, item 3: the ``copied`` event).

What is copied, from the first copy the record names that is still there (the local
file on this collector, else the S3 object): the ``.mem.gz``, its manifest, the
manifest's signature (``.sig``) and timestamp token (``.tsr``) where there are any, and
then the custody log as JSONL, read after the ``copied`` entry was appended, so that the
copy carries the entry naming it. Each file is
created new (O_EXCL, O_NOFOLLOW, 0600, in a 0700 directory made if missing; never over an
existing file) and fsynced. The ``.mem.gz`` is hashed as it is written and must match the
record (``gz_sha256``, ``gzip_size_bytes``), the manifest its ``manifest_sha256``: a copy
that does not is removed, with everything this call wrote, and nothing is logged. The
stored dump is not decompressed: the record binds the compressed bytes, and the raw
image is the examiner's to check (``memdump verify`` on the original, or the manifest's
``raw_sha256`` over ``gunzip -c``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memdump import custody
from memdump.errors import CopyRefusedError
from memdump.fsperm import private_dir
from memdump.identifiers import validate_id
from memdump.locations import is_dump_name, record_locations
from memdump.manifest import SIG_SUFFIX, TSR_SUFFIX, manifest_path
from memdump.settings import Settings
from memdump.signing import SIG_MAX_BYTES
from memdump.stored import LocalDump, S3Dump, StoredDump, open_stored
from memdump.timestamping import TSR_MAX_BYTES
from memdump.verify import MANIFEST_MAX_BYTES


@dataclass(frozen=True)
class Copied:
    dump_path: str  # the original, as recorded
    to: str  # the copied .mem.gz
    files: list[str]  # every file written, the .mem.gz first
    gz_sha256: str
    gzip_size_bytes: int
    # The ``copied`` entry went into the original's log (else it waits in the custody
    # outbox, and the copy's log lacks it).
    logged: bool
    log_entries: int  # entries in the copied log
    details: dict[str, Any] = field(default_factory=dict)


def copy_dump(
    record: Mapping[str, Any], settings: Settings, dest: Path, *, case: str | None = None
) -> Copied:
    """Copy the dump of ``record`` and its sidecars into ``dest`` (CopyRefusedError when
    the stored dump is gone, does not match the record, or a file is already there)."""
    where = str(record["dump_path"])
    if case is not None:
        validate_id(case, what="case reference")  # it goes into the log as given
    stored = _surviving(record, settings)
    if isinstance(stored, LocalDump):
        name = stored.path.name
    else:
        assert isinstance(stored, S3Dump)  # noqa: S101 - the two kinds of StoredDump
        name = stored.key.rpartition("/")[2]
    if not is_dump_name(name):  # confined already; the name becomes a file name here
        raise CopyRefusedError(f"not copied: {where!r} is not a dump file name", path=where)
    folder = private_dir(dest).resolve()
    written: list[Path] = []
    try:
        target = folder / name
        mpath = manifest_path(target)
        gz_sha, gz_n = _write(target, stored.chunks(), written)
        if gz_sha != record.get("gz_sha256") or gz_n != record.get("gzip_size_bytes"):
            raise CopyRefusedError(
                f"not copied: {where} does not match its record (gz_sha256 {gz_sha[:16]}...,"
                f" {gz_n} bytes; recorded {str(record.get('gz_sha256'))[:16]}...,"
                f" {record.get('gzip_size_bytes')} bytes): verify it",
                path=where,
            )
        manifest = stored.manifest(MANIFEST_MAX_BYTES + 1)
        expected = str(record.get("manifest_sha256") or "")
        if expected:
            if manifest is None or hashlib.sha256(manifest).hexdigest() != expected:
                raise CopyRefusedError(
                    f"not copied: the manifest of {where} is missing or does not match its"
                    " record: verify it",
                    path=where,
                )
            _write(mpath, [manifest], written)
        for suffix, data in (
            (SIG_SUFFIX, stored.signature(SIG_MAX_BYTES + 1)),
            (TSR_SUFFIX, stored.timestamp(TSR_MAX_BYTES + 1)),
        ):
            if data is not None:
                _write(mpath.with_name(mpath.name + suffix), [data], written)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    details = {
        "to": str(target),
        "host": socket.gethostname(),
        "gz_sha256": gz_sha,
        "files": [p.name for p in written],
    }
    if case:
        details["case"] = case
    targets = custody.targets_of(settings, record)
    logged = custody.record_event(settings, targets, "copied", details)
    lines = custody.longest_copy(targets)
    log = folder / custody.log_path(target).name
    if lines:
        _write(log, [b"".join(line + b"\n" for line in lines)], written)
    return Copied(
        where, str(target), [str(p) for p in written], gz_sha, gz_n, logged, len(lines), details
    )


def _surviving(record: Mapping[str, Any], settings: Settings) -> StoredDump:
    """The first copy of the record's dump still there: its local copy (on this
    collector), else its S3 object; each confined (a record is data)."""
    for loc in record_locations(record):
        if loc.deleted_at or (
            loc.kind == "local" and loc.collector not in ("", settings.collector_id)
        ):
            continue
        stored = open_stored(loc, settings)
        if stored.exists():
            return stored
    where = str(record["dump_path"])
    raise CopyRefusedError(f"not copied: no copy of {where} is left", path=where)


def _write(path: Path, chunks: Iterable[bytes], written: list[Path]) -> tuple[str, int]:
    """``chunks`` into a new file at ``path`` (0600, never over an existing one, fsynced);
    its SHA-256 and size."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CopyRefusedError(
            f"not copied: {path} exists already (a copy is never written over)", path=str(path)
        ) from None
    written.append(path)
    digest, n = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return digest.hexdigest(), n
