"""Issue 15, item 2 (the record): the collector signs the record it writes
(memdump.recordsig): which fields, the canonical bytes, and what `verify` reports for a
record edited in the SQLite store, a record without a signature (older), one signed by a
key nobody trusts; a mismatch still outranks; retention's later marks are not signed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memdump import manifest, recordsig, signing
from memdump.manifest import manifest_path
from memdump.records.model import API_FIELDS, DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.signing import other_signer, trusting
from tests.helpers.verify_dumps import Made, core, guest_ram, write_dump


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps")
    return trusting(s, tmp_path)


@pytest.fixture
def made(settings: Settings) -> Made:
    return write_dump(settings.dump_dir, core(guest_ram(1)), settings=settings)


def _stored(settings: Settings, record: DumpRecord) -> tuple[SQLiteRecordStore, dict[str, Any]]:
    store = SQLiteRecordStore(settings.records_db)
    assert store.add(record)
    (row,) = store.list(10, 0)
    return store, row


def _edit(settings: Settings, sql: str, *params: Any) -> dict[str, Any]:
    """An UPDATE straight in the SQLite file (what a holder of the store's write access
    can do), then the row as /records and verify read it."""
    db = sqlite3.connect(settings.records_db)
    with db:
        db.execute(sql, params)
    db.close()
    (row,) = SQLiteRecordStore(settings.records_db).list(10, 0)
    return row


def _record_status(v: Any) -> str:
    assert v.signature is not None and "record" in v.signature, v
    return str(v.signature["record"]["status"])


def test_the_signed_field_set_covers_every_field_once() -> None:
    signed, unsigned = set(recordsig.SIGNED_FIELDS), set(recordsig.UNSIGNED_FIELDS)
    assert not signed & unsigned
    assert signed | unsigned == set(API_FIELDS)
    # Only what retention writes later (and the signature itself) is left out.
    assert unsigned == {"deleted_at", "local_deleted_at", "s3_deleted_at", "record_signature"}
    assert "record_signature" in API_FIELDS  # an extra field in /records and the stores


def test_the_canonical_record_bytes() -> None:
    rec = DumpRecord(
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        "vm-é",
        "101",
        "a" * 64,
        2,  # an int duration signs as the float the stores give back
        10,
        1,
        2,
        3,
        "/d/x.mem.gz",
        "b" * 64,
        20,
        "lab",
        manifest_sha256="c" * 64,
    )
    msg = recordsig.message(rec.api_dict())
    doc = json.loads(msg)
    assert (
        msg == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert doc["fields"] == "memdump-record-v1"
    assert sorted(doc["record"]) == sorted(recordsig.SIGNED_FIELDS)
    assert msg.startswith(b'{"fields":"memdump-record-v1","record":{"analysis":"","atime":3,')
    assert b'"dom":"vm-\xc3\xa9"' in msg and b'"duration_sec":2.0' in msg
    assert b'"pause_ms":null' in msg and b'"timestamp":"2026-01-02T03:04:05.000006"' in msg
    # Retention's marks do not change it; any signed field does.
    assert recordsig.message({**rec.api_dict(), "deleted_at": "x"}) == msg
    assert recordsig.message({**rec.api_dict(), "vmid": "102"}) != msg


def test_a_signed_record_in_sqlite_verifies(settings: Settings, made: Made) -> None:
    signer = signing.collector_signer(settings)
    _, row = _stored(settings, recordsig.sign(made.record, signer))
    env = json.loads(row["record_signature"])
    assert env["key_fingerprint"] == signer.fingerprint and env["fields"] == "memdump-record-v1"
    v = verify(row, settings)
    assert v.status == "verified", v
    assert _record_status(v) == "valid"
    assert v.signature is not None and v.signature["status"] == "valid"  # the manifest's


@pytest.mark.parametrize(
    ("column", "value"),
    [("dom", "vm-other"), ("vmid", "999"), ("time_us", 1), ("capture_mode", "live")],
)
def test_a_record_edited_in_the_store_is_bad_signature(
    settings: Settings, made: Made, column: str, value: Any
) -> None:
    _stored(settings, recordsig.sign(made.record, signing.collector_signer(settings)))
    row = _edit(settings, f"UPDATE mem_dumps SET {column} = ?", value)  # noqa: S608 - test
    v = verify(row, settings)
    assert v.status == "bad-signature", v
    assert _record_status(v) == "bad-signature" and "edited in the store" in v.detail


def test_a_replaced_dump_with_a_recomputed_manifest_and_record_is_bad_signature(
    settings: Settings, made: Made
) -> None:
    """The dump replaced, its manifest recomputed (and even re-signed by the collector's
    key), the record's hashes and sizes edited to match: only the record's signature,
    made over the original hashes, catches it."""
    signer = signing.collector_signer(settings)
    _stored(settings, recordsig.sign(made.record, signer))
    other = write_dump(settings.dump_dir, core(guest_ram(7)))
    mpath, opath = manifest_path(made.path), manifest_path(other.path)
    os.replace(other.path, made.path)
    doc = json.loads(opath.read_bytes())
    opath.unlink()
    data = manifest.encode(doc)
    mpath.write_bytes(data)
    signing.sig_path(mpath).unlink()
    signing.write_signature(mpath, signing.envelope(doc, signer, file=mpath.name))
    o = other.record
    row = _edit(
        settings,
        "UPDATE mem_dumps SET sha256 = ?, gz_sha256 = ?, gzip_size_bytes = ?,"
        " raw_size_bytes = ?, manifest_sha256 = ?",
        o.sha256,
        o.gz_sha256,
        o.gzip_size_bytes,
        o.raw_size_bytes,
        hashlib.sha256(data).hexdigest(),
    )
    v = verify(row, settings)
    assert all(c["ok"] for c in v.checks.values() if "ok" in c), v.checks  # hashes agree
    assert v.signature is not None and v.signature["status"] == "valid"  # the manifest's
    assert v.status == "bad-signature", v
    assert _record_status(v) == "bad-signature"


def test_a_record_without_a_signature_is_unsigned_and_keeps_its_status(
    settings: Settings, made: Made
) -> None:
    _, row = _stored(settings, made.record)  # as every record before record signing
    assert row["record_signature"] == ""
    v = verify(row, settings)
    assert v.status == "verified", v  # the manifest's signature decides, as before
    assert _record_status(v) == "unsigned"


def test_a_record_signed_by_an_untrusted_key(
    settings: Settings, made: Made, tmp_path: Path
) -> None:
    _, row = _stored(settings, recordsig.sign(made.record, other_signer(tmp_path)))
    v = verify(row, settings)
    assert v.status == "untrusted-key", v
    assert _record_status(v) == "untrusted-key"
    # Its fingerprint edited to a trusted key's: the envelope no longer holds together.
    env = json.loads(row["record_signature"])
    env["key_fingerprint"] = signing.collector_signer(settings).fingerprint
    forged = {**row, "record_signature": json.dumps(env)}
    assert verify(forged, settings).status == "bad-signature"


def test_a_mismatch_outranks_a_bad_record_signature(settings: Settings, made: Made) -> None:
    _stored(settings, recordsig.sign(made.record, signing.collector_signer(settings)))
    row = _edit(settings, "UPDATE mem_dumps SET sha256 = ?", "0" * 64)
    v = verify(row, settings)
    assert v.status == "mismatch", v
    assert _record_status(v) == "bad-signature" and "record signature" in v.detail


def test_retention_marks_after_signing_keep_it_valid(settings: Settings, made: Made) -> None:
    rec = dataclasses.replace(made.record, local_path=made.record.dump_path, collector="c1")
    store, row = _stored(settings, recordsig.sign(rec, signing.collector_signer(settings)))
    now = datetime.now(UTC)
    store.mark_location_deleted(row, "s3", now)  # another copy's deletion, later
    (row,) = store.list(10, 0)
    assert row["s3_deleted_at"]
    v = verify(row, settings)
    assert v.status == "verified" and _record_status(v) == "valid", v


def test_where_the_manifest_declares_the_record_signed_its_signature_must_be_there(
    settings: Settings, made: Made, tmp_path: Path
) -> None:
    signer, other = signing.collector_signer(settings), other_signer(tmp_path)
    declared = recordsig.declaration(signer)
    assert declared == {"fields": recordsig.FIELDS_VERSION, "key_fingerprint": signer.fingerprint}
    row = {**made.record.api_dict(), "timestamp": "x"}
    trusted = signing.trusted_keys(settings) | {other.fingerprint}
    # Without the declaration (an older manifest) a record without a signature is unsigned.
    assert recordsig.check(row, trusted).status == "unsigned"
    # With it: removed in the store.
    stripped = recordsig.check(row, trusted, declared)
    assert stripped.status == "bad-signature" and "no signature" in stripped.detail
    # Re-signed by another key, even a trusted one: replaced in the store.
    resigned = recordsig.sign(made.record, other).api_dict()
    assert recordsig.check(resigned, trusted).status == "valid"
    swapped = recordsig.check(resigned, trusted, declared)
    assert swapped.status == "bad-signature" and "names key" in swapped.detail
    # Signed by the key it names: valid.
    signed = recordsig.sign(made.record, signer).api_dict()
    assert recordsig.check(signed, trusted, declared).status == "valid"


def test_the_listing_status_is_checked_once_and_never_stale(
    settings: Settings, made: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed = recordsig.sign(made.record, signing.collector_signer(settings)).api_dict()
    trusted = signing.trusted_keys(settings)
    calls: list[int] = []
    real = recordsig.check

    def counted(row: Any, keys: frozenset[str], declared: Any = None) -> Any:
        calls.append(1)
        return real(row, keys, declared)

    monkeypatch.setattr(recordsig, "check", counted)
    assert recordsig.with_status([dict(signed)], trusted)[0]["signature_status"] == "valid"
    assert recordsig.with_status([dict(signed)], trusted)[0]["signature_status"] == "valid"
    assert len(calls) == 1  # the same record listed again: not verified again
    # What is signed edited, the keys no longer trusted, the signature removed: never
    # the remembered answer.
    edited = {**signed, "dom": "someone-else"}
    assert recordsig.with_status([edited], trusted)[0]["signature_status"] == "bad-signature"
    assert recordsig.with_status([dict(signed)], frozenset())[0]["signature_status"] == (
        "untrusted-key"
    )
    stripped = {**signed, "record_signature": ""}
    assert recordsig.with_status([stripped], trusted)[0]["signature_status"] == "unsigned"
