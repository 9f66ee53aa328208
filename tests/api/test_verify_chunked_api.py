"""Issue 14, item 4, the API side: POST /verify keeps its answer's shape (status,
dump_path, detail, checks, seconds) and, for a chunked dump, its ``checks.chunks`` names
the first bad chunk with its raw and guest-physical ranges (the detail says it too)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from memdump.chunkedgz import read_index
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns
from tests.helpers.signing import trusting
from tests.helpers.verify_dumps import CHUNK, HIGH, core, file_offset, flip, guest_ram, write_dump

BASE = "/api/memory-dumps"


def test_verify_names_the_first_bad_chunk(tmp_path: Path) -> None:
    s = trusting(Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps"), tmp_path)
    made = write_dump(s.dump_dir, core(guest_ram(1)), settings=s)
    store = SQLiteRecordStore(s.records_db)
    store.add(made.record)
    c = TestClient(create_app(s, store=store, runs=FakeRuns()), base_url="http://localhost")

    r = c.post(f"{BASE}/verify", json={"dump_path": str(made.path), "wait": True})
    assert r.status_code == 200 and r.json()["status"] == "verified", r.text
    assert r.json()["checks"]["chunks"]["bad"] == 0

    with open(made.path, "rb") as f:
        index = read_index(f)
    assert index is not None
    bad = index.chunks[file_offset(made.raw, HIGH + 0x40000) // CHUNK]
    flip(made.path, bad.gz_offset + bad.gz_size // 2)
    r = c.post(f"{BASE}/verify", json={"dump_path": str(made.path), "wait": True})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "mismatch", r.text
    # Issue 15 adds the manifest's signature status and its timestamp's beside the rest.
    keys = {"status", "dump_path", "detail", "checks", "seconds", "signature", "timestamp"}
    keys.add("custody")  # the custody log's check (issue 15, item 3)
    keys.add("object_lock")  # the S3 copy's Object Lock (issue 15, item 5)
    assert set(body) == keys
    assert body["signature"]["status"] == "valid", body
    assert body["timestamp"]["status"] == "missing", body  # no MEMDUMP_TSA_URL here
    first = body["checks"]["chunks"]["first_bad"]
    assert first["number"] == bad.number
    assert first["raw_range"] == [hex(bad.raw_offset), hex(bad.raw_offset + bad.raw_size)]
    lo = HIGH + bad.raw_offset - file_offset(made.raw, HIGH)
    assert first["guest_ranges"] == [[hex(lo), hex(lo + bad.raw_size)]]
    assert f"chunk {bad.number} is corrupt" in body["detail"]
