"""The S3 error map: every exception botocore or boto3 (or the socket under them) raises
becomes one of memdump's errors (memdump/errors.py, all under ``StorageError``), once,
here, by :func:`map_s3_error`: ``retryable`` set for what may go away on a second attempt
(connection failures, timeouts, throttling, 5xx), and the structured fields ``op``,
``bucket``, ``key``, ``code``, ``http_status``, ``cause`` (and ``request_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import boto3.exceptions  # type: ignore[import-untyped]
import botocore.exceptions as bx  # type: ignore[import-untyped]

from memdump.errors import (
    MemdumpError,
    ObjectExistsError,
    ObjectLockedError,
    ObjectLockUnavailableError,
    ObjectNotFoundError,
    ObjectStoreAccessError,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    OffloadIntegrityError,
)

_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",  # 409: a conflicting operation is in progress
        "IncompleteBody",  # fewer bytes than Content-Length arrived: connection cut
        "NoSuchUpload",  # our upload was aborted meanwhile: a new upload starts afresh
        # a concurrent conditional write to the key: AWS says start the upload again
        "ConditionalRequestConflict",
    }
)
# Writes made with If-None-Match: * (a 412 there means the key already holds an object;
# elsewhere, e.g. a delete with If-Match, it means the object is not the one expected).
_CONDITIONAL_WRITES = frozenset({"complete_multipart_upload", "put_object"})
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "SignatureDoesNotMatch",
        "RequestTimeTooSkewed",
        "KMS.AccessDeniedException",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NoSuchVersion", "NotFound", "404"})
_INTEGRITY_CODES = frozenset(
    {
        "BadDigest",
        "InvalidDigest",
        "XAmzContentSHA256Mismatch",
        "InvalidPart",
        "InvalidPartOrder",
    }
)

# Object Lock (memdump.storage.s3): the bucket has no Object Lock (GetObjectLockConfiguration
# answers this 404; a write with lock headers there is an InvalidRequest naming the missing
# configuration), or an object under a lock refused a delete (AWS says so in its AccessDenied;
# moto's says only "Access Denied": S3Store.delete asks the object then).
_LOCK_MISSING_CODES = frozenset({"ObjectLockConfigurationNotFoundError"})
_LOCK_MISSING_TEXT = ("objectlockconfiguration", "object lock configuration")
_LOCKED_TEXT = "object lock"

_TRANSIENT_BOTOCORE: tuple[type[BaseException], ...] = (
    bx.EndpointConnectionError,
    bx.ConnectTimeoutError,
    bx.ProxyConnectionError,
    bx.HTTPClientError,  # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError
    bx.IncompleteReadError,
    bx.CapacityNotAvailableError,  # botocore's client-side retry quota ran out
    TimeoutError,
    ConnectionError,  # the builtin: refused/reset/aborted
)
_INTEGRITY_BOTOCORE: tuple[type[BaseException], ...] = (
    bx.ChecksumError,
    bx.FlexibleChecksumError,
    bx.AwsChunkedWrapperError,
)
_CREDENTIAL_BOTOCORE: tuple[type[BaseException], ...] = (
    bx.NoCredentialsError,
    bx.PartialCredentialsError,
    bx.CredentialRetrievalError,
    bx.NoAuthTokenError,
    bx.TokenRetrievalError,
    bx.RefreshWithMFAUnsupportedError,
    bx.UnknownCredentialError,
    bx.SSOError,
    bx.LoginError,
    bx.MetadataRetrievalError,
)


def _client_error_details(exc: BaseException) -> tuple[str | None, int | None, str | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None, None, None
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = error.get("Code")
    status = meta.get("HTTPStatusCode")
    request_id = meta.get("RequestId")
    code_s = str(code) if code not in (None, "") else None
    status_i = int(status) if isinstance(status, int | str) and str(status).isdigit() else None
    if status_i is None and code_s is not None and code_s.isdigit():
        status_i = int(code_s)  # HEAD errors have no body: the code is the status
    return code_s, status_i, str(request_id) if request_id else None


def map_s3_error(
    exc: BaseException, *, op: str, bucket: str, key: str | None = None
) -> MemdumpError:
    """Map a botocore/boto3 (or socket) exception to memdump's error tree, once, here."""
    if isinstance(exc, MemdumpError):
        return exc
    # boto3 wrappers: map what they wrap
    if isinstance(exc, boto3.exceptions.RetriesExceededError) and isinstance(
        exc.last_exception, BaseException
    ):
        return map_s3_error(exc.last_exception, op=op, bucket=bucket, key=key)
    inner = exc.__cause__ or exc.__context__
    if (
        isinstance(
            exc, boto3.exceptions.S3UploadFailedError | boto3.exceptions.S3TransferFailedError
        )
        and inner is not None
    ):
        return map_s3_error(inner, op=op, bucket=bucket, key=key)

    code, status, request_id = _client_error_details(exc)
    fields: dict[str, Any] = {
        "op": op,
        "bucket": bucket,
        "key": key,
        "code": code,
        "http_status": status,
        "cause": type(exc).__name__,
    }
    if request_id:
        fields["request_id"] = request_id
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    msg = f"S3 {op} {where}: {code or type(exc).__name__}: {exc}"

    if isinstance(exc, bx.ClientError):
        if (code == "PreconditionFailed" or status == 412) and op in _CONDITIONAL_WRITES:
            # If-None-Match: * found an object at the key: someone else's, never ours
            return ObjectExistsError(
                f"S3 {op} {where}: the key already holds an object; nothing was "
                "overwritten or deleted",
                **fields,
            )
        if code in _INTEGRITY_CODES:
            return OffloadIntegrityError(msg, **fields)
        text = str(exc).lower()
        if code in _LOCK_MISSING_CODES or (
            code == "InvalidRequest" and any(t in text for t in _LOCK_MISSING_TEXT)
        ):
            return ObjectLockUnavailableError(
                f"S3 {op} {where}: the bucket has no Object Lock configuration ({code}): "
                "enable Object Lock on the bucket or set MEMDUMP_S3__OBJECT_LOCK_MODE=none",
                **fields,
            )
        if code == "AccessDenied" and op == "delete_object" and _LOCKED_TEXT in text:
            return ObjectLockedError(msg, **fields)
        if code in _ACCESS_CODES:
            return ObjectStoreAccessError(msg, **fields)
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(msg, **fields)
        if code in _RETRYABLE_CODES or "Throttl" in (code or ""):
            return ObjectStoreUnavailableError(msg, **fields)
        if status is not None and (status >= 500 or status == 429):
            return ObjectStoreUnavailableError(msg, **fields)
        if status == 403:
            return ObjectStoreAccessError(msg, **fields)
        if status == 404:
            return ObjectNotFoundError(msg, **fields)
        # EntityTooSmall/Large, InvalidArgument, InvalidRequest, KMS key problems, ...
        return ObjectStoreError(msg, **fields)
    if isinstance(exc, bx.SSLError):
        # certificate or TLS set-up: botocore has already retried, a human must look
        return ObjectStoreError(msg, **fields)
    if isinstance(exc, _TRANSIENT_BOTOCORE) or isinstance(exc, bx.ConnectionError):
        return ObjectStoreUnavailableError(msg, **fields)
    if isinstance(exc, _INTEGRITY_BOTOCORE):
        return OffloadIntegrityError(msg, **fields)
    if isinstance(exc, _CREDENTIAL_BOTOCORE):
        return ObjectStoreAccessError(msg, **fields)
    # configuration, parameter validation, endpoint resolution, unexpected: not retried
    return ObjectStoreError(msg, **fields)
