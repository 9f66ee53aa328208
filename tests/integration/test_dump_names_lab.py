"""Issue 11, item 1 on the real parts: the same vmid captured on two hypervisors in the
same instant (two inventory entries pointing at the lab, the clock held still) gives two
files and two S3 keys (a real moto server), and neither dump overwrites the other."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from isal import igzip

import memdump.capture as capture_module
from memdump.capture import capture
from memdump.hypervisors import open_driver
from memdump.manifest import manifest_key, manifest_path
from memdump.settings import HypervisorConfig, S3Settings, Settings
from memdump.storage import S3Store

pytestmark = pytest.mark.lab

VM = "vm-db-01"
FROZEN = datetime(2026, 11, 29, 1, 52, 16, 123456, tzinfo=UTC)


class _Frozen(datetime):
    """memdump.capture's clock, held at one instant: both captures start 'at once'."""

    @classmethod
    def now(cls, tz: object = None) -> _Frozen:  # type: ignore[override]
        return cls.fromtimestamp(FROZEN.timestamp(), UTC)


def test_same_vmid_on_two_hypervisors_same_instant(
    lab_hv: HypervisorConfig, tmp_path: Path, moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_module, "datetime", _Frozen)
    bucket = f"names-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    client.create_bucket(Bucket=bucket)
    s3 = S3Settings(endpoint_url=moto_url, bucket=bucket, access_key_id="t", secret_access_key="t")
    hvs = [lab_hv.model_copy(update={"name": n}) for n in ("pve-a", "pve-b")]
    settings = Settings(
        hypervisors=hvs, dump_dir=tmp_path / "dumps", analysis={"enabled": False}, s3=s3
    )
    store = S3Store(s3)
    done = []
    for hv in hvs:
        driver = open_driver(hv, settings.ssh)
        try:
            rec = capture(driver, driver.resolve(VM), settings).record
        finally:
            driver.close()
        path = Path(rec.dump_path)
        obj = store.upload(path, gz_sha256=rec.gz_sha256, size=rec.gzip_size_bytes)
        mpath = manifest_path(path)
        store.upload(mpath, gz_sha256=rec.manifest_sha256, size=mpath.stat().st_size)
        done.append((rec, obj))

    (a, obj_a), (b, obj_b) = done
    assert a.timestamp == b.timestamp == FROZEN and a.vmid == b.vmid == VM
    name_a, name_b = Path(a.dump_path).name, Path(b.dump_path).name
    for hv, name in (("pve-a", name_a), ("pve-b", name_b)):
        assert re.fullmatch(rf"{hv}_{VM}_20261129T015216\.123456Z_[0-9a-f]{{6}}\.mem\.gz", name)
    assert obj_a.key != obj_b.key
    assert a.collector == b.collector == settings.collector_id
    assert (a.local_path, b.local_path) == (a.dump_path, b.dump_path)
    # Both dumps are whole and each is its own: nothing was overwritten.
    for rec, obj in done:
        body = b"".join(store.open_stream(obj.key))
        assert hashlib.sha256(body).hexdigest() == rec.gz_sha256
        assert hashlib.sha256(igzip.decompress(body)).hexdigest() == rec.sha256
        assert Path(rec.dump_path).read_bytes() == body
        assert store.exists(manifest_key(obj.key))
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert len(keys) == 4  # two dumps, two manifests
