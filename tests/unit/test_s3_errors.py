"""Every botocore/boto3 exception maps to memdump's tree, with the right ``retryable``."""

from __future__ import annotations

import inspect
import string
import subprocess
import sys
from collections.abc import Callable

import boto3.exceptions as b3x
import botocore.exceptions as bx
import pytest
from pydantic import SecretStr, ValidationError

from memdump.errors import (
    MemdumpError,
    ObjectNotFoundError,
    ObjectStoreAccessError,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    OffloadIntegrityError,
    StorageError,
)
from memdump.settings import S3Settings
from memdump.storage.s3 import MiB
from memdump.storage.s3_errors import map_s3_error

MODULES = (bx, b3x)


def _client_error(code: str, status: int, op: str = "PutObject") -> bx.ClientError:
    return bx.ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "REQ1"},
        },
        op,
    )


SPECIAL: dict[type, Callable[[], BaseException]] = {
    bx.ClientError: lambda: _client_error("AccessDenied", 403),
    bx.EventStreamError: lambda: bx.EventStreamError(
        {"Error": {"Code": "InternalError", "Message": "m"}}, "SelectObjectContent"
    ),
    bx.WaiterError: lambda: bx.WaiterError("ObjectExists", "max attempts", {}),
    b3x.DynamoDBNeedsConditionError: lambda: b3x.DynamoDBNeedsConditionError("v"),
    b3x.DynamoDBOperationNotSupportedError: lambda: b3x.DynamoDBOperationNotSupportedError(
        "op", "v"
    ),
    b3x.DynanmoDBOperationNotSupportedError: lambda: b3x.DynanmoDBOperationNotSupportedError(
        "op", "v"
    ),
    b3x.ResourceNotExistsError: lambda: b3x.ResourceNotExistsError("s3x", ["s3"], False),
    b3x.UnknownAPIVersionError: lambda: b3x.UnknownAPIVersionError("s3", "1999", "2006"),
    b3x.RetriesExceededError: lambda: b3x.RetriesExceededError(
        bx.ReadTimeoutError(endpoint_url="http://x")
    ),
}


def _defined() -> set[type]:
    return {
        c
        for m in MODULES
        for _, c in inspect.getmembers(m, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == m.__name__
    }


def _make(cls: type) -> BaseException:
    if cls in SPECIAL:
        return SPECIAL[cls]()
    fmt = getattr(cls, "fmt", None)
    if isinstance(fmt, str):
        names = {f for _, f, _, _ in string.Formatter().parse(fmt) if f}
        exc: BaseException = cls(**{n: "x" for n in names})
        return exc
    made: BaseException = cls("message")
    return made


def _instances() -> list[BaseException]:
    out = [_make(c) for c in sorted(_defined(), key=lambda c: c.__name__)]
    out += [
        TimeoutError("t"),
        ConnectionResetError(104, "reset"),
        ConnectionRefusedError(111, "refused"),
        OSError(113, "no route"),
        RuntimeError("unexpected"),
    ]
    return out


@pytest.mark.parametrize("op", ["upload_part", "head_object", "get_object"])
def test_every_botocore_and_boto3_error_is_mapped(op: str) -> None:
    seen: set[type] = set()
    for exc in _instances():
        mapped = map_s3_error(exc, op=op, bucket="bkt", key="memdump/a.mem.gz")
        assert isinstance(mapped, StorageError), type(exc)
        assert isinstance(mapped, MemdumpError)
        assert type(mapped).__module__.startswith("memdump."), type(mapped)
        assert isinstance(mapped.retryable, bool)
        f = mapped.fields
        assert (f["op"], f["bucket"], f["key"]) == (op, "bkt", "memdump/a.mem.gz")
        assert {"code", "http_status", "cause"} <= f.keys()
        if not isinstance(exc, b3x.RetriesExceededError):  # that one maps what it wraps
            assert f["cause"] == type(exc).__name__
        assert mapped.to_dict()["error"] == type(mapped).__name__
        seen.add(type(exc))
    assert _defined() <= seen


CLIENT_CASES = [
    # transient: retried
    ("SlowDown", 503, ObjectStoreUnavailableError, True),
    ("ServiceUnavailable", 503, ObjectStoreUnavailableError, True),
    ("503", 503, ObjectStoreUnavailableError, True),
    ("RequestTimeout", 400, ObjectStoreUnavailableError, True),
    ("InternalError", 500, ObjectStoreUnavailableError, True),
    ("500", 500, ObjectStoreUnavailableError, True),
    ("Throttling", 400, ObjectStoreUnavailableError, True),
    ("ThrottlingException", 400, ObjectStoreUnavailableError, True),
    ("TooManyRequests", 429, ObjectStoreUnavailableError, True),
    ("OperationAborted", 409, ObjectStoreUnavailableError, True),
    ("IncompleteBody", 400, ObjectStoreUnavailableError, True),
    ("NoSuchUpload", 404, ObjectStoreUnavailableError, True),
    ("SomethingNew", 502, ObjectStoreUnavailableError, True),
    # a human must act: never retried
    ("AccessDenied", 403, ObjectStoreAccessError, False),
    ("InvalidAccessKeyId", 403, ObjectStoreAccessError, False),
    ("SignatureDoesNotMatch", 403, ObjectStoreAccessError, False),
    ("ExpiredToken", 400, ObjectStoreAccessError, False),
    ("RequestTimeTooSkewed", 403, ObjectStoreAccessError, False),
    ("403", 403, ObjectStoreAccessError, False),
    ("NoSuchBucket", 404, ObjectNotFoundError, False),
    ("NoSuchKey", 404, ObjectNotFoundError, False),
    ("404", 404, ObjectNotFoundError, False),
    ("BadDigest", 400, OffloadIntegrityError, False),
    ("InvalidDigest", 400, OffloadIntegrityError, False),
    ("XAmzContentSHA256Mismatch", 400, OffloadIntegrityError, False),
    ("InvalidPart", 400, OffloadIntegrityError, False),
    ("InvalidPartOrder", 400, OffloadIntegrityError, False),
    ("EntityTooSmall", 400, ObjectStoreError, False),
    ("EntityTooLarge", 400, ObjectStoreError, False),
    ("InvalidArgument", 400, ObjectStoreError, False),
    ("KMS.NotFoundException", 400, ObjectStoreError, False),
    ("InvalidBucketName", 400, ObjectStoreError, False),
]


@pytest.mark.parametrize(("code", "status", "cls", "retryable"), CLIENT_CASES)
def test_client_error_codes(code: str, status: int, cls: type, retryable: bool) -> None:
    m = map_s3_error(_client_error(code, status), op="upload_part", bucket="b", key="k")
    assert type(m) is cls
    assert m.retryable is retryable
    assert m.fields["code"] == code
    assert m.fields["http_status"] == status
    assert m.fields["request_id"] == "REQ1"
    assert code in str(m) and "s3://b/k" in str(m)


def test_head_error_without_body_takes_status_from_code() -> None:
    exc = bx.ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")
    m = map_s3_error(exc, op="head_object", bucket="b", key="k")
    assert isinstance(m, ObjectNotFoundError) and m.fields["http_status"] == 404


@pytest.mark.parametrize(
    ("exc", "cls", "retryable"),
    [
        (bx.EndpointConnectionError(endpoint_url="http://x"), ObjectStoreUnavailableError, True),
        (bx.ConnectTimeoutError(endpoint_url="http://x"), ObjectStoreUnavailableError, True),
        (bx.ReadTimeoutError(endpoint_url="http://x"), ObjectStoreUnavailableError, True),
        (bx.ConnectionClosedError(endpoint_url="http://x"), ObjectStoreUnavailableError, True),
        (bx.ResponseStreamingError(error="x"), ObjectStoreUnavailableError, True),
        (
            bx.IncompleteReadError(actual_bytes=1, expected_bytes=2),
            ObjectStoreUnavailableError,
            True,
        ),
        (bx.ProxyConnectionError(proxy_url="http://p"), ObjectStoreUnavailableError, True),
        (bx.CapacityNotAvailableError(), ObjectStoreUnavailableError, True),
        (TimeoutError("t"), ObjectStoreUnavailableError, True),
        (ConnectionResetError(104, "reset"), ObjectStoreUnavailableError, True),
        (bx.SSLError(endpoint_url="https://x", error="cert"), ObjectStoreError, False),
        (bx.NoCredentialsError(), ObjectStoreAccessError, False),
        (bx.PartialCredentialsError(provider="env", cred_var="x"), ObjectStoreAccessError, False),
        (bx.SSOTokenLoadError(error_msg="x"), ObjectStoreAccessError, False),
        (
            bx.ChecksumError(checksum_type="sha256", expected_checksum="a", actual_checksum="b"),
            OffloadIntegrityError,
            False,
        ),
        (bx.FlexibleChecksumError(error_msg="x"), OffloadIntegrityError, False),
        (bx.ParamValidationError(report="bad"), ObjectStoreError, False),
        (bx.NoRegionError(), ObjectStoreError, False),
        (RuntimeError("?"), ObjectStoreError, False),
    ],
)
def test_botocore_errors(exc: BaseException, cls: type, retryable: bool) -> None:
    m = map_s3_error(exc, op="upload_part", bucket="b", key="k")
    assert type(m) is cls
    assert m.retryable is retryable
    assert m.fields["code"] is None and m.fields["http_status"] is None


def test_boto3_wrappers_map_what_they_wrap() -> None:
    inner = bx.ReadTimeoutError(endpoint_url="http://x")
    m = map_s3_error(b3x.RetriesExceededError(inner), op="get_object", bucket="b", key="k")
    assert isinstance(m, ObjectStoreUnavailableError) and m.fields["cause"] == "ReadTimeoutError"

    try:
        try:
            raise _client_error("SlowDown", 503)
        except bx.ClientError as exc:
            raise b3x.S3UploadFailedError("Failed to upload") from exc
    except b3x.S3UploadFailedError as outer:
        m = map_s3_error(outer, op="upload", bucket="b", key="k")
    assert isinstance(m, ObjectStoreUnavailableError) and m.fields["code"] == "SlowDown"

    bare = map_s3_error(b3x.S3UploadFailedError("x"), op="upload", bucket="b", key="k")
    assert type(bare) is ObjectStoreError and not bare.retryable


def test_memdump_errors_pass_through() -> None:
    e = OffloadIntegrityError("x", op="verify")
    assert map_s3_error(e, op="upload", bucket="b", key="k") is e


def test_settings() -> None:
    s = S3Settings(bucket="dumps")
    assert s.part_size == 64 * MiB and s.prefix == "memdump/" and s.sse == "none"
    assert s.keep_local and s.max_attempts == 5
    with pytest.raises(ValidationError):
        S3Settings(bucket="dumps", part_size=4 * MiB)
    with pytest.raises(ValidationError):
        S3Settings(bucket="dumps", access_key_id="AKIA")  # secret missing
    with pytest.raises(ValidationError):
        S3Settings(bucket="dumps", kms_key_id="k")  # needs sse=aws:kms
    with pytest.raises(ValidationError):
        S3Settings(bucket="dumps", sse="aws:kms2")  # type: ignore[arg-type]
    s = S3Settings(bucket="dumps", access_key_id="AKIA", secret_access_key=SecretStr("s3cr3t"))
    assert "s3cr3t" not in repr(s)


def test_engine_module_imports_neither_prefect_nor_fastapi() -> None:
    code = (
        "import sys, memdump.storage.s3; "
        "bad = [m for m in ('prefect', 'fastapi') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_precondition_failed_on_a_conditional_write_is_an_existing_object() -> None:
    from memdump.errors import ObjectExistsError

    exc = _client_error("PreconditionFailed", 412, "CompleteMultipartUpload")
    mapped = map_s3_error(exc, op="complete_multipart_upload", bucket="b", key="memdump/k")
    assert type(mapped) is ObjectExistsError and not mapped.retryable
    assert "already holds an object" in str(mapped) and mapped.fields["http_status"] == 412
    # A delete with If-Match that no longer matches: not "exists", still not retried.
    other = map_s3_error(
        _client_error("PreconditionFailed", 412, "DeleteObject"), op="delete_object", bucket="b"
    )
    assert type(other) is ObjectStoreError and not other.retryable
    # A concurrent conditional write (AWS): start the upload again.
    conflict = map_s3_error(
        _client_error("ConditionalRequestConflict", 409), op="complete_multipart_upload", bucket="b"
    )
    assert type(conflict) is ObjectStoreUnavailableError and conflict.retryable
