"""S3Store against a real moto S3 server over HTTP (tests/helpers/moto.py), not moto's mock.

moto does not check part checksums (a wrong ChecksumSHA256 is accepted), ignores
MpuObjectSize and KMS keys; what it does support is used: multipart uploads, the
composite SHA-256 checksum on ``head_object(ChecksumMode=ENABLED)``, metadata, SSE
headers, aborts and ``list_multipart_uploads``. The store's own checks (whole-file
SHA-256 before completing, size/metadata/checksum after) are exercised here.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from memdump.errors import (
    ObjectNotFoundError,
    ObjectStoreUnavailableError,
    OffloadIntegrityError,
    StorageError,
)
from memdump.settings import S3Settings
from memdump.storage.s3 import MiB, S3Store
from tests.helpers.moto import running_moto, running_moto_process, stop

CREDS = {"access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with running_moto() as url:
        yield url


def _client(url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def client(endpoint: str) -> Any:
    return _client(endpoint)


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"dumps-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def _settings(url: str, bucket: str, **over: Any) -> S3Settings:
    base: dict[str, Any] = {
        "endpoint_url": url,
        "bucket": bucket,
        "part_size": 5 * MiB,
        "max_attempts": 2,
        "connect_timeout_sec": 1.0,
        "read_timeout_sec": 5.0,
        **CREDS,
    }
    return S3Settings(**(base | over))


@pytest.fixture
def store(endpoint: str, bucket: str) -> S3Store:
    return S3Store(_settings(endpoint, bucket))


def _dump(tmp_path: Path, size: int, name: str = "vm1-20250101T000000Z.mem.gz") -> Path:
    p = tmp_path / name
    with p.open("wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return p


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _no_uploads(client: Any, bucket: str) -> bool:
    return not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_multipart_upload_is_verified_and_reads_back(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 12 * MiB)  # 5 + 5 + 2 MiB
    sha = _sha(path)
    seen: list[tuple[int, int | None]] = []
    obj = store.upload(
        path, gz_sha256=sha, size=12 * MiB, progress=lambda d, t: seen.append((d, t))
    )

    assert obj.key == f"memdump/{path.name}"
    assert obj.uri == f"s3://{bucket}/memdump/{path.name}"
    assert obj.size == 12 * MiB
    assert obj.etag.endswith("-3")
    assert obj.checksum_sha256 is not None and obj.checksum_sha256.endswith("-3")
    assert seen == [(5 * MiB, 12 * MiB), (10 * MiB, 12 * MiB), (12 * MiB, 12 * MiB)]

    assert store.exists(obj.key)
    head = client.head_object(Bucket=bucket, Key=obj.key)
    assert head["ContentLength"] == 12 * MiB
    assert head["Metadata"]["sha256-gz"] == sha
    assert client.get_object(Bucket=bucket, Key=obj.key)["Body"].read() == path.read_bytes()
    assert store.sha256(obj.key) == sha
    with path.open("rb") as f:
        f.seek(5 * MiB - 10)
        assert store.read_range(obj.key, 5 * MiB - 10, 20) == f.read(20)
    assert _no_uploads(client, bucket)

    store.delete(obj.key)
    assert not store.exists(obj.key)


def test_small_file_is_one_part_under_a_given_key(store: S3Store, tmp_path: Path) -> None:
    path = _dump(tmp_path, 1000)
    obj = store.upload(path, "elsewhere/x.mem.gz", gz_sha256=_sha(path), size=1000)
    assert obj.key == "elsewhere/x.mem.gz" and obj.size == 1000
    assert obj.etag.endswith("-1")
    assert b"".join(store.open_stream(obj.key, chunk_size=100)) == path.read_bytes()


@pytest.mark.parametrize(
    ("sse", "kms"), [("AES256", None), ("aws:kms", None), ("aws:kms", "alias/memdump")]
)
def test_server_side_encryption_headers(
    endpoint: str, client: Any, bucket: str, tmp_path: Path, sse: str, kms: str | None
) -> None:
    # moto records SSE-KMS but has no KMS behind it: this checks the headers only
    store = S3Store(_settings(endpoint, bucket, sse=sse, kms_key_id=kms))
    path = _dump(tmp_path, 6 * MiB)
    obj = store.upload(path, gz_sha256=_sha(path), size=6 * MiB)
    head = client.head_object(Bucket=bucket, Key=obj.key)
    assert head["ServerSideEncryption"] == sse
    if kms:
        assert head["SSEKMSKeyId"] == kms


def test_lied_sha256_aborts_and_leaves_nothing(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 11 * MiB)
    with pytest.raises(OffloadIntegrityError) as ei:
        store.upload(path, gz_sha256="0" * 64, size=11 * MiB)
    assert not ei.value.retryable
    assert ei.value.fields["actual_sha256"] == _sha(path)
    assert not store.exists(store.key_for(path))
    assert _no_uploads(client, bucket)


def test_wrong_size_fails_before_any_request(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 1000)
    with pytest.raises(OffloadIntegrityError) as ei:
        store.upload(path, gz_sha256=_sha(path), size=999)
    assert (ei.value.fields["expected_size"], ei.value.fields["actual_size"]) == (999, 1000)
    assert _no_uploads(client, bucket)


def test_missing_local_file_is_a_storage_error(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as ei:
        store.upload(tmp_path / "gone.mem.gz", gz_sha256="0" * 64, size=1)
    assert not ei.value.retryable


class _Tampering:
    """A client whose completed object is replaced by other bytes before verification."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def complete_multipart_upload(self, **kw: Any) -> Any:
        done = self._real.complete_multipart_upload(**kw)
        self._real.put_object(Bucket=kw["Bucket"], Key=kw["Key"], Body=b"not the dump")
        return done


def test_an_object_replaced_by_another_writer_is_left_alone(
    endpoint: str, client: Any, bucket: str, tmp_path: Path
) -> None:
    # Changed for issue 11 (item 1): this test used to expect the object deleted. The
    # object at the key after completion is not the one this upload created (its ETag
    # differs): it is someone else's, so it is reported and kept.
    store = S3Store(_settings(endpoint, bucket), client=_Tampering(_client(endpoint)))
    path = _dump(tmp_path, 6 * MiB)
    with pytest.raises(OffloadIntegrityError) as ei:
        store.upload(path, gz_sha256=_sha(path), size=6 * MiB)
    err = ei.value
    assert not err.retryable and err.fields["op"] == "verify"
    assert not err.fields["deleted"] and not err.fields["ours"]
    assert any("size" in p for p in err.fields["problems"])
    body = client.get_object(Bucket=bucket, Key=store.key_for(path))["Body"].read()
    assert body == b"not the dump"


class _LyingHead:
    """A client whose head_object misreports the metadata of the object we just made."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def head_object(self, **kw: Any) -> Any:
        head = self._real.head_object(**kw)
        head["Metadata"] = {"sha256-gz": "f" * 64}
        return head


@pytest.mark.parametrize("versioned", [False, True])
def test_an_unverified_object_of_our_own_is_deleted(
    endpoint: str, client: Any, bucket: str, tmp_path: Path, versioned: bool
) -> None:
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store = S3Store(_settings(endpoint, bucket), client=_LyingHead(_client(endpoint)))
    path = _dump(tmp_path, 6 * MiB)
    with pytest.raises(OffloadIntegrityError) as ei:
        store.upload(path, gz_sha256=_sha(path), size=6 * MiB)
    assert ei.value.fields["ours"] and ei.value.fields["deleted"]
    key = store.key_for(path)
    assert not store.exists(key)
    if versioned:  # the version we made is gone, not just hidden behind a delete marker
        assert not client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions")


def test_failure_mid_upload_aborts_the_multipart_upload(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 12 * MiB)

    def interrupt(done: int, total: int | None) -> None:
        if done >= 5 * MiB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.upload(path, gz_sha256=_sha(path), size=12 * MiB, progress=interrupt)
    assert _no_uploads(client, bucket)
    assert not store.exists(store.key_for(path))


def test_missing_bucket_is_not_retryable(endpoint: str, tmp_path: Path) -> None:
    store = S3Store(_settings(endpoint, "no-such-bucket-here"))
    path = _dump(tmp_path, 1000)
    with pytest.raises(StorageError) as ei:
        store.upload(path, gz_sha256=_sha(path), size=1000)
    err = ei.value
    assert isinstance(err, ObjectNotFoundError) and not err.retryable
    assert err.fields["code"] == "NoSuchBucket" and err.fields["http_status"] == 404
    assert err.fields["bucket"] == "no-such-bucket-here"
    assert err.fields["op"] == "create_multipart_upload"
    with pytest.raises(ObjectNotFoundError):
        store.check_bucket()


def test_missing_object(store: S3Store) -> None:
    assert not store.exists("memdump/nothing")
    store.delete("memdump/nothing")  # S3 deletes are idempotent
    with pytest.raises(ObjectNotFoundError) as ei:
        store.read_range("memdump/nothing", 0, 10)
    assert ei.value.fields["code"] == "NoSuchKey"


def _timed(fn: Callable[[], object]) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        fn()
    return ei.value, time.monotonic() - t0


def test_closed_port_is_retryable_and_bounded(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store(_settings(f"http://127.0.0.1:{port}", "dumps"))
    path = _dump(tmp_path, 1000)
    err, took = _timed(lambda: store.upload(path, gz_sha256=_sha(path), size=1000))
    assert isinstance(err, ObjectStoreUnavailableError) and err.retryable
    assert err.fields["cause"] == "EndpointConnectionError" and err.fields["code"] is None
    assert took < 20


def test_server_stopped_mid_upload_is_retryable_and_bounded(tmp_path: Path) -> None:
    path = _dump(tmp_path, 12 * MiB)
    sha = _sha(path)
    with running_moto_process() as (url, proc):
        _client(url).create_bucket(Bucket="dumps")
        store = S3Store(_settings(url, "dumps"))

        def kill_server(done: int, total: int | None) -> None:
            if done == 5 * MiB:
                stop(proc)  # after the first part: the next one finds nobody

        err, took = _timed(
            lambda: store.upload(path, gz_sha256=sha, size=12 * MiB, progress=kill_server)
        )
    assert isinstance(err, ObjectStoreUnavailableError) and err.retryable
    assert err.fields["op"] == "upload_part" and err.fields["key"] == store.key_for(path)
    assert err.fields["abort_failed"] is True  # the server is gone: a lifecycle rule cleans up
    assert took < 20


def test_retention_deletes_the_object_and_its_manifest(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from memdump import retention
    from memdump.manifest import manifest_key
    from memdump.records.model import DumpRecord
    from memdump.records.sqlite import SQLiteRecordStore
    from memdump.settings import Settings

    s3 = _settings(endpoint, bucket)
    store = S3Store(s3)
    client = _client(endpoint)
    key = "memdump/vm-1_1.mem.gz"
    client.put_object(Bucket=bucket, Key=key, Body=b"x" * 1000)
    client.put_object(Bucket=bucket, Key=manifest_key(key), Body=b"{}")
    records = SQLiteRecordStore(tmp_path / "r.db")
    old = datetime.now(UTC) - timedelta(days=40)
    records.add(
        DumpRecord(
            old,
            "vm-1",
            "vm-1",
            "a" * 64,
            1.0,
            1000,
            1,
            2,
            3,
            f"s3://{bucket}/{key}",
            "b" * 64,
            2000,
            "lab",
        )  # fmt: skip
    )
    report = retention.apply(Settings(data_dir=tmp_path, s3=s3), records, days=30)
    assert report.freed_bytes == 1000 and report.errors == {}, report
    assert not store.exists(key) and not store.exists(manifest_key(key))
    assert records.list(1, 0)[0]["deleted_at"]


# -- issue 11: conditional writes, versions, locations -------------------------------------


def test_moto_honours_if_none_match_on_complete_multipart_upload(client: Any, bucket: str) -> None:
    """What the tests below can show: moto (5.2.5) refuses CompleteMultipartUpload with
    ``If-None-Match: *`` on an existing key (412 PreconditionFailed), as AWS S3 does.
    What they cannot: two completions racing inside S3 (AWS answers the loser 409
    ConditionalRequestConflict or 412; moto checks then writes, in one process)."""
    import botocore.exceptions

    key = "memdump/race.mem.gz"
    client.put_object(Bucket=bucket, Key=key, Body=b"first")
    up = client.create_multipart_upload(Bucket=bucket, Key=key)
    part = client.upload_part(
        Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"second"
    )
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=up["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
            IfNoneMatch="*",
        )
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"


def test_an_existing_key_fails_the_upload_and_nothing_is_deleted(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 6 * MiB)
    key = store.key_for(path)
    client.put_object(Bucket=bucket, Key=key, Body=b"another collector's dump")
    with pytest.raises(StorageError) as ei:
        store.upload(path, gz_sha256=_sha(path), size=6 * MiB)
    assert type(ei.value).__name__ == "ObjectExistsError"
    assert not ei.value.retryable and ei.value.fields["http_status"] == 412
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"another collector's dump"
    assert _no_uploads(client, bucket)


def test_a_retried_upload_of_the_same_bytes_is_done_other_bytes_are_not(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 6 * MiB)
    sha = _sha(path)
    first = store.upload(path, gz_sha256=sha, size=6 * MiB)
    again = store.upload(path, gz_sha256=sha, size=6 * MiB)  # the first answer was "lost"
    assert again.key == first.key and store.sha256(first.key) == sha
    # Same size and a forged sha256-gz metadata, other bytes: still someone else's object.
    other = tmp_path / "other"
    other.write_bytes(os.urandom(6 * MiB))
    forged = "memdump/forged.mem.gz"
    client.put_object(
        Bucket=bucket, Key=forged, Body=other.read_bytes(), Metadata={"sha256-gz": sha}
    )
    with pytest.raises(StorageError) as ei:
        store.upload(path, forged, gz_sha256=sha, size=6 * MiB)
    assert type(ei.value).__name__ == "ObjectExistsError"
    assert client.get_object(Bucket=bucket, Key=forged)["Body"].read() == other.read_bytes()


def test_version_id_is_returned_on_a_versioned_bucket(
    store: S3Store, client: Any, bucket: str, tmp_path: Path
) -> None:
    path = _dump(tmp_path, 1000)
    assert store.upload(path, gz_sha256=_sha(path), size=1000).version_id is None
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    path2 = _dump(tmp_path, 1000, name="lab_1_20261129T015216.123456Z_00aa00.mem.gz")
    obj = store.upload(path2, gz_sha256=_sha(path2), size=1000)
    assert obj.version_id
    assert client.head_object(Bucket=bucket, Key=obj.key)["VersionId"] == obj.version_id


def _located(
    tmp_path: Path, store: S3Store, collector: str, *, keep_local: bool = True
) -> tuple[Any, Path]:
    """A dump offloaded the way offload_dump does it: local copy + object + manifests."""
    import dataclasses
    from datetime import UTC, datetime, timedelta

    from memdump.manifest import manifest_path
    from tests.helpers.dumps import stored

    rec = stored(
        tmp_path / "dumps", "100", datetime.now(UTC) - timedelta(days=40), 1000,
        collector=collector,
    )  # fmt: skip
    path = Path(rec.dump_path)
    rec = dataclasses.replace(rec, gz_sha256=_sha(path))
    obj = store.upload(path, gz_sha256=rec.gz_sha256, size=1000)
    mpath = manifest_path(path)
    store.upload(mpath, gz_sha256=_sha(mpath), size=mpath.stat().st_size)
    return dataclasses.replace(rec, s3_uri=obj.uri, s3_version_id=obj.version_id or ""), path


@pytest.mark.parametrize("versioned", [False, True])
def test_retention_deletes_offloaded_copies_with_keep_local(
    endpoint: str, client: Any, bucket: str, tmp_path: Path, versioned: bool
) -> None:
    from memdump import retention
    from memdump.manifest import manifest_key, manifest_path
    from memdump.records.sqlite import SQLiteRecordStore
    from memdump.settings import Settings

    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3 = _settings(endpoint, bucket)  # keep_local defaults to true
    store = S3Store(s3)
    rec, path = _located(tmp_path, store, "col-1")
    key = rec.s3_uri.removeprefix(f"s3://{bucket}/")
    assert bool(rec.s3_version_id) == versioned
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    settings = Settings(data_dir=tmp_path, dump_dir=tmp_path / "dumps", s3=s3, collector_id="col-1")
    report = retention.apply(settings, records, days=30)
    assert report.errors == {} and report.deleted == [rec.dump_path], report
    assert report.freed_bytes == 2000  # both copies
    assert not path.exists() and not manifest_path(path).exists()
    assert not store.exists(key) and not store.exists(manifest_key(key))
    if versioned:  # the recorded version itself is gone, and the manifest's
        versions = client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
        assert rec.s3_version_id not in [v["VersionId"] for v in versions]
        mkey = manifest_key(key)
        assert not client.list_object_versions(Bucket=bucket, Prefix=mkey).get("Versions")
    row = records.list(1, 0)[0]
    assert row["deleted_at"] and row["local_deleted_at"] and row["s3_deleted_at"]


def test_retention_with_a_copy_on_another_collector(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    from memdump import retention
    from memdump.records.sqlite import SQLiteRecordStore
    from memdump.settings import Settings

    s3 = _settings(endpoint, bucket)
    store = S3Store(s3)
    rec, path = _located(tmp_path, store, "col-2")
    key = rec.s3_uri.removeprefix(f"s3://{bucket}/")
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    here = Settings(data_dir=tmp_path, dump_dir=tmp_path / "dumps", s3=s3, collector_id="col-1")
    report = retention.apply(here, records, days=30)
    # The object goes; col-2's local copy stays for col-2, and the record is not marked.
    assert report.errors == {} and report.deleted == [] and rec.dump_path in report.left
    assert not store.exists(key) and path.exists()
    row = records.list(1, 0)[0]
    assert row["s3_deleted_at"] and not row["local_deleted_at"] and not row["deleted_at"]
    # col-2's run finishes the job without touching S3 again.
    there = here.model_copy(update={"collector_id": "col-2"})
    report = retention.apply(there, records, days=30)
    assert report.errors == {} and report.deleted == [rec.dump_path] and not path.exists()
    assert records.list(1, 0)[0]["deleted_at"]


def test_a_key_outside_the_prefix_is_refused_by_retention_and_verify(
    endpoint: str, client: Any, bucket: str, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from memdump import retention
    from memdump.errors import LocationError
    from memdump.records.model import DumpRecord
    from memdump.records.sqlite import SQLiteRecordStore
    from memdump.settings import Settings
    from memdump.verify import verify

    s3 = _settings(endpoint, bucket)
    outside = "backups/101_1699520400.mem.gz"  # a dump-like name, outside memdump/
    client.put_object(Bucket=bucket, Key=outside, Body=b"not memdump's")
    rec = DumpRecord(
        datetime.now(UTC) - timedelta(days=40), "vm-1", "vm-1", "a" * 64, 1.0, 13, 1, 2, 3,
        f"s3://{bucket}/{outside}", "b" * 64, 13, "lab",
    )  # fmt: skip
    records = SQLiteRecordStore(tmp_path / "r.db")
    records.add(rec)
    settings = Settings(data_dir=tmp_path, dump_dir=tmp_path / "dumps", s3=s3)
    report = retention.apply(settings, records, days=30)
    assert report.deleted == [] and "refused" in report.errors[rec.dump_path]
    assert client.get_object(Bucket=bucket, Key=outside)["Body"].read() == b"not memdump's"
    assert records.list(1, 0)[0]["deleted_at"] == ""
    with pytest.raises(LocationError):
        verify(records.list(1, 0)[0], settings)
