"""Issue 15, item 4 on the real parts: a lab capture through the real chain with
MEMDUMP_TSA_URL set (the local TSA on loopback: OpenSSL's ``openssl ts -reply``,
tests/helpers/tsa.py) gets its manifest's token beside it, which ``openssl ts -verify``
accepts without memdump and verify reports valid; with the TSA down the capture completes
all the same, the token pending, and fetched once the TSA is up; offloaded to the moto S3
server the token travels beside the manifest, a pending one is uploaded there later, and
retention's delete takes it with the dump."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from memdump import custody
from memdump import timestamping as ts
from memdump.chain import run_chain
from memdump.cli.app import main
from memdump.hypervisors import Driver
from memdump.locations import Location
from memdump.manifest import manifest_key, manifest_path
from memdump.settings import S3Settings, Settings
from memdump.signing import trusted_keys
from memdump.stored import open_stored
from memdump.verify import verify
from tests.helpers.moto import new_bucket
from tests.helpers.stores import record_row
from tests.helpers.tsa import LocalTSA, closed_url, local_tsa

pytestmark = pytest.mark.lab

VM = "vm-web-01"


@pytest.fixture
def tsa(tmp_path: Path) -> Iterator[LocalTSA]:
    with local_tsa(tmp_path / "tsa") as t:
        yield t


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, tsa: LocalTSA) -> Settings:
    return settings.model_copy(
        update={
            "data_dir": tmp_path / "data",
            "analysis": settings.analysis.model_copy(update={"enabled": False}),
            "tsa_url": tsa.url,
            "tsa_ca_file": tsa.ca,
        }
    )


def test_a_lab_capture_gets_a_token_openssl_accepts(
    driver: Driver, settings: Settings, tsa: LocalTSA
) -> None:
    done = run_chain(driver, driver.resolve(VM), settings, mode="paused")
    assert done.timestamp is not None and done.timestamp.status == "granted", done.timestamp
    mpath = manifest_path(Path(done.record.dump_path))
    tsr = ts.tsr_path(mpath)
    assert stat.S_IMODE(tsr.stat().st_mode) == 0o600
    # The token binds the file the record's manifest_sha256 names.
    resp = ts.parse_response(tsr.read_bytes())
    assert resp.tst is not None
    assert resp.tst.hashed.hex() == done.record.manifest_sha256
    # The examiner's check, openssl alone.
    out = subprocess.run(
        ["openssl", "ts", "-verify", "-data", str(mpath), "-in", str(tsr), "-CAfile", str(tsa.ca)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "Verification: OK" in out.stdout, out
    v = verify(record_row(settings, done.record.dump_path), settings)
    assert v.status == "verified", v
    assert v.timestamp is not None and v.timestamp["status"] == "valid"


def test_a_tsa_down_never_fails_a_capture_and_the_token_comes_later(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `memdump capture` with the TSA down: it completes (exit 0, a record) and says so.
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    env = {
        "MEMDUMP_INVENTORY_FILE": settings.inventory_file,
        "MEMDUMP_DUMP_DIR": settings.dump_dir,
        "MEMDUMP_DATA_DIR": settings.data_dir,
        "MEMDUMP_SIGNING_KEY_FILE": settings.signing_key_file,
        "MEMDUMP_TRUSTED_KEYS": settings.trusted_keys,
        "MEMDUMP_ANALYSIS__ENABLED": "false",
        "MEMDUMP_TSA_URL": closed_url(),
        "MEMDUMP_TSA_CA_FILE": settings.tsa_ca_file,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    assert main(["capture", VM, "--mode", "paused"]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert "trusted timestamp pending" in err, err
    mpath = manifest_path(Path(record["dump_path"]))
    assert mpath.is_file() and not ts.tsr_path(mpath).exists()
    row = record_row(settings, record["dump_path"])
    v = verify(row, settings)
    assert v.status == "verified" and v.timestamp is not None
    assert v.timestamp["status"] == "pending"
    # The TSA is up again: `memdump timestamps flush` (the runner's loop does the same).
    monkeypatch.setenv("MEMDUMP_TSA_URL", str(settings.tsa_url))
    assert main(["timestamps", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["depth"] == 1
    assert main(["timestamps", "flush"]) == 0
    assert json.loads(capsys.readouterr().out) == {"fetched": 1, "left": 0, "last_error": ""}
    v = verify(row, settings)
    assert v.status == "verified" and v.timestamp is not None
    assert v.timestamp["status"] == "valid"
    gen_time = v.timestamp["gen_time"]
    # Fetched later: genTime (whole seconds here) is not before the capture started.
    assert gen_time[:19] >= str(row["timestamp"])[:19]


def test_offloaded_the_token_travels_beside_the_manifest(
    driver: Driver, settings: Settings, moto_url: str
) -> None:
    client, bucket = new_bucket(moto_url, "tsr")
    s3 = S3Settings(
        bucket=bucket, endpoint_url=moto_url, access_key_id="t", secret_access_key=SecretStr("t"),
        keep_local=False,
    )  # fmt: skip
    s = settings.model_copy(update={"s3": s3})
    done = run_chain(driver, driver.resolve(VM), s, mode="paused")
    key = done.record.dump_path.removeprefix(f"s3://{bucket}/")
    tkey = manifest_key(key) + ".tsr"
    assert [p for p in s.dump_dir.iterdir() if p.name.endswith(".tsr")] == []
    body = client.get_object(Bucket=bucket, Key=tkey)["Body"].read()
    assert ts.parse_response(body).tst is not None
    row = record_row(s, done.record.dump_path)
    v = verify(row, s)
    assert v.status == "verified" and v.timestamp is not None
    assert v.timestamp["status"] == "valid"

    # TSA down: the token is pending, and the flush uploads it beside the object.
    down = s.model_copy(update={"tsa_url": closed_url()})
    late = run_chain(driver, driver.resolve(VM), down, mode="paused")
    assert late.timestamp is not None and late.timestamp.status == "pending"
    lkey = late.record.dump_path.removeprefix(f"s3://{bucket}/")
    (item,) = ts.TimestampQueue(ts.queue_path(s)).pending()
    assert (item.s3_key, item.manifest_path) == (manifest_key(lkey), "")
    assert ts.flush(s).left == 0
    late_tsr = client.get_object(Bucket=bucket, Key=manifest_key(lkey) + ".tsr")["Body"].read()
    mdata = client.get_object(Bucket=bucket, Key=manifest_key(lkey))["Body"].read()
    resp = ts.parse_response(late_tsr)
    assert resp.tst is not None and resp.tst.hashed == hashlib.sha256(mdata).digest()
    lv = verify(record_row(s, late.record.dump_path), s)
    assert lv.timestamp is not None and lv.timestamp["status"] == "valid"
    # The custody log beside the object says when the token came, and still checks out.
    mprefix = custody.log_prefix(lkey)
    listed = client.list_objects_v2(Bucket=bucket, Prefix=mprefix).get("Contents", [])
    keys = sorted((o["Key"] for o in listed), key=lambda k: int(k.rsplit("/", 1)[-1].split(".")[0]))
    lines = [client.get_object(Bucket=bucket, Key=k)["Body"].read().rstrip(b"\n") for k in keys]
    events = [json.loads(line) for line in lines]
    stamps = [e["details"] for e in events if e["event"] == "timestamped"]
    assert [d["status"] for d in stamps] == ["pending", "granted"]
    assert stamps[-1]["late"] is True
    chain = custody.check_chain(lines, trusted_keys(s), late.record.manifest_sha256)
    assert chain.ok, chain
    # A second flush of the same request (the runner's loop and the CLI at once) finds
    # the token there: done, never replaced.
    queue = ts.TimestampQueue(ts.queue_path(s))
    queue.put(item.manifest_sha256, Path(""), "again")
    queue.located(item.manifest_sha256, s3_key=manifest_key(lkey), local_kept=False)
    assert ts.flush(s).left == 0
    again = client.get_object(Bucket=bucket, Key=manifest_key(lkey) + ".tsr")["Body"].read()
    assert again == late_tsr

    # Retention's delete of the dump takes its token too.
    open_stored(Location.of(done.record.dump_path), s).delete()
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert tkey not in [o["Key"] for o in listed]
