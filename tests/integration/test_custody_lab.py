"""Issue 15, item 3 on the real parts: a lab capture through the real chain starts its
custody log (captured with the trigger and collector, analysed with the check's status),
verify adds ``verified``, a retention run adds ``deleted`` and keeps the log; offloaded
to the moto S3 server, the log's entries are objects beside the dump's (one per entry,
written once), and `memdump custody` of a tampered log exits 1 naming the entry. The
chain checks out with python's cryptography and hashlib alone (the README's recipe)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from memdump import custody
from memdump.chain import run_chain
from memdump.cli.custody import cmd_copy, cmd_custody
from memdump.hypervisors import Driver
from memdump.manifest import manifest_key, manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.retention import apply
from memdump.settings import S3Settings, Settings
from memdump.signing import canonical
from memdump.verify import verify
from tests.helpers.moto import new_bucket
from tests.helpers.stores import record_row

pytestmark = pytest.mark.lab

VM = "vm-web-01"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"data_dir": tmp_path / "data", "collector_id": "lab-col"})


def _offloading(settings: Settings, moto_url: str, name: str) -> tuple[Any, str, Settings]:
    """A new bucket on the moto server, and ``settings`` offloading to it (no local copy)."""
    client, bucket = new_bucket(moto_url, name)
    s3 = S3Settings(
        bucket=bucket, endpoint_url=moto_url, access_key_id="t", secret_access_key=SecretStr("t"),
        keep_local=False,
    )  # fmt: skip
    return client, bucket, settings.model_copy(update={"s3": s3})


def _custody(settings: Settings, dump: str, capsys: Any) -> tuple[int, dict[str, Any]]:
    rc = cmd_custody(settings, argparse.Namespace(dump=dump, json=True, no_record=False))
    return rc, json.loads(capsys.readouterr().out)


def _examiner_check(lines: list[bytes], manifest_sha256: str, trusted: set[str]) -> None:
    """The README's recipe, with hashlib, json and cryptography only."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    prev = manifest_sha256
    for i, line in enumerate(lines):
        e = json.loads(line)
        assert e["index"] == i and e["prev"] == prev
        body = {k: v for k, v in e.items() if k != "signature"}
        message = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        public = base64.b64decode(e["by"]["public_key"])
        assert hashlib.sha256(public).hexdigest() in trusted
        Ed25519PublicKey.from_public_bytes(public).verify(
            base64.b64decode(e["signature"]), message.encode()
        )
        prev = hashlib.sha256(line).hexdigest()


def test_a_lab_capture_is_logged_verified_and_deleted_and_the_log_stays(
    driver: Driver, settings: Settings, capsys: Any
) -> None:
    done = run_chain(driver, driver.resolve(VM), settings, trigger={"source": "cli"})
    dump = Path(done.record.dump_path)
    path = custody.log_path(dump)
    assert path.parent == manifest_path(dump).parent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = custody.LocalLog(path).read()
    docs = [json.loads(x) for x in lines]
    assert [d["event"] for d in docs] == ["captured", "analysed"]
    assert docs[0]["prev"] == done.record.manifest_sha256
    cap = docs[0]["details"]
    assert cap["source"] == "cli" and cap["collector_id"] == "lab-col"
    assert cap["sha256"] == done.record.sha256 and docs[0]["by"]["collector_id"] == "lab-col"
    assert docs[1]["details"]["status"] == done.record.analysis != ""

    row = record_row(settings, str(dump))
    v = verify(row, settings, by="flow")
    assert v.custody is not None and v.custody["status"] == "intact", v.custody
    docs = [json.loads(x) for x in custody.LocalLog(path).read()]
    assert docs[-1]["event"] == "verified"
    assert docs[-1]["details"]["status"] == v.status and docs[-1]["details"]["by"] == "flow"

    store = SQLiteRecordStore(settings.records_db)
    later = datetime.now(UTC) + timedelta(days=30)
    report = apply(settings, store, later, days=1)
    assert str(dump) in report.deleted
    assert not dump.exists() and not manifest_path(dump).exists()
    lines = custody.LocalLog(path).read()  # the log outlives the dump
    last = json.loads(lines[-1])
    assert last["event"] == "deleted" and last["details"]["copy"] == "local"
    assert "retention" in last["details"]["why"]
    trusted = set(settings.trusted_keys.read_text().split())  # type: ignore[union-attr]
    _examiner_check(lines, done.record.manifest_sha256, trusted)
    rc, found = _custody(settings, str(dump), capsys)
    assert rc == 0 and found["status"] == "intact" and found["entries"] == 4, found

    # Tampered: the analysed entry's status edited; then the deleted entry cut off.
    doc = json.loads(lines[1])
    doc["details"]["status"] = "passed" if doc["details"]["status"] != "passed" else "failed"
    edited = [lines[0], canonical(doc), *lines[2:]]
    path.write_bytes(b"".join(x + b"\n" for x in edited))
    rc, found = _custody(settings, str(dump), capsys)
    assert rc == 1 and found["problems"][0]["index"] == 1, found
    assert found["problems"][0]["kind"] == "edited"
    path.write_bytes(b"".join(x + b"\n" for x in lines[:-1]))
    rc, found = _custody(settings, str(dump), capsys)
    assert rc == 1 and [p["kind"] for p in found["problems"]] == ["truncated"], found


def test_offloaded_the_log_is_beside_the_object_one_object_per_entry(
    driver: Driver, settings: Settings, moto_url: str, capsys: Any
) -> None:
    client, bucket, s = _offloading(settings, moto_url, "custody")
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    done = run_chain(driver, driver.resolve(VM), s, trigger={"source": "api"})
    uri = done.record.dump_path
    key = uri.removeprefix(f"s3://{bucket}/")
    prefix = manifest_key(key).removesuffix(".manifest.json") + ".custody/"

    def entries() -> list[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in listed)

    assert entries() == [f"{prefix}{i:08d}.json" for i in range(3)]
    offloaded = json.loads(client.get_object(Bucket=bucket, Key=entries()[2])["Body"].read())
    assert offloaded["event"] == "offloaded" and offloaded["details"]["uri"] == uri
    assert offloaded["details"]["version_id"] == done.record.s3_version_id != ""
    # The local log is kept (the collector's copy); it is the S3 log's first entries.
    local = custody.LocalLog(custody.log_path(Path(done.capture.record.dump_path))).read()
    assert len(local) == 3

    row = record_row(s, uri)
    v = verify(row, s, by="api")
    assert v.custody is not None and v.custody["status"] == "intact", v.custody
    assert len(entries()) == 4
    report = apply(
        s, SQLiteRecordStore(s.records_db), datetime.now(UTC) + timedelta(days=30), days=1
    )
    assert uri in report.deleted, report
    assert client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) == 0
    keys = entries()  # the log stays after the last copy is gone
    assert len(keys) == 5
    last = json.loads(client.get_object(Bucket=bucket, Key=keys[-1])["Body"].read())
    assert last["event"] == "deleted" and last["details"]["copy"] == "s3"
    rc, found = _custody(s, uri, capsys)
    assert rc == 0 and found["entries"] == 5, found

    # The last entry deleted: the record (s3_deleted_at) knows of it.
    deleted = client.get_object(Bucket=bucket, Key=keys[-1])["Body"].read()
    client.delete_object(Bucket=bucket, Key=keys[-1])
    rc, found = _custody(s, uri, capsys)
    assert rc == 1 and found["problems"][0]["kind"] == "truncated", found
    client.put_object(Bucket=bucket, Key=keys[-1], Body=deleted)
    # A middle entry deleted: named by its index.
    client.delete_object(Bucket=bucket, Key=keys[1])
    rc, found = _custody(s, uri, capsys)
    assert rc == 1 and (found["problems"][0]["index"], found["problems"][0]["kind"]) == (
        1,
        "removed",
    ), found
    assert "entry 1 removed" in found["problems"][0]["detail"]


def test_memdump_copy_of_an_offloaded_dump_is_logged_and_carries_the_log(
    driver: Driver, settings: Settings, moto_url: str, capsys: Any, tmp_path: Path
) -> None:
    _, _, s = _offloading(settings, moto_url, "custody-copy")
    s = s.model_copy(update={"s3": s.s3.model_copy(update={"keep_local": True})})  # type: ignore[union-attr]
    done = run_chain(driver, driver.resolve(VM), s, trigger={"source": "cli"})
    uri, local = done.record.s3_uri, Path(done.record.local_path)
    assert uri.startswith("s3://") and done.record.dump_path == str(local)
    dest = tmp_path / "case"
    args = argparse.Namespace(dump_paths=[done.record.dump_path], to=str(dest), case="INC-7")
    assert cmd_copy(s, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["copied"] is True and out["gz_sha256"] == done.record.gz_sha256
    copy = dest / local.name
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == done.record.gz_sha256
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # The S3 log (captured, analysed, offloaded, copied) and the copy's log are the same.
    rc, found = _custody(s, uri, capsys)
    assert rc == 0 and found["status"] == "intact", found
    events = [e["event"] for e in found["entries_list"]]
    assert events[-1] == "copied" and "offloaded" in events, events
    assert found["entries_list"][-1]["details"]["case"] == "INC-7"
    copied_log = custody.LocalLog(custody.log_path(copy)).read()
    assert len(copied_log) == found["entries"]
    trusted = set(s.trusted_keys.read_text().split())  # type: ignore[union-attr]
    _examiner_check(copied_log, done.record.manifest_sha256, trusted)
    # Again into the same directory: refused, nothing written over, nothing logged.
    assert cmd_copy(s, args) == 1
    assert "exists already" in json.loads(capsys.readouterr().out)["detail"]
    rc, again = _custody(s, uri, capsys)
    assert again["entries"] == found["entries"]

    # The local file lost: the copy comes from the S3 object.
    local.unlink()
    args = argparse.Namespace(dump_paths=[done.record.dump_path], to=str(dest / "2"), case=None)
    assert cmd_copy(s, args) == 0, capsys.readouterr()
    out = json.loads(capsys.readouterr().out)
    assert out["gz_sha256"] == done.record.gz_sha256 and Path(out["to"]).name == local.name
    rc, last = _custody(s, uri, capsys)
    assert last["entries"] == found["entries"] + 1 and rc == 0, last
