"""The production shape: InfluxDB 3 records (the project's test server, real client) and S3
offload (moto server). A verified object replaces the local file and the record points
at it; with S3 down the VM fails with the S3 error, the local file is
kept and no record claims an object that does not exist."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import pytest
from isal import igzip

from memdump.manifest import manifest_key
from memdump.records.influxdb3 import InfluxDB3RecordStore
from memdump.settings import InfluxDB3Settings, S3Settings
from memdump.storage import S3Store
from tests.helpers.moto import running_moto_process, stop
from tests.helpers.stack import Stack, lab_inventory, running_stack
from tests.influxdb3_server import InfluxDB3TestServer

pytestmark = pytest.mark.lab

BASE = "/api/memory-dumps"
BUCKET = "forensics"


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[str, object]]:
    with running_moto_process() as (endpoint, proc):
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=BUCKET)
        yield endpoint, proc


@pytest.fixture(scope="module")
def influx() -> Iterator[InfluxDB3TestServer]:
    srv = InfluxDB3TestServer(host="127.0.0.1", port=0, token="s3-e2e").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3stack(
    moto: tuple[str, object],
    influx: InfluxDB3TestServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    inv = lab_inventory()
    with running_stack(
        tmp_path_factory.mktemp("s3stack"),
        inv,
        s3__endpoint_url=moto[0],
        s3__bucket=BUCKET,
        s3__access_key_id="test",
        s3__secret_access_key="test",
        s3__keep_local="false",
        s3__part_size=str(5 << 20),
        s3__max_attempts="1",
        s3__connect_timeout_sec="1",
        s3__read_timeout_sec="5",
        offload_retries="1",
        capture_retry_delay_sec="1",
        record_store="influxdb3",
        influxdb3__url=influx.url,
        influxdb3__token="s3-e2e",
    ) as st:
        yield st


def test_offload_then_outage(
    s3stack: Stack, moto: tuple[str, object], influx: InfluxDB3TestServer
) -> None:
    endpoint, proc = moto
    code, _ = s3stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-db-01"]})
    assert code == 200
    status = s3stack.wait_status()
    assert status["status"] == "completed", status
    _, recs = s3stack.call("GET", f"{BASE}/records")
    (rec,) = recs["records"]
    assert rec["dump_path"].startswith(f"s3://{BUCKET}/memdump/lab_vm-db-01_")
    # Every location is recorded: the object (no local copy with keep_local off).
    assert rec["s3_uri"] == rec["dump_path"] and rec["local_path"] == rec["collector"] == ""
    key = rec["dump_path"].removeprefix(f"s3://{BUCKET}/")
    # The record is in InfluxDB, read back directly with the real client.
    direct = InfluxDB3RecordStore(InfluxDB3Settings(url=influx.url, token="s3-e2e"))
    # As stored, and as the API lists it: with the API's check of its signature (the
    # stack trusts its collector's key).
    assert direct.list(10, 0) == [{k: v for k, v in rec.items() if k != "signature_status"}]
    assert rec["signature_status"] == "valid"
    dumps = s3stack.data_dir / "dumps"
    assert list(dumps.glob("*.mem.gz")) == []  # keep_local off: only the verified object
    store = S3Store(
        S3Settings(
            endpoint_url=endpoint, bucket=BUCKET, access_key_id="test", secret_access_key="test"
        )
    )
    body = b"".join(store.open_stream(key))
    assert len(body) == rec["gzip_size_bytes"]
    assert hashlib.sha256(igzip.decompress(body)).hexdigest() == rec["sha256"]
    # The manifest sits beside the object, and the record holds its hash.
    mkey = manifest_key(key)
    assert mkey == key.removesuffix(".mem.gz") + ".manifest.json"
    manifest = b"".join(store.open_stream(mkey))
    assert hashlib.sha256(manifest).hexdigest() == rec["manifest_sha256"]
    assert json.loads(manifest)["output"]["gz_sha256"] == rec["gz_sha256"]
    assert list(dumps.glob("*.manifest.json")) == []  # gone locally with the dump
    # Verification re-reads the object from S3.
    code, v = s3stack.call("POST", f"{BASE}/verify", {"dump_path": rec["dump_path"]})
    assert code == 200 and v["status"] == "verified", v
    store.delete(key)  # the object is deleted behind our back
    code, v = s3stack.call("POST", f"{BASE}/verify", {"dump_path": rec["dump_path"]})
    assert code == 200 and v["status"] == "missing", v

    stop(proc)  # S3 goes away
    code, _ = s3stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01"]})
    assert code == 200
    status = s3stack.wait_status()
    assert status["status"] == "failed", status
    assert "vm-web-01" in status["error"] and "offload failed" in status["error"]
    kept = list(dumps.glob("lab_vm-web-01_*.mem.gz"))
    assert len(kept) == 1 and not list(dumps.glob("*.part"))
    raw = igzip.decompress(Path(kept[0]).read_bytes())
    assert raw[:4] == b"\x7fELF"
    _, recs = s3stack.call("GET", f"{BASE}/records")
    assert [r["vmid"] for r in recs["records"]] == ["vm-db-01"]  # no record for it
