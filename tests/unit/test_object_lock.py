"""S3 Object Lock (issue 15, item 5), the parts that need no server: the error codes a lock
brings are mapped once (memdump.storage.s3_errors) with their ``retryable`` flag, the
settings go together or not at all, the bucket is checked once per store before any
upload and every object of one store gets the same retain-until date, and a lock as S3
reports it is read the same whatever the form of its date."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.exceptions as bx
import pytest
from pydantic import ValidationError

from memdump.errors import (
    ObjectLockedError,
    ObjectLockUnavailableError,
    ObjectNotFoundError,
    ObjectStoreAccessError,
    ObjectStoreError,
)
from memdump.settings import S3Settings
from memdump.storage.s3 import ObjectLock, S3Store, _lock_of
from memdump.storage.s3_errors import map_s3_error


def _error(code: str, status: int, message: str, op: str = "PutObject") -> bx.ClientError:
    return bx.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "REQ1"},
        },
        op,
    )


def _map(exc: BaseException, op: str) -> Any:
    return map_s3_error(exc, op=op, bucket="dumps", key="k")


@pytest.mark.parametrize(
    ("code", "status", "message", "op"),
    [
        # GetObjectLockConfiguration on a bucket without Object Lock (AWS and moto): a 404,
        # but not a missing bucket or object
        (
            "ObjectLockConfigurationNotFoundError",
            404,
            "Object Lock configuration does not exist for this bucket",
            "get_object_lock_configuration",
        ),
        # a write with lock headers to such a bucket (AWS's wording, then moto's)
        (
            "InvalidRequest",
            400,
            "Bucket is missing Object Lock Configuration",
            "create_multipart_upload",
        ),
        ("InvalidRequest", 400, "Bucket is missing ObjectLockConfiguration", "put_object"),
        (
            "InvalidRequest",
            400,
            "Bucket is missing ObjectLockConfiguration",
            "put_object_retention",
        ),
    ],
)
def test_a_bucket_that_cannot_lock_is_mapped_not_retryable(
    code: str, status: int, message: str, op: str
) -> None:
    err = _map(_error(code, status, message), op)
    assert type(err) is ObjectLockUnavailableError
    assert err.retryable is False
    assert not isinstance(err, ObjectNotFoundError)
    assert err.fields["code"] == code and err.fields["http_status"] == status
    assert "MEMDUMP_S3__OBJECT_LOCK_MODE" in str(err)


def test_aws_refusing_to_delete_a_locked_version_is_mapped_to_object_locked() -> None:
    refused = _error("AccessDenied", 403, "Access Denied because object protected by object lock.")
    err = _map(refused, "delete_object")
    assert type(err) is ObjectLockedError and err.retryable is False
    # The same words on another operation, or a bare AccessDenied on a delete (moto's:
    # S3Store.delete then asks the object), stay access errors.
    assert type(_map(refused, "put_object")) is ObjectStoreAccessError
    bare = _error("AccessDenied", 403, "Access Denied")
    assert type(_map(bare, "delete_object")) is ObjectStoreAccessError


def test_other_invalid_requests_and_a_missing_checksum_are_not_lock_errors() -> None:
    other = _map(_error("InvalidRequest", 400, "Something else is wrong"), "put_object")
    assert type(other) is ObjectStoreError and other.retryable is False
    # memdump always sends a checksum: this would be memdump's bug, never retried
    missing = _map(
        _error(
            "MissingUploadObjectWithObjectLockHeaders",
            400,
            "Content-MD5 or x-amz-sdk-checksum-algorithm header required",
        ),
        "put_object",
    )
    assert type(missing) is ObjectStoreError and missing.retryable is False


# -- settings ---------------------------------------------------------------------------------


def test_lock_settings_default_off_and_go_together(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"bucket": "dumps"}
    assert S3Settings(**base).object_lock_mode == "none"
    assert S3Settings(**base).object_lock_days is None
    with pytest.raises(ValidationError):
        S3Settings(**base, object_lock_mode="compliance")  # no period
    with pytest.raises(ValidationError):
        S3Settings(**base, object_lock_days=30)  # a period without a lock
    with pytest.raises(ValidationError):
        S3Settings(**base, object_lock_mode="compliance", object_lock_days=0)
    with pytest.raises(ValidationError):
        S3Settings(**base, object_lock_mode="legal", object_lock_days=1)
    from memdump.settings import Settings

    monkeypatch.setenv("MEMDUMP_S3__BUCKET", "dumps")
    monkeypatch.setenv("MEMDUMP_S3__OBJECT_LOCK_MODE", "governance")
    monkeypatch.setenv("MEMDUMP_S3__OBJECT_LOCK_DAYS", "30")
    s3 = Settings().s3
    assert s3 is not None and (s3.object_lock_mode, s3.object_lock_days) == ("governance", 30)


# -- the store, with a client that records its calls ------------------------------------------


class _Client:
    def __init__(self, enabled: str | None) -> None:
        self.enabled = enabled
        self.calls: list[str] = []

    def get_object_lock_configuration(self, **_: Any) -> dict[str, Any]:
        self.calls.append("get_object_lock_configuration")
        if self.enabled is None:
            raise _error("ObjectLockConfigurationNotFoundError", 404, "none")
        return {"ObjectLockConfiguration": {"ObjectLockEnabled": self.enabled}}

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append("create_multipart_upload")
        raise AssertionError("nothing may be uploaded")


def _store(client: _Client, **lock: Any) -> S3Store:
    return S3Store(S3Settings(bucket="dumps", **lock), client=client)


@pytest.mark.parametrize("enabled", [None, "Disabled", ""])
def test_a_bucket_without_lock_fails_the_upload_before_anything_is_sent(
    tmp_path: Any, enabled: str | None
) -> None:
    client = _Client(enabled)
    store = _store(client, object_lock_mode="compliance", object_lock_days=1)
    dump = tmp_path / "d.mem.gz"
    dump.write_bytes(b"x")
    import hashlib

    with pytest.raises(ObjectLockUnavailableError) as err:
        store.upload(dump, gz_sha256=hashlib.sha256(b"x").hexdigest(), size=1)
    assert err.value.retryable is False and "dumps" in str(err.value)
    assert client.calls == ["get_object_lock_configuration"]


def test_the_bucket_is_checked_once_and_every_object_gets_one_date() -> None:
    client = _Client("Enabled")
    store = _store(client, object_lock_mode="governance", object_lock_days=7)
    before = datetime.now(UTC).replace(microsecond=0)
    first = store._lock_args()
    second = store._lock_args()
    assert client.calls == ["get_object_lock_configuration"]
    assert first == second
    assert first["ObjectLockMode"] == "GOVERNANCE"
    until = first["ObjectLockRetainUntilDate"]
    assert before + timedelta(days=7) <= until <= datetime.now(UTC) + timedelta(days=7)
    assert until.microsecond == 0  # S3 keeps whole seconds: what is recorded is what S3 has


def test_lock_off_asks_nothing() -> None:
    client = _Client(None)
    assert _store(client)._lock_args() == {}
    assert client.calls == []


# -- a lock as S3 reports it ----------------------------------------------------------------------


def test_a_lock_is_read_from_head_object_and_holds_until_its_date() -> None:
    until = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    for form in (until, "2030-01-02T03:04:05Z", "2030-01-02T03:04:05.000Z"):
        lock = _lock_of({"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": form})
        assert lock == ObjectLock("COMPLIANCE", until), form
    assert lock is not None and lock.until_text() == "2030-01-02T03:04:05Z"
    assert lock.holds_at(until - timedelta(seconds=1))
    assert not lock.holds_at(until)  # expired at its date: deletable then
    assert _lock_of({"ContentLength": 3}) is None
    hold = _lock_of({"ObjectLockLegalHoldStatus": "ON"})
    assert hold is not None and hold.holds_at(datetime(2999, 1, 1, tzinfo=UTC))
    assert _lock_of({"ObjectLockLegalHoldStatus": "OFF"}) is None
