"""S3 Object Lock (issue 15, item 5) against a real moto server over HTTP: the offload puts
the dump and every sidecar beside it under the lock the settings ask for and records it;
a bucket that cannot lock fails the offload before anything is uploaded; retention keeps a
locked object (saying until when) and deletes it on a later run once the lock has expired.

moto enforces Object Lock on a versioned delete (AccessDenied) against its own clock; the
expiry is reached by moving that clock (tests/helpers/moto_clock.py) and giving retention
the same moved time, never by sleeping."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from memdump import retention
from memdump.chain import offload
from memdump.errors import ObjectLockedError, ObjectLockUnavailableError, OffloadFailedError
from memdump.manifest import manifest_key, manifest_path
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import S3Settings, Settings
from memdump.signing import sig_path
from memdump.storage.s3 import S3Store
from memdump.timestamping import tsr_path
from tests.helpers.dumps import stored
from tests.helpers.moto_clock import advance, moto_with_clock

CREDS: dict[str, Any] = {"access_key_id": "testing", "secret_access_key": "testing"}
COLLECTOR = "col-1"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with moto_with_clock(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def endpoint(moto: tuple[str, Path]) -> Iterator[str]:
    url, clock = moto
    advance(clock, days=0)
    yield url
    advance(clock, days=0)  # the next test starts at the real time


@pytest.fixture
def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _bucket(client: Any, *, lock: bool) -> str:
    name = f"lock-{hashlib.sha256(str(datetime.now(UTC)).encode()).hexdigest()[:12]}"
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
    return name


def _settings(tmp_path: Path, url: str, bucket: str, **s3: Any) -> Settings:
    conf = S3Settings(
        endpoint_url=url,
        bucket=bucket,
        max_attempts=1,
        connect_timeout_sec=2.0,
        read_timeout_sec=10.0,
        **CREDS,
        **s3,
    )
    return Settings(data_dir=tmp_path, dump_dir=tmp_path / "dumps", s3=conf, collector_id=COLLECTOR)


def _s3(settings: Settings) -> S3Settings:
    assert settings.s3 is not None
    return settings.s3


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _captured(tmp_path: Path, when: datetime) -> DumpRecord:
    """A finished capture on disk as the chain leaves it before the offload: the dump,
    its manifest, the manifest's signature and timestamp token (the sidecars that travel
    with it)."""
    rec = stored(tmp_path / "dumps", "100", when, 1000, collector=COLLECTOR)
    path = Path(rec.dump_path)
    mpath = manifest_path(path)
    sig_path(mpath).write_bytes(b'{"signature": "test"}')
    tsr_path(mpath).write_bytes(b"a timestamp token")
    return dataclasses.replace(
        rec, gz_sha256=_sha(path.read_bytes()), manifest_sha256=_sha(mpath.read_bytes())
    )


def _keys(rec: DumpRecord, bucket: str) -> list[str]:
    key = rec.s3_uri.removeprefix(f"s3://{bucket}/")
    return [key, manifest_key(key), manifest_key(key) + ".sig", manifest_key(key) + ".tsr"]


def _versions(client: Any, bucket: str, rec: DumpRecord | None = None) -> list[dict[str, Any]]:
    """Every object version in the bucket (of ``rec``'s dump and sidecars only: the
    custody log beside them is kept for good, by design)."""
    got = client.list_object_versions(Bucket=bucket).get("Versions", [])
    keys = _keys(rec, bucket) if rec is not None else None
    return [v for v in got if keys is None or v["Key"] in keys]


def _offloaded(tmp_path: Path, settings: Settings, days_old: float = 3) -> DumpRecord:
    rec, _ = offload(_captured(tmp_path, datetime.now(UTC) - timedelta(days=days_old)), settings)
    return rec


@pytest.mark.parametrize("mode", ["governance", "compliance"])
def test_offload_locks_the_dump_and_every_sidecar_and_records_it(
    endpoint: str, client: Any, tmp_path: Path, mode: str
) -> None:
    bucket = _bucket(client, lock=True)
    settings = _settings(tmp_path, endpoint, bucket, object_lock_mode=mode, object_lock_days=2)
    before = datetime.now(UTC).replace(microsecond=0)
    rec = _offloaded(tmp_path, settings)
    after = datetime.now(UTC)
    until = datetime.fromisoformat(rec.s3_lock_until.replace("Z", "+00:00"))
    assert rec.s3_lock_mode == mode.upper()
    assert before + timedelta(days=2) <= until <= after + timedelta(days=2)
    for key in _keys(rec, bucket):  # the dump, its manifest, its signature and token
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == mode.upper(), key
        assert head["ObjectLockRetainUntilDate"] == until, key
        # (GetObjectRetention answers 500 on moto 5.2.5 whatever the object: HeadObject's
        # x-amz-object-lock-* headers are the same facts.)
    # Nothing the offload wrote is unlocked (the custody log's entries included).
    for v in _versions(client, bucket):
        head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert head.get("ObjectLockMode") == mode.upper(), v["Key"]
    # The record keeps it: stored and listed (/records' rows are these) as extras.
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    row = records.list(1, 0)[0]
    assert (row["s3_lock_mode"], row["s3_lock_until"]) == (mode.upper(), rec.s3_lock_until)


def test_a_bucket_without_object_lock_fails_the_offload_before_uploading(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    bucket = _bucket(client, lock=False)
    settings = _settings(
        tmp_path, endpoint, bucket, object_lock_mode="compliance", object_lock_days=1
    )
    rec = _captured(tmp_path, datetime.now(UTC))
    with pytest.raises(OffloadFailedError) as err:
        offload(rec, settings)
    cause = err.value.__cause__
    assert isinstance(cause, ObjectLockUnavailableError), repr(cause)
    assert cause.retryable is False
    assert "Object Lock" in str(err.value) and bucket in str(err.value)
    # Nothing went up (not even an unfinished multipart upload); the local copy is kept.
    assert _versions(client, bucket) == []
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert Path(rec.dump_path).is_file()


def test_lock_off_is_unchanged_even_on_a_lock_enabled_bucket(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    bucket = _bucket(client, lock=True)
    settings = _settings(tmp_path, endpoint, bucket)  # the default: no lock
    rec = _offloaded(tmp_path, settings)
    assert (rec.s3_lock_mode, rec.s3_lock_until) == ("", "")
    for key in _keys(rec, bucket):
        assert "ObjectLockMode" not in client.head_object(Bucket=bucket, Key=key), key
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    report = retention.apply(settings, records, days=1)
    assert report.errors == {} and report.locked == {}, report
    assert report.deleted == [rec.dump_path]
    assert _versions(client, bucket, rec) == []


def test_a_locked_object_survives_retention_and_goes_once_the_lock_expired(
    moto: tuple[str, Path], endpoint: str, client: Any, tmp_path: Path
) -> None:
    _, clock = moto
    bucket = _bucket(client, lock=True)
    settings = _settings(
        tmp_path, endpoint, bucket, object_lock_mode="compliance", object_lock_days=1
    )
    rec = _offloaded(tmp_path, settings)  # 3 days old: due for retention of 1 day
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    versions = _versions(client, bucket, rec)
    assert len(versions) == 4

    report = retention.apply(settings, records, days=1)
    # Kept, and the run says until when; that is no error (the run does not fail).
    assert report.errors == {} and report.deleted == [], report
    assert list(report.locked) == [rec.s3_uri]
    assert f"COMPLIANCE) until {rec.s3_lock_until}" in report.locked[rec.s3_uri]
    assert retention.md(rec.s3_lock_until) in retention.describe(report)
    assert _versions(client, bucket, rec) == versions  # every version of each is there
    # The local copy (no lock on it) went, marked; the S3 copy and the record stay.
    row = records.list(1, 0)[0]
    assert not Path(rec.dump_path).exists() and row["local_deleted_at"]
    assert row["s3_deleted_at"] == "" and row["deleted_at"] == ""

    # Two days later (S3's clock and memdump's alike) the lock has expired: a later run
    # deletes the S3 copy, its sidecars, and marks the record.
    advance(clock, days=2)
    later = datetime.now(UTC) + timedelta(days=2)
    report = retention.apply(settings, records, later, days=1)
    assert report.errors == {} and report.locked == {}, report
    assert report.deleted == [rec.dump_path]
    assert _versions(client, bucket, rec) == []
    row = records.list(1, 0)[0]
    assert row["s3_deleted_at"] and row["deleted_at"]
    # What stays for good (the custody log's entries: retention never deletes them) was
    # written under the lock too.
    left = _versions(client, bucket)
    assert left and all(".custody/" in v["Key"] for v in left), left
    for v in left:
        head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert head.get("ObjectLockMode") == "COMPLIANCE", v["Key"]


def test_a_delete_s3_refuses_for_a_lock_is_reported_as_kept(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    """memdump's clock past the retain-until date, S3's not (clock skew): S3 refuses the
    delete, the refusal is mapped to ObjectLockedError with the date, and retention keeps
    the copy as locked: the record stays unmarked, nothing is an error."""
    bucket = _bucket(client, lock=True)
    settings = _settings(
        tmp_path, endpoint, bucket, object_lock_mode="governance", object_lock_days=1
    )
    rec = _offloaded(tmp_path, settings)
    key = _keys(rec, bucket)[0]
    store = S3Store(_s3(settings))
    with pytest.raises(ObjectLockedError) as err:
        store.delete(key, version_id=rec.s3_version_id)
    assert err.value.fields["retain_until"] == rec.s3_lock_until
    assert err.value.fields["mode"] == "GOVERNANCE" and err.value.retryable is False

    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    skewed = datetime.now(UTC) + timedelta(days=2)
    report = retention.apply(settings, records, skewed, days=1)
    assert report.errors == {} and list(report.locked) == [rec.s3_uri], report
    assert rec.s3_lock_until in report.locked[rec.s3_uri]
    assert len(_versions(client, bucket, rec)) == 4
    assert records.list(1, 0)[0]["s3_deleted_at"] == ""


def test_a_legal_hold_set_by_an_operator_keeps_the_object(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    """No lock asked by memdump, but the object is held (a bucket's lock, set by an
    operator): retention asks S3, not the record, and keeps it."""
    bucket = _bucket(client, lock=True)
    settings = _settings(tmp_path, endpoint, bucket)
    rec = _offloaded(tmp_path, settings)
    # On one sidecar only (the timestamp token): the dump and the rest stay with it.
    client.put_object_legal_hold(
        Bucket=bucket, Key=_keys(rec, bucket)[3], LegalHold={"Status": "ON"}
    )
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    report = retention.apply(settings, records, days=1)
    assert report.errors == {} and list(report.locked) == [rec.s3_uri], report
    assert "legal hold" in report.locked[rec.s3_uri]
    assert len(_versions(client, bucket, rec)) == 4  # nothing deleted, sidecars included
    # The dry run says the same and deletes nothing.
    dry = retention.apply(settings, records, days=1, dry_run=True)
    assert list(dry.locked) == [rec.s3_uri] and dry.would_delete == []


def test_verify_shows_the_lock_s3_reports_beside_the_recorded_one(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    from memdump.verify import verify

    bucket = _bucket(client, lock=True)
    settings = _settings(
        tmp_path,
        endpoint,
        bucket,
        object_lock_mode="compliance",
        object_lock_days=1,
        keep_local=False,  # dump_path is the S3 object: verify reads that copy
    )
    rec = _offloaded(tmp_path, settings)
    assert rec.dump_path == rec.s3_uri
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    got = verify(records.list(1, 0)[0], settings).to_dict()["object_lock"]
    recorded = {"mode": "COMPLIANCE", "retain_until": rec.s3_lock_until}
    assert got == {
        "status": "locked",
        "mode": "COMPLIANCE",
        "retain_until": rec.s3_lock_until,
        "legal_hold": False,
        "recorded": recorded,
    }


def test_a_retried_upload_takes_the_object_an_earlier_attempt_locked(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    """The first completion's answer lost, the retry (a new store, a later retain-until
    date) finds the same bytes under the same lock mode: done, with the object's own
    date; an object there without the lock is not taken for ours."""
    bucket = _bucket(client, lock=True)
    first = _settings(tmp_path, endpoint, bucket, object_lock_mode="compliance", object_lock_days=1)
    later = _settings(tmp_path, endpoint, bucket, object_lock_mode="compliance", object_lock_days=2)
    rec = _captured(tmp_path, datetime.now(UTC))
    path = Path(rec.dump_path)
    obj = S3Store(_s3(first)).upload(path, gz_sha256=rec.gz_sha256, size=1000)
    again = S3Store(_s3(later)).upload(path, gz_sha256=rec.gz_sha256, size=1000)
    assert (again.key, again.version_id) == (obj.key, obj.version_id)
    assert again.lock_mode == "COMPLIANCE" and again.lock_retain_until == obj.lock_retain_until
    # The same bytes at a key without a lock (written some other way) are not ours.
    from memdump.errors import ObjectExistsError

    key = S3Store(_s3(first)).key_for(manifest_path(path))
    client.put_object(Bucket=bucket, Key=key, Body=manifest_path(path).read_bytes())
    with pytest.raises(ObjectExistsError):
        S3Store(_s3(first)).upload(manifest_path(path), gz_sha256=rec.manifest_sha256, size=2)
