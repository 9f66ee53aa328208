"""The record's signature (issue 15, item 2): the collector signs the record it writes.

What is signed: the canonical JSON (memdump.signing.canonical) of the object holding the
fields in SIGNED_FIELDS, each normalised to its type (below) so that every store gives
back the same bytes: the contract's fields and the extras that bind the record to its
dump, its manifest and where they are (hashes, sizes, VM, hypervisor, collector, capture
mode, analysis, changes, the S3 object, its VersionId and Object Lock). They are signed
when the chain records the dump (memdump.chain.run_chain), after the offload: every one
of them is final then. Left out, because retention writes them later into the record
already written (memdump.retention, the stores' mark_*): ``deleted_at``,
``local_deleted_at`` and ``s3_deleted_at`` (the custody log signs those events), and
``record_signature`` itself. The set is fixed (version ``FIELDS_VERSION``): a field added
to records later is not signed until a new version lists it, so older signatures keep
verifying.

Normalised: integers (sizes, times, chunks_changed) as JSON integers, durations as JSON
numbers with a fraction (Python's float repr), None as null, everything else as a string.

Kept in the record's extra field ``record_signature``: a compact JSON envelope (no
whitespace) ``{"algorithm":"Ed25519","fields":"memdump-record-v1","key_fingerprint":...,
"public_key":<base64 raw 32 bytes>,"signature":<base64 64 bytes>,"signed_at":...}``.
As for the manifest's envelope, only ``signature`` is cryptographic; the fingerprint is
recomputed from ``public_key`` and checked against MEMDUMP_TRUSTED_KEYS.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from memdump.records.model import CONTRACT_FIELDS, DumpRecord
from memdump.signing import (
    ALGORITHM,
    SignatureCheck,
    Signer,
    canonical,
    open_envelope,
    untrusted_reason,
)

FIELDS_VERSION = "memdump-record-v1"
# The contract's fields (fixed by the contract), then the extras, listed here and not
# taken from EXTRA_FIELDS: a later extra must not change what v1 signatures cover.
SIGNED_FIELDS = CONTRACT_FIELDS + (
    "hypervisor",
    "raw_size_bytes",
    "gz_sha256",
    "manifest_sha256",
    "analysis",
    "collector",
    "local_path",
    "s3_uri",
    "s3_version_id",
    "capture_mode",
    "live_fallback_reason",
    "pause_ms",
    "chunks_changed",
    "chunks_compared_with",
    "chunks_changed_reason",
    "s3_lock_mode",
    "s3_lock_until",
)
# Written after the record by retention (the record's signature is made before).
UNSIGNED_FIELDS = ("deleted_at", "local_deleted_at", "s3_deleted_at", "record_signature")
_INT = frozenset({"gzip_size_bytes", "ctime", "mtime", "atime", "raw_size_bytes", "chunks_changed"})
_FLOAT = frozenset({"duration_sec", "pause_ms"})
ENVELOPE_MAX = 2048  # an envelope is ~300 characters
# The field the API adds to each record it lists: check(row).status (not stored).
STATUS_FIELD = "signature_status"
STATUSES_KEPT = 8192  # with_status's remembered checks (a key is ~1 KiB)
_STATUSES: dict[tuple[str, bytes, frozenset[str]], str] = {}
_STATUSES_LOCK = threading.Lock()


def _value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _INT:
        return int(value)
    if name in _FLOAT:
        return float(value)
    return str(value)


def message(row: Mapping[str, Any]) -> bytes:
    """The bytes signed for a record (an API row, or DumpRecord.api_dict()): a field it
    lacks counts as "" (a store that never had the column)."""
    return canonical(
        {"fields": FIELDS_VERSION, "record": {k: _value(k, row.get(k, "")) for k in SIGNED_FIELDS}}
    )


def declaration(signer: Signer) -> dict[str, str]:
    """What the manifest says of its record's signature (its ``record_signature``
    section, written and signed before the record exists): the field set and the key that
    will sign it. verify then takes a record without a signature, or signed by another
    key, for one whose signature was removed or replaced in the store."""
    return {"fields": FIELDS_VERSION, "key_fingerprint": signer.fingerprint}


def sign(record: DumpRecord, signer: Signer, at: datetime | None = None) -> DumpRecord:
    """``record`` with its ``record_signature`` by ``signer``."""
    at = at or datetime.now(UTC)
    env = {
        "algorithm": ALGORITHM,
        "fields": FIELDS_VERSION,
        "key_fingerprint": signer.fingerprint,
        "public_key": base64.b64encode(signer.public_raw).decode(),
        "signature": base64.b64encode(signer.sign(message(record.api_dict()))).decode(),
        "signed_at": at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    return dataclasses.replace(record, record_signature=canonical(env).decode())


def with_status(rows: list[dict[str, Any]], trusted: frozenset[str]) -> list[dict[str, Any]]:
    """``rows`` (API rows), each with its signature's status in STATUS_FIELD. A status
    is kept per (signature, signed bytes, trusted keys): the same record listed again
    (every /records page of a dashboard) is not verified again, and any change to what
    is signed, to the signature or to the trusted keys is a new key."""
    for row in rows:
        raw = str(row.get("record_signature") or "")
        if not raw:
            row[STATUS_FIELD] = "unsigned"
            continue
        key = (raw, message(row), trusted)
        status = _STATUSES.get(key)
        if status is None:
            status = check(row, trusted).status
            with _STATUSES_LOCK:
                _STATUSES[key] = status
                while len(_STATUSES) > STATUSES_KEPT:
                    _STATUSES.pop(next(iter(_STATUSES)))
        row[STATUS_FIELD] = status
    return rows


def check(row: Mapping[str, Any], trusted: frozenset[str], declared: Any = None) -> SignatureCheck:
    """The record's signature: valid by a trusted key, or why not (statuses as for the
    manifest's: unsigned, bad-signature, untrusted-key). ``declared``: the manifest's
    ``record_signature`` section (declaration()), when the manifest was checked against
    the record: a record it says is signed must be, and by that key."""
    found = _check(row, trusted)
    if not isinstance(declared, Mapping):
        return found
    want = str(declared.get("key_fingerprint") or "")
    if found.status == "unsigned":
        return SignatureCheck(
            "bad-signature",
            f"the manifest says the record is signed by key {want[:16]}..., but the record"
            " has no signature (removed in the store?)",
        )
    if found.key_fingerprint and found.key_fingerprint != want:
        return SignatureCheck(
            "bad-signature",
            f"the record is signed by key {found.key_fingerprint[:16]}..., but its manifest"
            f" names key {want[:16]}... as its signer (re-signed in the store?)",
            found.key_fingerprint,
            found.info,
        )
    return found


def _check(row: Mapping[str, Any], trusted: frozenset[str]) -> SignatureCheck:
    raw = str(row.get("record_signature") or "")
    if not raw:
        return SignatureCheck("unsigned", "the record has no signature (older record)")
    if len(raw) > ENVELOPE_MAX:
        return SignatureCheck("bad-signature", "the record's signature is larger than an envelope")
    try:
        env = json.loads(raw)
    except ValueError:
        env = None
    if not isinstance(env, dict) or env.get("algorithm") != ALGORITHM:
        return SignatureCheck("bad-signature", "the record's signature is not an Ed25519 envelope")
    if env.get("fields") != FIELDS_VERSION:
        return SignatureCheck(
            "bad-signature", f"unknown record field set {str(env.get('fields'))[:40]!r}"
        )
    info = {"signed_at": env.get("signed_at")}
    opened = open_envelope(env, "the record", info)
    if isinstance(opened, SignatureCheck):
        return opened
    public, signature, fp = opened
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message(row))
    except InvalidSignature:
        return SignatureCheck(
            "bad-signature",
            f"the record's signature by key {fp[:16]}... does not match it (edited in the store?)",
            fp,
            info,
        )
    if fp not in trusted:
        why = untrusted_reason(trusted)
        return SignatureCheck("untrusted-key", f"record signed by key {fp} which {why}", fp, info)
    return SignatureCheck("valid", f"record signed by trusted key {fp[:16]}...", fp, info)
