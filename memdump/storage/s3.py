"""Offload of finished ``.mem.gz`` files to S3 (or an S3-compatible store), verified.

An upload is always multipart with a SHA-256 checksum per part, so S3 itself checks every
part it stores; the file is read one part at a time (peak memory: about one part) and
hashed as a whole on the way. Before completing, the whole file's SHA-256 must equal the
one the capture pipeline recorded (the file on disk is still the image that was captured);
after completing, ``head_object`` must show the expected size, metadata, encryption and
composite checksum, or the object is deleted. Any failure before completion aborts the
multipart upload, so no parts are left behind to be billed.

Evidence is never overwritten or deleted by someone else's upload: the upload completes
with ``If-None-Match: *`` (a key that already holds an object fails with
ObjectExistsError, not retried, and nothing is deleted), and an object that fails
verification is deleted only if it is the one this upload created: by its VersionId on
a versioned bucket, else only while its ETag is still the one the completion returned
(``If-Match``). The VersionId is returned (and recorded) where the bucket has one.

With ``object_lock_mode`` set (governance or compliance), every object an upload writes
(the dump and each sidecar the offload sends beside it) is put under S3 Object Lock until
one retain-until date per store (now + ``object_lock_days``): the bucket's Object Lock is
checked once, before the first byte goes up, and an object that comes back without the
lock asked for fails verification: nothing is ever stored unlocked when a lock was asked
for. memdump never sends ``x-amz-bypass-governance-retention``.

botocore is confined to this module and its error map beside it
(:mod:`memdump.storage.s3_errors`): every exception it or boto3 raises is mapped once, by
:func:`~memdump.storage.s3_errors.map_s3_error`, to memdump's error tree.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]

from memdump.errors import (
    MemdumpError,
    ObjectExistsError,
    ObjectLockedError,
    ObjectLockUnavailableError,
    ObjectNotFoundError,
    ObjectStoreAccessError,
    ObjectStoreError,
    OffloadIntegrityError,
    StorageError,
)
from memdump.settings import S3Settings
from memdump.storage.s3_errors import map_s3_error

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_PARTS = 10_000
SHA256_METADATA = "sha256-gz"  # stored as x-amz-meta-sha256-gz
_HEX64 = re.compile(r"[0-9a-f]{64}")

ProgressFn = Callable[[int, int | None], None]


@dataclass(frozen=True)
class ObjectLock:
    """An object's S3 Object Lock as S3 reports it: ``mode`` GOVERNANCE or COMPLIANCE
    ("" if only a legal hold), its retain-until date, and whether a legal hold is on."""

    mode: str
    retain_until: datetime | None
    legal_hold: bool = False

    def holds_at(self, now: datetime) -> bool:
        """Whether the object cannot be deleted at ``now`` (a legal hold has no end)."""
        return self.legal_hold or (self.retain_until is not None and self.retain_until > now)

    def until_text(self) -> str:
        """Until when, for reports: the ISO 8601 UTC date, or the legal hold."""
        if self.legal_hold:
            return "a legal hold is removed"
        return iso_z(self.retain_until) if self.retain_until else "?"


def iso_z(ts: datetime) -> str:
    """``ts`` as ISO 8601 UTC with a Z, whole seconds (S3's retain-until precision)."""
    return ts.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lock_of(head: Mapping[str, Any]) -> ObjectLock | None:
    """The Object Lock a ``head_object`` answer shows (None: none)."""
    mode = str(head.get("ObjectLockMode") or "")
    until = head.get("ObjectLockRetainUntilDate")
    hold = str(head.get("ObjectLockLegalHoldStatus") or "") == "ON"
    if isinstance(until, str):
        until = datetime.fromisoformat(until.replace("Z", "+00:00"))
    if not isinstance(until, datetime):
        until = None
    elif until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    if not mode and until is None and not hold:
        return None
    return ObjectLock(mode, until, hold)


@dataclass(frozen=True)
class S3Object:
    """An object in the store, as verified after upload."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None
    # S3's composite checksum of the parts, "<base64>-<parts>" (None if the store has none)
    checksum_sha256: str | None = None
    # S3 Object Lock on it (MEMDUMP_S3__OBJECT_LOCK_MODE): GOVERNANCE/COMPLIANCE and until when
    lock_mode: str | None = None
    lock_retain_until: datetime | None = None
    uri: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", f"s3://{self.bucket}/{self.key}")


# -- the store -----------------------------------------------------------------------------


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _composite_matches(stored: str, expected_b64: str, parts: int) -> bool:
    """S3 reports a multipart SHA-256 as ``<base64 of sha256(part digests)>-<parts>``;
    some S3-compatible stores leave out the ``-<parts>`` suffix."""
    value, sep, count = stored.partition("-")
    return value == expected_b64 and (not sep or count == str(parts))


def _read_full(f: io.BufferedReader, buf: bytearray) -> int:
    """Fill ``buf`` from ``f``; fewer bytes only at the end of the file."""
    view = memoryview(buf)
    got = 0
    try:
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    finally:
        view.release()
    return got


class S3Store:
    """Uploads, checks, reads and deletes dump objects in one bucket."""

    def __init__(self, settings: S3Settings, *, client: Any = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._client: Any = client if client is not None else self._make_client(settings)
        # One retain-until date for every object this store uploads (an offload's dump and
        # its sidecars alike), fixed once the bucket's Object Lock has been checked.
        self._lock_until: datetime | None = None

    @staticmethod
    def _make_client(s: S3Settings) -> Any:
        config = Config(
            region_name=s.region,
            retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
            connect_timeout=s.connect_timeout_sec,
            read_timeout=s.read_timeout_sec,
            tcp_keepalive=True,
            s3={"addressing_style": s.addressing_style},
        )
        secret = s.secret_access_key.get_secret_value() if s.secret_access_key else None
        try:
            session = boto3.session.Session(
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=secret,
                region_name=s.region,
            )
            return session.client("s3", endpoint_url=s.endpoint_url, config=config)
        except Exception as exc:
            raise map_s3_error(exc, op="connect", bucket=s.bucket) from exc

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mapped(self, op: str, key: str | None) -> Iterator[None]:
        try:
            yield
        except MemdumpError:
            raise
        except Exception as exc:
            raise map_s3_error(exc, op=op, bucket=self.bucket, key=key) from exc

    def key_for(self, path: Path) -> str:
        """The default key of a file: ``<prefix><filename>``."""
        return f"{self.settings.prefix}{path.name}"

    def _sse_args(self) -> dict[str, str]:
        s = self.settings
        if s.sse == "none":
            return {}
        args: dict[str, str] = {"ServerSideEncryption": s.sse}
        if s.sse == "aws:kms" and s.kms_key_id:
            args["SSEKMSKeyId"] = s.kms_key_id
        return args

    @property
    def lock_mode(self) -> str | None:
        """The Object Lock mode uploads ask for (S3's spelling), None when off."""
        mode = self.settings.object_lock_mode
        return None if mode == "none" else mode.upper()

    def _lock_args(self) -> dict[str, Any]:
        """PutObject's Object Lock arguments for the next upload ({} when off). The first
        call checks that the bucket can lock at all (ObjectLockUnavailableError otherwise,
        before anything is uploaded) and fixes the retain-until date."""
        mode = self.lock_mode
        if mode is None:
            return {}
        if self._lock_until is None:
            self.check_object_lock()
            days = self.settings.object_lock_days or 0
            self._lock_until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
        return {"ObjectLockMode": mode, "ObjectLockRetainUntilDate": self._lock_until}

    def check_object_lock(self) -> None:
        """Raise ObjectLockUnavailableError unless Object Lock is enabled on the bucket
        (GetObjectLockConfiguration): a lock asked for must never silently be missing."""
        with self._mapped("get_object_lock_configuration", None):
            conf = self._client.get_object_lock_configuration(Bucket=self.bucket)
        enabled = (conf.get("ObjectLockConfiguration") or {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise ObjectLockUnavailableError(
                f"S3 bucket {self.bucket} does not have Object Lock enabled "
                f"(ObjectLockEnabled={enabled!r}), but MEMDUMP_S3__OBJECT_LOCK_MODE="
                f"{self.settings.object_lock_mode} asks for it: nothing was uploaded",
                op="get_object_lock_configuration",
                bucket=self.bucket,
                mode=self.lock_mode,
            )

    def _lock_problem(self, head: Mapping[str, Any], *, earlier_ok: bool = False) -> str | None:
        """Why the object's lock is not the one asked for (None: it is, or none asked).
        ``earlier_ok``: a date before this store's will do while it still holds (the
        object an earlier attempt of the same offload locked, seconds before)."""
        if self.lock_mode is None or self._lock_until is None:
            return None
        got = _lock_of(head)
        floor = datetime.now(UTC) if earlier_ok else self._lock_until
        if (
            got is None
            or got.mode != self.lock_mode
            or got.retain_until is None
            or got.retain_until < floor
        ):
            shown = f"{got.mode or 'none'} until {got.until_text()}" if got else "none"
            return f"object lock {shown} != {self.lock_mode} until {iso_z(self._lock_until)}"
        return None

    def _part_size_for(self, size: int) -> int:
        """The configured part size, raised (to whole MiB) if the file needs more parts
        than S3 allows."""
        part = self.settings.part_size
        if size > part * MAX_PARTS:
            part = math.ceil(size / MAX_PARTS / MiB) * MiB
        return part

    # -- upload --------------------------------------------------------------------------

    def upload(
        self,
        path: Path,
        key: str | None = None,
        *,
        gz_sha256: str,
        size: int,
        metadata: Mapping[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> S3Object:
        """Upload the finished file ``path`` (``size`` bytes, SHA-256 ``gz_sha256`` as the
        capture recorded them) and verify the stored object. Raises StorageError
        subclasses only. A failure before completion aborts the multipart upload; an
        object that fails verification is deleted. (If the check itself cannot reach S3,
        the unverified object stays and the error is retryable: a retry overwrites it.)"""
        key = key if key is not None else self.key_for(path)
        gz_sha256 = gz_sha256.lower()
        where: dict[str, Any] = {
            "op": "upload",
            "bucket": self.bucket,
            "key": key,
            "path": str(path),
        }
        if not _HEX64.fullmatch(gz_sha256):
            raise ObjectStoreError(f"not a SHA-256 hex digest: {gz_sha256!r}", **where)
        if not key or len(key.encode()) > 1024:
            raise ObjectStoreError(f"invalid S3 key {key!r}", **where)
        try:
            f = path.open("rb")
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}", **where) from exc
        with f:
            try:
                on_disk = os.fstat(f.fileno()).st_size
            except OSError as exc:
                raise StorageError(f"cannot read {path}: {exc}", **where) from exc
            if on_disk != size:
                raise OffloadIntegrityError(
                    f"{path}: {on_disk} bytes on disk, the capture recorded {size}",
                    expected_size=size,
                    actual_size=on_disk,
                    **where,
                )
            meta = {**(metadata or {}), SHA256_METADATA: gz_sha256}
            lock = self._lock_args()  # before the upload starts: a bucket that cannot lock fails
            with self._mapped("create_multipart_upload", key):
                created = self._client.create_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    ChecksumAlgorithm="SHA256",
                    Metadata=meta,
                    ContentType="application/gzip",
                    **self._sse_args(),
                    **lock,
                )
            upload_id = str(created["UploadId"])
            try:
                parts, digests = self._upload_parts(f, key, upload_id, size, gz_sha256, progress)
                with self._mapped("complete_multipart_upload", key):
                    done = self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        MpuObjectSize=size,
                        # Never over an existing object (another collector's evidence).
                        IfNoneMatch="*",
                    )
            except BaseException as exc:
                self._abort(key, upload_id, exc)
                if isinstance(exc, ObjectExistsError):
                    same = self._same_bytes(key, size, gz_sha256)
                    if same is not None:
                        return same
                raise
        version = done.get("VersionId")
        version_id = str(version) if version and version != "null" else None
        created_etag = str(done.get("ETag") or "")
        expected = _b64(hashlib.sha256(b"".join(digests)).digest())
        return self._verify(key, version_id, created_etag, size, gz_sha256, expected, len(digests))

    def _upload_parts(
        self,
        f: io.BufferedReader,
        key: str,
        upload_id: str,
        size: int,
        gz_sha256: str,
        progress: ProgressFn | None,
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        part_size = self._part_size_for(size)
        buf = bytearray(min(part_size, max(size, 1)))
        whole = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        digests: list[bytes] = []
        sent = 0
        number = 0
        while True:
            try:
                n = _read_full(f, buf)
            except OSError as exc:
                raise StorageError(
                    f"cannot read {f.name}: {exc}", op="upload", bucket=self.bucket, key=key
                ) from exc
            if n == 0 and number > 0:
                break
            if n < len(buf):
                del buf[n:]  # the last part: shrink in place, no copy
            number += 1
            whole.update(buf)
            digest = hashlib.sha256(buf).digest()
            with self._mapped("upload_part", key):
                resp = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=buf,
                    ContentLength=n,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(digest),
                )
            stored = resp.get("ChecksumSHA256")
            if stored is not None and stored != _b64(digest):
                raise OffloadIntegrityError(
                    f"S3 stored part {number} of s3://{self.bucket}/{key} with checksum "
                    f"{stored}, sent {_b64(digest)}",
                    op="upload_part",
                    bucket=self.bucket,
                    key=key,
                    part=number,
                )
            parts.append(
                {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": _b64(digest)}
            )
            digests.append(digest)
            sent += n
            if progress is not None:
                progress(sent, size)
            if n < part_size:
                break
        actual = whole.hexdigest()
        if sent != size or actual != gz_sha256:
            raise OffloadIntegrityError(
                f"the file changed since capture: {sent} bytes with SHA-256 {actual}, "
                f"the capture recorded {size} bytes with {gz_sha256}; upload aborted",
                op="upload",
                bucket=self.bucket,
                key=key,
                expected_sha256=gz_sha256,
                actual_sha256=actual,
                expected_size=size,
                actual_size=sent,
            )
        return parts, digests

    def _abort(self, key: str, upload_id: str, exc: BaseException) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as abort_exc:
            # The parts stay until a lifecycle rule (AbortIncompleteMultipartUpload) ends them.
            log.warning(
                "abort of multipart upload %s of s3://%s/%s failed: %s",
                upload_id,
                self.bucket,
                key,
                abort_exc,
            )
            if isinstance(exc, MemdumpError):
                exc.fields["abort_failed"] = True
                exc.fields["upload_id"] = upload_id

    def _verify(
        self,
        key: str,
        version_id: str | None,
        created_etag: str,
        size: int,
        gz_sha256: str,
        composite: str,
        parts: int,
    ) -> S3Object:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version_id:
            args["VersionId"] = version_id
        with self._mapped("head_object", key):
            head = self._client.head_object(**args)
        if version_id and self._lock_problem(head):
            head = self._lock_version(key, version_id, args, head)
        problems: list[str] = []
        length = head.get("ContentLength")
        if length != size:
            problems.append(f"size {length} != {size}")
        stored_sha = (head.get("Metadata") or {}).get(SHA256_METADATA)
        if stored_sha != gz_sha256:
            problems.append(f"metadata {SHA256_METADATA}={stored_sha!r} != {gz_sha256}")
        checksum = head.get("ChecksumSHA256")
        if checksum is not None and not _composite_matches(str(checksum), composite, parts):
            problems.append(f"checksum {checksum} != {composite}-{parts}")
        if self.settings.sse != "none" and head.get("ServerSideEncryption") != self.settings.sse:
            problems.append(
                f"encryption {head.get('ServerSideEncryption')!r} != {self.settings.sse!r}"
            )
        lock_problem = self._lock_problem(head)
        if lock_problem:
            problems.append(lock_problem)
        etag = str(head.get("ETag", ""))
        # Ours: the version this upload created, or (no versioning) still its ETag.
        ours = bool(version_id) or (
            bool(created_etag) and etag.strip('"') == created_etag.strip('"')
        )
        if problems:
            deleted = False
            if ours:
                try:
                    # The version this upload created, or (no versioning) the object only
                    # while it is still the one we completed: never another writer's.
                    self.delete(key, version_id=version_id, if_match=None if version_id else etag)
                    deleted = True
                except MemdumpError as exc:
                    log.warning("could not delete unverified s3://%s/%s: %s", self.bucket, key, exc)
            outcome = (
                "object deleted"
                if deleted
                else "object could NOT be deleted"
                if ours
                else "the object there is not the one this upload created: left alone"
            )
            raise OffloadIntegrityError(
                f"s3://{self.bucket}/{key} does not match the uploaded file "
                f"({'; '.join(problems)}); {outcome}",
                op="verify",
                bucket=self.bucket,
                key=key,
                problems=problems,
                deleted=deleted,
                ours=ours,
            )
        composite_sha256 = f"{composite}-{parts}" if checksum is not None else None
        return self._object(key, size, head, version_id, composite_sha256)

    def _lock_version(
        self, key: str, version_id: str, args: Mapping[str, Any], head: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """Put the lock asked for on the version this upload created when the store did
        not take it from CreateMultipartUpload (moto ignores the lock headers there; AWS
        applies them), by PutObjectRetention on that version; the object's answer after.
        If that fails, the object stays unlocked and fails verification (then deleted)."""
        assert self._lock_until is not None  # noqa: S101 - _lock_problem said a lock is asked
        try:
            with self._mapped("put_object_retention", key):
                self._client.put_object_retention(
                    Bucket=self.bucket,
                    Key=key,
                    VersionId=version_id,
                    Retention={"Mode": self.lock_mode, "RetainUntilDate": self._lock_until},
                )
            with self._mapped("head_object", key):
                return dict(self._client.head_object(**args))
        except MemdumpError as exc:
            log.warning("could not lock s3://%s/%s (%s): %s", self.bucket, key, version_id, exc)
            return head

    def _same_bytes(self, key: str, size: int, gz_sha256: str) -> S3Object | None:
        """The object at ``key`` if it holds exactly the file's bytes (a retried offload
        whose first completion's answer was lost): then the upload is done. Anything else
        there is someone else's object, and the caller's ObjectExistsError stands."""
        try:
            with self._mapped("head_object", key):
                head = self._client.head_object(Bucket=self.bucket, Key=key)
            if head.get("ContentLength") != size:
                return None
            if (head.get("Metadata") or {}).get(SHA256_METADATA) != gz_sha256:
                return None
            # Not under the lock asked for: not an earlier attempt of this offload.
            if self._lock_problem(head, earlier_ok=True):
                return None
            version = head.get("VersionId")
            version_id = str(version) if version and version != "null" else None
            # Metadata is whatever its writer said: the bytes themselves must match.
            h = hashlib.sha256()
            for chunk in self.open_stream(key, version_id=version_id, chunk_size=8 * MiB):
                h.update(chunk)
            if h.hexdigest() != gz_sha256:
                return None
        except MemdumpError as exc:
            log.warning("s3://%s/%s exists and could not be compared: %s", self.bucket, key, exc)
            return None
        return self._object(key, size, head, version_id)

    def _object(
        self,
        key: str,
        size: int,
        head: Mapping[str, Any],
        version_id: str | None,
        checksum_sha256: str | None = None,
    ) -> S3Object:
        """The verified object, from its ``head_object`` answer."""
        etag = str(head.get("ETag", "")).strip('"')
        lock = _lock_of(head)
        return S3Object(
            self.bucket,
            key,
            size,
            etag,
            version_id,
            checksum_sha256,
            lock.mode or None if lock else None,
            lock.retain_until if lock else None,
        )

    # -- other operations ----------------------------------------------------------------

    def check_bucket(self) -> None:
        """Raise unless the bucket exists and the credentials may use it."""
        with self._mapped("head_bucket", None):
            self._client.head_bucket(Bucket=self.bucket)

    def exists(self, key: str) -> bool:
        try:
            with self._mapped("head_object", key):
                self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        """The object's size in bytes (ObjectNotFoundError if there is none)."""
        with self._mapped("head_object", key):
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        return int(head["ContentLength"])

    def current_version(self, key: str) -> str | None:
        """The VersionId of the object at ``key`` now (None: no object, or no versioning)."""
        try:
            with self._mapped("head_object", key):
                head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFoundError:
            return None
        version = head.get("VersionId")
        return str(version) if version and version != "null" else None

    def object_lock(self, key: str, *, version_id: str | None = None) -> ObjectLock | None:
        """The S3 Object Lock on the object (that version of it) now, from S3 itself (the
        bucket's default retention included); None if it has none or is not there."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            args["VersionId"] = version_id
        try:
            with self._mapped("head_object", key):
                head = self._client.head_object(**args)
        except ObjectNotFoundError:
            return None
        return _lock_of(head)

    def delete(
        self, key: str, *, version_id: str | None = None, if_match: str | None = None
    ) -> None:
        """Delete the object (the given version of it, on a versioned bucket; or only
        while its ETag is ``if_match``). On a versioned bucket without ``version_id`` this
        only adds a delete marker: the data stays. A version under Object Lock is refused
        by S3: ObjectLockedError (with ``mode`` and ``retain_until``); memdump never asks
        to bypass a governance lock."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            args["VersionId"] = version_id
        if if_match:
            args["IfMatch"] = if_match
        try:
            with self._mapped("delete_object", key):
                self._client.delete_object(**args)
        except (ObjectStoreAccessError, ObjectLockedError) as exc:
            # AWS says "object lock" in its AccessDenied, moto only "Access Denied": either
            # way ask the object, so a lock is reported as one, with its mode and date.
            if not version_id:
                raise
            try:
                lock = self.object_lock(key, version_id=version_id)
            except MemdumpError:
                raise exc from None
            if lock is None or not lock.holds_at(datetime.now(UTC)):
                raise
            raise ObjectLockedError(
                f"S3 delete_object s3://{self.bucket}/{key}: under Object Lock "
                f"({lock.mode or 'legal hold'}) until {lock.until_text()}",
                op="delete_object",
                bucket=self.bucket,
                key=key,
                version_id=version_id,
                mode=lock.mode,
                retain_until=iso_z(lock.retain_until) if lock.retain_until else None,
                legal_hold=lock.legal_hold,
            ) from exc

    def open_stream(
        self,
        key: str,
        *,
        chunk_size: int = 1 * MiB,
        start: int = 0,
        end: int | None = None,
        version_id: str | None = None,
    ) -> Iterator[bytes]:
        """The object's bytes ``[start, end)`` (all by default), in chunks (of the given
        version, on a versioned bucket)."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            args["VersionId"] = version_id
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with self._mapped("get_object", key):
            body = self._client.get_object(**args)["Body"]
        try:
            while True:
                with self._mapped("get_object", key):
                    chunk = body.read(chunk_size)
                if not chunk:
                    return
                yield bytes(chunk)
        finally:
            with contextlib.suppress(Exception):
                body.close()

    def put_new(self, key: str, data: bytes) -> None:
        """A small object (a custody log entry, memdump.custody) at ``key`` in one PUT,
        only if the key holds none (``If-None-Match: *``: ObjectExistsError otherwise,
        nothing overwritten), checked by S3 against its SHA-256."""
        digest = hashlib.sha256(data).digest()
        with self._mapped("put_object", key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                # The algorithm named too: S3 takes a PUT with Object Lock only with it
                # (x-amz-sdk-checksum-algorithm) or a Content-MD5.
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=_b64(digest),
                **self._sse_args(),
                **self._lock_args(),  # under the dump's Object Lock too (none when off)
            )

    def list_keys(self, prefix: str, limit: int = 100_000) -> list[str]:
        """The keys under ``prefix`` (current objects), in S3's order (UTF-8 binary)."""
        keys: list[str] = []
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while len(keys) < limit:
            with self._mapped("list_objects_v2", prefix):
                page = self._client.list_objects_v2(**args)
            keys += [str(o["Key"]) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            args["ContinuationToken"] = page["NextContinuationToken"]
        return keys[:limit]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from ``start`` (fewer at its end)."""
        if length <= 0:
            return b""
        return b"".join(self.open_stream(key, start=start, end=start + length))

    def sha256(self, key: str) -> str:
        """Hex SHA-256 of the stored object, streamed (for re-verification)."""
        h = hashlib.sha256()
        for chunk in self.open_stream(key):
            h.update(chunk)
        return h.hexdigest()
