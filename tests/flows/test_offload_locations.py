"""The chain's offload records every location of a dump (issue 11, item 3): the S3 URI
and VersionId beside the local copy, and with keep_local off the local copy is cleared
(a real moto server; memdump.chain.offload, which the capture task runs)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memdump.manifest import manifest_path
from tests.helpers.dumps import stored
from tests.helpers.moto import new_bucket


@pytest.mark.parametrize(("keep_local", "versioned"), [(True, True), (False, False)])
def test_offload_records_every_location(
    moto_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    keep_local: bool,
    versioned: bool,
) -> None:
    from memdump.chain import offload
    from memdump.locations import Location
    from memdump.settings import Settings

    client, bucket = new_bucket(moto_url, "loc")
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for k, v in {
        "ENDPOINT_URL": moto_url,
        "BUCKET": bucket,
        "ACCESS_KEY_ID": "t",
        "SECRET_ACCESS_KEY": "t",
        "KEEP_LOCAL": str(keep_local).lower(),
    }.items():
        monkeypatch.setenv(f"MEMDUMP_S3__{k}", v)
    rec = stored(tmp_path / "dumps", "100", datetime.now(UTC), 1000, collector="col-1")
    path = Path(rec.dump_path)
    mpath = manifest_path(path)
    rec = dataclasses.replace(
        rec,
        gz_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        manifest_sha256=hashlib.sha256(mpath.read_bytes()).hexdigest(),
    )

    out, where = offload(rec, Settings())

    uri = f"s3://{bucket}/memdump/{path.name}"
    assert out.s3_uri == uri
    assert where == Location("s3", uri, version_id=out.s3_version_id)
    head = client.head_object(Bucket=bucket, Key=f"memdump/{path.name}")
    if versioned:
        assert out.s3_version_id and out.s3_version_id == head["VersionId"]
    else:
        assert out.s3_version_id == ""
    if keep_local:
        assert (out.dump_path, out.local_path, out.collector) == (str(path), str(path), "col-1")
        assert path.exists()
    else:
        assert (out.dump_path, out.local_path, out.collector) == (uri, "", "")
        assert not path.exists() and not mpath.exists()
