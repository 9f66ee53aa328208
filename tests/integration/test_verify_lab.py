"""Verification of real lab captures: verified as captured; a flipped byte in the .gz,
an edited manifest, a missing manifest and a deleted dump are each caught, through the
engine, the API and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from memdump.capture import capture
from memdump.hypervisors import Driver
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.verify import verify

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
BASE = "/api/memory-dumps"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"data_dir": tmp_path / "data"})


@pytest.fixture
def captured(driver: Driver, settings: Settings) -> tuple[dict[str, object], SQLiteRecordStore]:
    rec = capture(driver, driver.resolve("vm-db-01"), settings).record
    store = SQLiteRecordStore(settings.records_db)
    store.add(rec)
    (row,) = store.list(1, 0)
    return row, store


def test_verified_then_each_kind_of_damage_is_caught(
    captured: tuple[dict[str, object], SQLiteRecordStore], settings: Settings
) -> None:
    row, store = captured
    v = verify(row, settings)
    assert v.status == "verified", v
    assert all(c["ok"] for c in v.checks.values()), v.checks

    dump = Path(str(row["dump_path"]))
    data = bytearray(dump.read_bytes())
    original = bytes(data)
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the compressed stream
    dump.write_bytes(data)
    v = verify(row, settings)
    assert v.status == "mismatch" and "gz_sha256" in v.detail, v
    assert not v.checks["gz_sha256"]["ok"]
    dump.write_bytes(original)
    assert verify(row, settings).status == "verified"

    mpath = manifest_path(dump)
    doc = json.loads(mpath.read_text())
    doc["vm"]["name"] = "someone-else"
    saved = mpath.read_bytes()
    mpath.write_text(json.dumps(doc))
    v = verify(row, settings)
    assert v.status == "mismatch" and "manifest_sha256" in v.detail, v
    mpath.unlink()
    v = verify(row, settings)
    assert v.status == "mismatch" and "manifest is missing" in v.detail, v
    mpath.write_bytes(saved)

    dump.unlink()
    v = verify(row, settings)
    assert v.status == "missing", v


def test_api_and_cli(
    captured: tuple[dict[str, object], SQLiteRecordStore], settings: Settings
) -> None:
    row, store = captured
    client = TestClient(create_app(settings, store=store), base_url="http://localhost")
    r = client.post(f"{BASE}/verify", json={"dump_path": row["dump_path"]})
    assert r.status_code == 200 and r.json()["status"] == "verified", r.text
    r = client.post(f"{BASE}/verify", json={"vmid": row["vmid"], "timestamp": row["timestamp"]})
    assert r.status_code == 200 and r.json()["status"] == "verified", r.text
    # A path the store does not know is never opened: 404, whatever the file system holds.
    r = client.post(f"{BASE}/verify", json={"dump_path": "/etc/passwd"})
    assert r.status_code == 404 and r.json() == {"detail": "No record for /etc/passwd"}
    for bad in ({}, {"vmid": "x"}, {"dump_path": "a", "vmid": "b", "timestamp": "c"}):
        assert client.post(f"{BASE}/verify", json=bad).status_code == 400

    env = {
        **os.environ,
        "MEMDUMP_DATA_DIR": str(settings.data_dir),
        "MEMDUMP_DUMP_DIR": str(settings.dump_dir),
        "MEMDUMP_TRUSTED_KEYS": str(settings.trusted_keys),  # the lab's key (issue 15)
    }
    cli = [sys.executable, "-m", "memdump.cli", "verify"]
    out = subprocess.run(
        [*cli, str(row["dump_path"])], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "verified", out
    out = subprocess.run(
        [*cli, "--since-days", "1"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and [json.loads(x)["status"] for x in out.stdout.splitlines()] == [
        "verified"
    ], out
    Path(str(row["dump_path"])).unlink()
    out = subprocess.run(
        [*cli, str(row["dump_path"])], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 1 and json.loads(out.stdout)["status"] == "missing", out
