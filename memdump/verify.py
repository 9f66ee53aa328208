"""Re-read a stored dump (local file or S3 object) and prove it is still what was recorded.

Both hashes are recomputed in one pass (the .gz bytes as stored, and the raw image they
decompress to) and compared with the record and with the dump's manifest, whose own
SHA-256 is in the record. ``verified``: every check passed; ``mismatch``: the artifact
exists but something differs (detail says what); ``missing``: the artifact is gone.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from isal import isal_zlib

from memdump.errors import ObjectNotFoundError
from memdump.locations import Location
from memdump.records.base import RecordQuery, RecordStore
from memdump.settings import Settings
from memdump.stored import open_stored

Status = Literal["verified", "mismatch", "missing"]
_INFLATE_STEP = 1 << 20  # most raw bytes one decompress call may return
PAGE = 1000  # records per store query
MANIFEST_MAX_BYTES = 1 << 20  # a manifest is a few KiB; more than this is not one
_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # stub says instance


@dataclass
class Verification:
    status: Status
    dump_path: str
    detail: str
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "dump_path": self.dump_path,
            "detail": self.detail,
            "checks": self.checks,
            "seconds": round(self.seconds, 3),
        }


def _hash_stream(chunks: Iterable[bytes]) -> tuple[str, str | None, int, int, str]:
    """(gz sha256, raw sha256 or None if the gzip is broken, gz bytes, raw bytes, error)."""
    gz, raw = hashlib.sha256(), hashlib.sha256()
    gz_n = raw_n = 0
    error = ""
    d: Any = isal_zlib.decompressobj(wbits=31)
    for chunk in chunks:
        gz.update(chunk)
        gz_n += len(chunk)
        if error:
            continue  # keep hashing the stored bytes
        try:
            # At most _INFLATE_STEP bytes out per call: zero pages inflate ~1000:1, so one
            # unbounded call on a 4 MiB chunk would allocate ~4 GiB.
            data = chunk
            while True:
                if d.eof:
                    if not data:
                        break
                    d = isal_zlib.decompressobj(wbits=31)  # the next gzip member
                out = d.decompress(data, _INFLATE_STEP)
                raw.update(out)
                raw_n += len(out)
                if d.eof:
                    data = d.unused_data
                else:
                    data = d.unconsumed_tail
                    # A full step may leave output pending inside the decompressor
                    # even when all input was taken: ask again until a short step.
                    if not data and len(out) < _INFLATE_STEP:
                        break
        except (zlib.error, _ISAL_ERROR) as exc:
            error = f"not a valid gzip stream: {exc}"
    if not error and not d.eof:
        error = "gzip stream ends early (truncated)"
    return gz.hexdigest(), None if error else raw.hexdigest(), gz_n, raw_n, error


def _check(checks: dict[str, Any], name: str, expected: Any, actual: Any) -> bool:
    ok = bool(expected == actual)
    checks[name] = {"expected": expected, "actual": actual, "ok": ok}
    return ok


def recorded_since(store: RecordStore, days: float) -> list[dict[str, Any]]:
    """Every record of the last ``days`` days, newest first (paged through the store)."""
    query = RecordQuery(since=datetime.now(UTC) - timedelta(days=days))
    rows: list[dict[str, Any]] = []
    while page := store.list(PAGE, len(rows), query):
        rows.extend(page)
    return rows


def verify(record: Mapping[str, Any], settings: Settings) -> Verification:
    """Verify the artifact of one record (an API row: contract fields + extras). Its
    location is confined first (LocationError): a record is data, never a licence to
    read, and no size or hash of any other file or object leaks out."""
    t0 = time.monotonic()
    where = str(record["dump_path"])
    stored = open_stored(Location.of(where), settings)
    if not stored.exists():
        return Verification("missing", where, "the stored dump is gone", {}, time.monotonic() - t0)
    try:
        gz_sha, raw_sha, gz_n, raw_n, gz_error = _hash_stream(stored.chunks())
    except (FileNotFoundError, ObjectNotFoundError):
        gone = "the stored dump vanished while it was read"
        return Verification("missing", where, gone, {}, time.monotonic() - t0)
    checks: dict[str, Any] = {}
    problems: list[str] = []
    if not _check(checks, "gz_sha256", record.get("gz_sha256"), gz_sha):
        problems.append("the .gz differs from the record (gz_sha256)")
    if not _check(checks, "gzip_size_bytes", record.get("gzip_size_bytes"), gz_n):
        problems.append(f"size {gz_n} != recorded {record.get('gzip_size_bytes')}")
    if gz_error:
        problems.append(gz_error)
    if not _check(checks, "sha256", record.get("sha256"), raw_sha):
        problems.append("the raw image differs from the record (sha256)")
    if record.get("raw_size_bytes") and not _check(
        checks, "raw_size_bytes", record.get("raw_size_bytes"), raw_n
    ):
        problems.append(f"raw size {raw_n} != recorded {record.get('raw_size_bytes')}")

    expected_manifest = record.get("manifest_sha256") or ""
    if expected_manifest:
        data = stored.manifest(MANIFEST_MAX_BYTES + 1)
        if data is None:
            checks["manifest"] = {"ok": False, "detail": "missing"}
            problems.append("the manifest is missing")
        elif len(data) > MANIFEST_MAX_BYTES:
            # Read no further than a manifest can be: a hostile or broken one is a
            # mismatch, not an allocation the size of whatever was put there.
            checks["manifest"] = {"ok": False, "detail": "larger than a manifest can be"}
            problems.append(f"the manifest is larger than {MANIFEST_MAX_BYTES} bytes")
        else:
            msha = hashlib.sha256(data).hexdigest()
            if not _check(checks, "manifest_sha256", expected_manifest, msha):
                problems.append("the manifest differs from the record (manifest_sha256)")
            try:
                out = json.loads(data)["output"]
            except (ValueError, KeyError, TypeError):
                problems.append("the manifest is not readable JSON with an output section")
            else:
                if not _check(checks, "manifest.raw_sha256", out.get("raw_sha256"), raw_sha):
                    problems.append("the raw image differs from the manifest")
                if not _check(checks, "manifest.gz_sha256", out.get("gz_sha256"), gz_sha):
                    problems.append("the .gz differs from the manifest")
    else:
        checks["manifest"] = {"ok": None, "detail": "no manifest recorded (older record)"}

    seconds = time.monotonic() - t0
    if problems:
        return Verification("mismatch", where, "; ".join(problems), checks, seconds)
    return Verification(
        "verified",
        where,
        f"{gz_n} bytes stored, {raw_n} raw: hashes match the record"
        + (" and the manifest" if expected_manifest else ""),
        checks,
        seconds,
    )
