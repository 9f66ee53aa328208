"""Re-read a stored dump (local file or S3 object) and prove it is still what was recorded.

Both hashes are recomputed in one pass (the .gz bytes as stored, and the raw image they
decompress to) and compared with the record and with the dump's manifest, whose own
SHA-256 is in the record. ``verified``: every check passed and the manifest is signed by
a trusted key (memdump.signing, MEMDUMP_TRUSTED_KEYS); ``mismatch``: the artifact exists
but something differs (detail says what); ``missing``: the artifact is gone. When the
hashes agree but the signature does not vouch for them: ``unsigned`` (no signature: an
older dump, or one whose signature was removed), ``bad-signature`` (it does not match the
manifest, or the envelope is damaged), ``untrusted-key`` (valid, by a key not listed).
A mismatch outranks the signature's status; ``signature`` (to_dict) says what the
signature check found in every case, and in ``signature.record`` what the check of the
record's own signature (memdump.recordsig) found: a bad one is ``bad-signature``, one by
an untrusted key ``untrusted-key``; a record without one (older) changes no status.

A chunked .mem.gz (memdump.chunkedgz) is checked chunk by chunk as well: its index
against the trailer (SHA-256 and the Merkle root recomputed from the chunk digests) and
against the manifest's ``chunks`` section, each chunk's member inflated and its SHA-256
compared with the index on a pool of threads (ISA-L and hashlib release the GIL), while
the stored bytes and the raw image are hashed in order as before. A failure names the
first bad chunk with its raw range and the guest-physical range it holds (through the
ELF's PT_LOADs). ``guest_range`` checks only the chunks holding a guest-physical range
(plus the one with the ELF headers): the rest is vouched for by the index, whose digest
and Merkle root are checked against the manifest, whose digest is in the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from isal import isal_zlib

from memdump.changes import guest_ranges, merge, raw_ranges, read_layout
from memdump.chunkedgz import Chunk, Index, inflate_member, read_index
from memdump.elfcore import CoreLayout, parse_core
from memdump.errors import (
    ChunkedDumpError,
    CorruptChunkError,
    InvalidDumpError,
    MemdumpError,
    ObjectNotFoundError,
)
from memdump.locations import Location
from memdump.records.base import RecordQuery, RecordStore
from memdump.recordsig import check as recordsig_check
from memdump.settings import Settings
from memdump.signing import SIG_MAX_BYTES, SignatureCheck, trusted_keys
from memdump.signing import check as check_signature
from memdump.stored import StoredDump, open_stored
from memdump.timestamping import TSR_MAX_BYTES, TimestampCheck, is_pending
from memdump.timestamping import check as check_timestamp

Status = Literal["verified", "mismatch", "missing", "unsigned", "bad-signature", "untrusted-key"]
# Who asked for a verification: the custody log's ``verified`` entry says so.
Verifier = Literal["cli", "api", "flow", "countersign"]
_INFLATE_STEP = 1 << 20  # most raw bytes one decompress call may return
PAGE = 1000  # records per store query
_MAX_HEAD = 64 << 20  # ELF headers past this are refused by memdump.elfcore anyway
MANIFEST_MAX_BYTES = 1 << 20  # a manifest is a few KiB; more than this is not one
_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # stub says instance


@dataclass
class Verification:
    status: Status
    dump_path: str
    detail: str
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # The manifest's signature (memdump.signing.SignatureCheck.to_dict): status (valid,
    # unsigned, bad-signature, untrusted-key, not-checked), detail, key_fingerprint.
    signature: dict[str, Any] | None = None
    # The manifest's RFC 3161 token (memdump.timestamping.TimestampCheck.to_dict): status
    # (valid, missing, pending, bad-token, untrusted-tsa), detail, gen_time.
    timestamp: dict[str, Any] | None = None
    # The dump's custody log (memdump.custody.check_copies): status (intact, broken,
    # missing, error), entries, head, problems (index, kind, detail), copies. Information:
    # it does not change ``status``.
    custody: dict[str, Any] | None = None
    # The S3 copy's Object Lock (memdump.storage.s3) as S3 reports it now (status locked,
    # expired, none, not-checked or error; mode, retain_until, legal_hold) beside what the
    # record says the offload put there (recorded). Information: it does not change status.
    object_lock: dict[str, Any] | None = None
    # The manifest, once its SHA-256 matched the record's (not reported: the record's
    # signature check reads what it says of the record, its ``record_signature``).
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "dump_path": self.dump_path,
            "detail": self.detail,
            "checks": self.checks,
            "seconds": round(self.seconds, 3),
            "signature": self.signature,
            "timestamp": self.timestamp,
            "custody": self.custody,
            "object_lock": self.object_lock,
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


def verify_threads(settings: Settings | None = None) -> int:
    """Chunks checked at once: MEMDUMP_VERIFY__THREADS, else every core (the hashing of
    the whole image in order runs beside them and mostly waits on them)."""
    if settings is not None and settings.verify.threads is not None:
        return settings.verify.threads
    return max(1, os.cpu_count() or 1)


def verify(
    record: Mapping[str, Any],
    settings: Settings,
    *,
    guest_range: tuple[int, int] | None = None,
    threads: int | None = None,
    by: Verifier = "cli",
) -> Verification:
    """Verify the artifact of one record (an API row: contract fields + extras). Its
    location is confined first (LocationError): a record is data, never a licence to
    read, and no size or hash of any other file or object leaks out.

    ``guest_range`` ([start, end), guest-physical): check only the chunks holding it
    (a chunked dump only: InvalidDumpError for a single-stream one, or a range in no
    PT_LOAD). ``threads``: chunks checked at once (default verify_threads(settings)).
    ``by``: who asks (Verifier): the custody log's ``verified`` entry says so."""
    t0 = time.monotonic()
    where = str(record["dump_path"])
    stored = open_stored(Location.of(where), settings)
    workers = threads or verify_threads(settings)
    trusted = trusted_keys(settings)  # ConfigError before anything is read
    if not stored.exists():
        v = Verification("missing", where, "the stored dump is gone", {}, time.monotonic() - t0)
        return _custody(record, settings, v, by, guest_range)
    try:
        if guest_range is not None:
            v = _verify_range(record, stored, guest_range, workers, t0, trusted, settings)
        else:
            v = _verify_whole(record, stored, workers, t0, trusted, settings)
    except (FileNotFoundError, ObjectNotFoundError):
        gone = "the stored dump vanished while it was read"
        v = Verification("missing", where, gone, {}, time.monotonic() - t0)
    v.object_lock = _object_lock(record, stored)
    _record_signature(record, v, trusted)
    return _custody(record, settings, v, by, guest_range)


def _record_signature(record: Mapping[str, Any], v: Verification, trusted: frozenset[str]) -> None:
    """The record's own signature (memdump.recordsig), in ``signature.record``. A bad one
    turns ``verified``/``unsigned``/``untrusted-key`` into ``bad-signature``, an untrusted
    one ``verified`` into ``untrusted-key``; a mismatch or a missing dump outranks it (its
    reason is added to the detail). A record without one (older than record signing, or
    written by a caller other than the chain) is reported ``unsigned`` there without
    changing ``status``: the manifest's signature still decides, as before; but where the
    manifest says its record is signed (recordsig.declaration), a record without a
    signature, or signed by another key, is ``bad-signature``: it was removed or replaced
    in the store."""
    declared = v.manifest.get("record_signature") if v.manifest is not None else None
    rec = recordsig_check(record, trusted, declared)
    v.signature = {**(v.signature or {}), "record": rec.to_dict()}
    if rec.status in ("valid", "unsigned"):
        return
    if v.status in ("mismatch", "missing"):
        v.detail = f"{v.detail}; record signature: {rec.detail}"
    elif rec.status == "bad-signature":
        v.status = "bad-signature"
        v.detail = f"{v.detail}; but {rec.detail}"
    elif v.status == "verified":
        v.status = "untrusted-key"
        v.detail = f"{v.detail}; but {rec.detail}"


def _object_lock(record: Mapping[str, Any], stored: StoredDump) -> dict[str, Any] | None:
    """The verified copy's S3 Object Lock now, beside the record's; None if neither has
    one to speak of (a local copy of a dump offloaded without a lock)."""
    recorded = {
        "mode": str(record.get("s3_lock_mode") or ""),
        "retain_until": str(record.get("s3_lock_until") or ""),
    }
    if stored.location.kind != "s3":
        # The S3 copy is not the one read here (dump_path is the local copy).
        return {"status": "not-checked", "recorded": recorded} if recorded["mode"] else None
    try:
        lock = stored.lock()
    except MemdumpError as exc:
        return {"status": "error", "detail": str(exc)[:300], "recorded": recorded}
    if lock is None:
        return {"status": "none", "recorded": recorded}
    until = lock.retain_until
    return {
        "status": "locked" if lock.holds_at(datetime.now(UTC)) else "expired",
        "mode": lock.mode,
        "retain_until": until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if until else "",
        "legal_hold": lock.legal_hold,
        "recorded": recorded,
    }


def _custody(
    record: Mapping[str, Any],
    settings: Settings,
    v: Verification,
    by: Verifier,
    guest_range: tuple[int, int] | None,
) -> Verification:
    """The dump's custody log (memdump.custody) checked into ``custody`` (it does not
    change the status), then a ``verified`` entry appended (never fails)."""
    from memdump import custody

    try:
        t = custody.targets_of(settings, record)
        found = custody.check_targets(t, settings, record)
        found.pop("entries_list", None)
        v.custody = found
    except Exception as exc:  # the log's trouble is reported, never fails verify
        v.custody = {"status": "error", "detail": str(exc)[:300]}
        return v
    details: dict[str, Any] = {"status": v.status, "by": by, "detail": v.detail[:300]}
    if guest_range is not None:
        details["range"] = [hex(guest_range[0]), hex(guest_range[1])]
    custody.record_event(settings, t, "verified", details)
    return v


def _signature(
    record: Mapping[str, Any], stored: StoredDump, data: bytes | None, trusted: frozenset[str]
) -> SignatureCheck:
    """The manifest's signature, checked on the manifest's bytes as stored (whether or not
    they match the record: an edited manifest is named as such)."""
    if not record.get("manifest_sha256"):
        return SignatureCheck("unsigned", "no manifest recorded (older record)")
    if data is None or len(data) > MANIFEST_MAX_BYTES:
        return SignatureCheck("not-checked", "no readable manifest to check it against")
    return check_signature(data, stored.signature(SIG_MAX_BYTES + 1), trusted)


def _timestamp(
    record: Mapping[str, Any], stored: StoredDump, data: bytes | None, settings: Settings | None
) -> TimestampCheck | None:
    """The manifest's RFC 3161 token (memdump.timestamping), checked on the manifest's
    bytes as stored; None where there is no manifest to check it against."""
    sha = str(record.get("manifest_sha256") or "")
    if settings is None or not sha or data is None or len(data) > MANIFEST_MAX_BYTES:
        return None
    tsr = stored.timestamp(TSR_MAX_BYTES + 1)
    pending = tsr is None and is_pending(settings, sha)
    return check_timestamp(data, tsr, settings.tsa_ca_file, pending=pending)


def _outcome(
    where: str,
    problems: list[str],
    sig: SignatureCheck,
    success: str,
    checks: dict[str, Any],
    t0: float,
    ts: TimestampCheck | None = None,
) -> Verification:
    """``mismatch`` if any check failed; else ``verified`` when a trusted key vouches for
    the manifest, or the signature's status. A timestamp token that does not check out
    counts as a bad signature (a forged or altered token), one by a TSA the examiner
    does not trust (MEMDUMP_TSA_CA_FILE) as an untrusted key; a missing or pending one
    changes nothing (timestamps are optional, and a pending one comes later)."""
    seconds = time.monotonic() - t0
    ts_bad = ts is not None and ts.status in ("bad-token", "untrusted-tsa")
    if problems:
        if sig.status not in ("valid", "not-checked"):
            problems = [*problems, f"signature: {sig.detail}"]
        if ts is not None and ts_bad:
            problems = [*problems, f"timestamp: {ts.detail}"]
        status: Status = "mismatch"
        detail = "; ".join(problems)
    elif sig.status == "valid":
        status, detail = "verified", f"{success}; {sig.detail}"
    else:
        assert sig.status != "not-checked"  # noqa: S101 - only with a problem reported
        status = sig.status
        detail = f"{success}, but {sig.detail}"
    if not problems and ts is not None:
        if ts.status == "bad-token":
            status = "bad-signature"
        elif ts.status == "untrusted-tsa" and status == "verified":
            status = "untrusted-key"
        detail = f"{detail}; timestamp {ts.status}: {ts.detail}"
    tsd = ts.to_dict() if ts is not None else None
    return Verification(status, where, detail, checks, seconds, sig.to_dict(), tsd)


def _verify_whole(
    record: Mapping[str, Any],
    stored: StoredDump,
    threads: int,
    t0: float,
    trusted: frozenset[str] = frozenset(),
    settings: Settings | None = None,
) -> Verification:
    where = stored.location.where
    checks: dict[str, Any] = {}
    problems: list[str] = []
    index, index_error = _index(stored)
    if index is not None:
        gz_sha, raw_sha, gz_n, raw_n, gz_error, report = _hash_chunked(stored, index, threads)
        checks["chunks"] = report
        if report["bad"]:
            problems.append(_bad_chunk_text(report))
    else:
        gz_sha, raw_sha, gz_n, raw_n, gz_error = _hash_stream(stored.chunks())
        if index_error:
            checks["chunks"] = {"ok": False, "detail": index_error}
            problems.append(index_error)
    if not _check(checks, "gz_sha256", record.get("gz_sha256"), gz_sha):
        problems.append("the .gz differs from the record (gz_sha256)")
    if not _check(checks, "gzip_size_bytes", record.get("gzip_size_bytes"), gz_n):
        problems.append(f"size {gz_n} != recorded {record.get('gzip_size_bytes')}")
    if gz_error:
        problems.append(gz_error)
    if not _check(checks, "sha256", record.get("sha256"), raw_sha):
        problems.append("the raw image differs from the record (sha256)")
    # Where inflating stopped at a bad chunk or a broken stream, the count is partial:
    # the reason is reported already, a size "mismatch" would only restate it.
    if (
        (raw_sha is not None or index is None)
        and record.get("raw_size_bytes")
        and not _check(checks, "raw_size_bytes", record.get("raw_size_bytes"), raw_n)
    ):
        problems.append(f"raw size {raw_n} != recorded {record.get('raw_size_bytes')}")

    doc, data = _check_manifest(record, stored, checks, problems)
    sig = _signature(record, stored, data, trusted)
    ts = _timestamp(record, stored, data, settings)
    if doc is not None:
        out = doc.get("output") if isinstance(doc.get("output"), Mapping) else None
        if out is None:
            problems.append("the manifest is not readable JSON with an output section")
        else:
            if not _check(checks, "manifest.raw_sha256", out.get("raw_sha256"), raw_sha):
                problems.append("the raw image differs from the manifest")
            if not _check(checks, "manifest.gz_sha256", out.get("gz_sha256"), gz_sha):
                problems.append("the .gz differs from the manifest")
        _check_anchor(record, doc, index, index_error, checks, problems)

    chunked = f", {len(index.chunks)} chunks" if index is not None else ""
    success = f"{gz_n} bytes stored, {raw_n} raw{chunked}: hashes match the record" + (
        " and the manifest" if record.get("manifest_sha256") else ""
    )
    v = _outcome(where, problems, sig, success, checks, t0, ts)
    v.manifest = doc
    return v


def _index(stored: StoredDump) -> tuple[Index | None, str]:
    """(the checked index, "") of a chunked dump; (None, "") for a single-stream one;
    (None, why) when the trailer or index is damaged."""
    try:
        with stored.open() as f:
            return read_index(f), ""
    except ChunkedDumpError as exc:
        return None, f"chunk index: {exc}"


def _check_manifest(
    record: Mapping[str, Any], stored: StoredDump, checks: dict[str, Any], problems: list[str]
) -> tuple[dict[str, Any] | None, bytes | None]:
    """(the manifest once its SHA-256 matches the record's, else None and why in
    ``problems``; its bytes as read, for the signature check)."""
    expected = record.get("manifest_sha256") or ""
    if not expected:
        checks["manifest"] = {"ok": None, "detail": "no manifest recorded (older record)"}
        return None, None
    data = stored.manifest(MANIFEST_MAX_BYTES + 1)
    if data is None:
        checks["manifest"] = {"ok": False, "detail": "missing"}
        problems.append("the manifest is missing")
        return None, None
    if len(data) > MANIFEST_MAX_BYTES:
        # Read no further than a manifest can be: a hostile or broken one is a
        # mismatch, not an allocation the size of whatever was put there.
        checks["manifest"] = {"ok": False, "detail": "larger than a manifest can be"}
        problems.append(f"the manifest is larger than {MANIFEST_MAX_BYTES} bytes")
        return None, data
    if not _check(checks, "manifest_sha256", expected, hashlib.sha256(data).hexdigest()):
        problems.append("the manifest differs from the record (manifest_sha256)")
        return None, data
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        problems.append("the manifest is not readable JSON with an output section")
        return None, data
    return doc, data


def _check_anchor(
    record: Mapping[str, Any],
    doc: Mapping[str, Any],
    index: Index | None,
    index_error: str,
    checks: dict[str, Any],
    problems: list[str],
) -> bool:
    """The index (already consistent with its trailer) against what the manifest (and the
    record, where it has them) say: its SHA-256 and the Merkle root. Whether it is
    anchored to the record."""
    out = doc.get("output")
    # output.chunks (manifest version 3); a top-level "chunks" is read the same way.
    section = out.get("chunks") if isinstance(out, Mapping) else None
    section = section if isinstance(section, Mapping) else doc.get("chunks")
    if not isinstance(section, Mapping):
        if index is not None:
            checks["manifest.chunks"] = {"ok": None, "detail": "the manifest has no chunks section"}
        return False
    if index is None:
        if not index_error:  # a damaged index was reported already
            problems.append("the manifest describes a chunked dump but the file has no index")
        return False
    ok = _check(
        checks, "manifest.chunks.index_sha256", section.get("index_sha256"), index.index_sha256
    )
    ok &= _check(
        checks, "manifest.chunks.merkle_root", section.get("merkle_root"), index.merkle_root
    )
    ok &= _check(checks, "manifest.chunks.chunk_size", section.get("chunk_size"), index.chunk_size)
    if record.get("merkle_root"):
        ok &= _check(checks, "merkle_root", record.get("merkle_root"), index.merkle_root)
    if not ok:
        problems.append("the chunk index differs from the manifest (index_sha256 or Merkle root)")
    return ok


# -- chunked dumps: every chunk, in parallel ---------------------------------------------------


def _members(pieces: Iterable[bytes], index: Index, sink: Any) -> Iterator[tuple[Chunk, bytes]]:
    """Each data member of ``index`` cut from the stored bytes as they stream by (every
    byte also goes to ``sink.update``: the .gz hash)."""
    buf = bytearray()
    todo = iter(index.chunks)
    chunk = next(todo, None)
    for piece in pieces:
        sink.update(piece)
        buf += piece
        while chunk is not None and len(buf) >= chunk.gz_size:
            member = bytes(buf[: chunk.gz_size])
            del buf[: chunk.gz_size]  # bytearray drops its front in O(1)
            yield chunk, member
            chunk = next(todo, None)


class _GzCounter:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.n = 0

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.n += len(data)


def _hash_chunked(
    stored: StoredDump, index: Index, threads: int
) -> tuple[str, str | None, int, int, str, dict[str, Any]]:
    """The whole-file and whole-image hashes (as _hash_stream) and the chunks' report:
    members are inflated and checked on ``threads`` workers, at most 2 x threads in
    flight (memory: a few chunks), and their raw bytes hashed in order here."""
    gz = _GzCounter()
    raw = hashlib.sha256()
    raw_n = 0
    raw_ok = True
    bad: list[CorruptChunkError] = []
    head = bytearray()  # the first chunks' raw bytes, until the ELF headers parse
    head_done = False
    layout: CoreLayout | None = None
    pending: deque[tuple[Chunk, Future[bytes]]] = deque()

    def settle() -> None:
        nonlocal raw_n, raw_ok, layout, head_done
        chunk, fut = pending.popleft()
        try:
            data = fut.result()
        except CorruptChunkError as exc:
            bad.append(exc)
            raw_ok = False
            return
        if raw_ok:
            raw.update(data)
            raw_n += len(data)
            if not head_done and chunk.number == len(head) // index.chunk_size:
                head.extend(data)
                layout, head_done = _parse_head(bytes(head))

    seen = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memdump-verify") as pool:
        for chunk, member in _members(stored.chunks(), index, gz):
            pending.append((chunk, pool.submit(inflate_member, chunk, member, check=True)))
            seen += 1
            while len(pending) > 2 * threads:
                settle()
        while pending:
            settle()
    error = ""
    if seen < len(index.chunks):
        error = f"the file ends inside chunk {seen} of {len(index.chunks)} (truncated)"
    report: dict[str, Any] = {
        "ok": not bad and not error,
        "chunk_size": index.chunk_size,
        "chunk_count": len(index.chunks),
        "checked": seen,
        "bad": len(bad),
        "index_sha256": index.index_sha256,
        "merkle_root": index.merkle_root,
    }
    if bad:
        first = min(bad, key=lambda e: int(e.fields.get("number", 0)))
        if layout is None and not raw_ok:
            layout = _layout_from(stored, index, int(first.fields.get("number", 0)))
        report["first_bad"] = _bad_chunk(first, layout)
    whole = raw.hexdigest() if raw_ok and not error else None
    return gz.sha.hexdigest(), whole, gz.n, raw_n, error, report


def _parse_head(head: bytes) -> tuple[CoreLayout | None, bool]:
    """(the ELF layout or None, whether to stop collecting): stop once it parses, once it
    cannot (not an ELF core: no mapping), or at the most headers a core can have."""
    try:
        layout = parse_core(head)
    except InvalidDumpError:
        return None, True
    return layout, layout is not None or len(head) >= _MAX_HEAD


def _layout_or_none(head: bytes) -> CoreLayout | None:
    return _parse_head(head)[0]


def _layout_from(stored: StoredDump, index: Index, first_bad: int) -> CoreLayout | None:
    """The ELF layout when the in-order pass stopped before it had the headers (the bad
    chunk is among the first): read unchecked, since only the mapping depends on it."""
    try:
        with stored.open() as f:
            return read_layout(f, index) if first_bad else _unchecked_layout(f, index)
    except (InvalidDumpError, OSError, ObjectNotFoundError):
        return None


def _unchecked_layout(f: Any, index: Index) -> CoreLayout | None:
    chunk = index.chunks[0]
    f.seek(chunk.gz_offset)
    try:
        data = inflate_member(chunk, f.read(chunk.gz_size), check=False)
    except CorruptChunkError:
        return None
    return _layout_or_none(data)


def _bad_chunk(exc: CorruptChunkError, layout: CoreLayout | None) -> dict[str, Any]:
    number = int(exc.fields.get("number", 0))
    start = int(exc.fields.get("raw_offset", 0))
    end = start + int(exc.fields.get("raw_size", 0))
    out: dict[str, Any] = {
        "number": number,
        "raw_range": [hex(start), hex(end)],
        "reason": str(exc.fields.get("reason") or exc),
    }
    if layout is None:
        out["guest_ranges"] = None  # the ELF headers could not be read
    else:
        out["guest_ranges"] = [[hex(s), hex(e)] for s, e in guest_ranges(layout, start, end)]
    return out


def _bad_chunk_text(report: Mapping[str, Any]) -> str:
    first = report["first_bad"]
    lo, hi = first["raw_range"]
    guest = first["guest_ranges"]
    if guest is None:
        where = "guest-physical range unknown (ELF headers unreadable)"
    elif not guest:
        where = "ELF headers/notes, no guest memory"
    else:
        where = "guest-physical " + ", ".join(f"{s}-{e}" for s, e in guest)
    more = f" ({report['bad']} bad chunks in all)" if report["bad"] > 1 else ""
    return (
        f"chunk {first['number']} is corrupt ({first['reason']}): raw bytes {lo}-{hi}, "
        f"{where}{more}"
    )


# -- a guest-physical range: only its chunks ---------------------------------------------------


def _verify_range(
    record: Mapping[str, Any],
    stored: StoredDump,
    guest_range: tuple[int, int],
    threads: int,
    t0: float,
    trusted: frozenset[str] = frozenset(),
    settings: Settings | None = None,
) -> Verification:
    where = stored.location.where
    start, end = guest_range
    if end <= start:
        raise InvalidDumpError(f"empty guest-physical range {start:#x}:{end:#x}")
    checks: dict[str, Any] = {}
    problems: list[str] = []
    index, index_error = _index(stored)
    if index is None:
        if index_error:
            checks["chunks"] = {"ok": False, "detail": index_error}
            seconds = time.monotonic() - t0
            return Verification("mismatch", where, index_error, checks, seconds)
        raise InvalidDumpError(
            f"{where} is a single-stream .mem.gz (no chunk index): verify it whole, without"
            " --range",
            location=where[:300],
        )
    doc, data = _check_manifest(record, stored, checks, problems)
    sig = _signature(record, stored, data, trusted)
    ts = _timestamp(record, stored, data, settings)
    anchored = doc is not None and _check_anchor(record, doc, index, "", checks, problems)
    if not anchored and not problems:
        problems.append("the chunk index cannot be checked against the record (no manifest chunks)")
    try:
        with stored.open() as f:
            layout = read_layout(f, index)
    except CorruptChunkError as exc:
        headers = {"ok": False, "bad": 1, "first_bad": _bad_chunk(exc, None)}
        checks["chunks"] = headers
        problems.append(_bad_chunk_text(headers))
        v = _outcome(where, problems, sig, "", checks, t0, ts)
        v.manifest = doc
        return v
    raws = raw_ranges(layout, start, end)
    if not raws:
        raise InvalidDumpError(
            f"guest-physical range {start:#x}:{end:#x} is in no PT_LOAD of {where}",
            location=where[:300],
        )
    numbers = sorted(
        set(index.covering(0, layout.header_end)).union(
            *(index.covering(lo, hi) for lo, hi in raws)
        )
    )
    bad: list[CorruptChunkError] = []

    def one(chunk: Chunk) -> None:
        inflate_member(chunk, stored.read_range(chunk.gz_offset, chunk.gz_size), check=True)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memdump-verify") as pool:
        futures = [pool.submit(one, index.chunks[n]) for n in numbers]
        for fut in futures:
            try:
                fut.result()
            except CorruptChunkError as exc:
                bad.append(exc)
    covered = merge(
        (index.chunks[n].raw_offset, index.chunks[n].raw_offset + index.chunks[n].raw_size)
        for n in numbers
    )
    report: dict[str, Any] = {
        "ok": not bad,
        "range": [hex(start), hex(end)],
        "raw_ranges": [[hex(lo), hex(hi)] for lo, hi in raws],
        # Chunk numbers checked, as inclusive runs: the ELF headers' and the range's.
        "chunks_checked": [[lo, hi - 1] for lo, hi in merge((n, n + 1) for n in numbers)],
        "checked": len(numbers),
        "chunk_count": len(index.chunks),
        "bad": len(bad),
        "merkle_root": index.merkle_root,
        "guest_ranges_checked": [
            [hex(s), hex(e)]
            for s, e in merge(r for lo, hi in covered for r in guest_ranges(layout, lo, hi))
        ],
    }
    if bad:
        report["first_bad"] = _bad_chunk(
            min(bad, key=lambda e: int(e.fields.get("number", 0))), layout
        )
        problems.append(_bad_chunk_text(report))
    checks["chunks"] = report
    success = (
        f"guest-physical {start:#x}-{end:#x}: {len(numbers)} of {len(index.chunks)} chunks"
        f" match the index, whose SHA-256 and Merkle root {index.merkle_root[:16]}... match"
        " the manifest (the rest of the dump was not read)"
    )
    v = _outcome(where, problems, sig, success, checks, t0, ts)
    v.manifest = doc
    return v
