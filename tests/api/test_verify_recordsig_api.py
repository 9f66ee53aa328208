"""Issue 15, items 2 and 6, the API side of the record's signature: /records shows the
record_signature extra and the API's check of it (signature_status, JSON and CSV), and
POST /verify reports the record's signature check in signature.record (valid;
bad-signature once the record is edited in the store) without changing the answer's
contract fields. The API reads the store it is not handed through a read-only reader
(least privilege): it creates nothing and lists what a collector wrote."""

from __future__ import annotations

import csv
import io
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from memdump import recordsig
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.signing import collector_signer
from tests.helpers.api import FakeRuns
from tests.helpers.signing import trusting
from tests.helpers.verify_dumps import core, guest_ram, write_dump

BASE = "/api/memory-dumps"


def test_records_and_verify_show_the_record_signature(tmp_path: Path) -> None:
    s = trusting(Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps"), tmp_path)
    made = write_dump(s.dump_dir, core(guest_ram(1)), settings=s)
    store = SQLiteRecordStore(s.records_db)
    signed = recordsig.sign(made.record, collector_signer(s))
    store.add(signed)
    c = TestClient(create_app(s, store=store, runs=FakeRuns()), base_url="http://localhost")
    (row,) = c.get(f"{BASE}/records").json()["records"]
    assert row["record_signature"] == signed.record_signature
    assert row["signature_status"] == "valid"
    r = c.post(f"{BASE}/verify", json={"dump_path": str(made.path), "wait": True})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "verified", r.text
    assert body["signature"]["record"]["status"] == "valid"
    assert body["signature"]["record"]["key_fingerprint"] == collector_signer(s).fingerprint
    db = sqlite3.connect(s.records_db)
    with db:
        db.execute("UPDATE mem_dumps SET vmid = ?", ("someone-else",))
    db.close()
    body = c.post(f"{BASE}/verify", json={"dump_path": str(made.path), "wait": True}).json()
    assert body["status"] == "bad-signature", body
    assert body["signature"]["record"]["status"] == "bad-signature"
    assert body["signature"]["status"] == "valid"  # the manifest's: untouched
    (row,) = c.get(f"{BASE}/records").json()["records"]
    assert row["signature_status"] == "bad-signature"
    (header, cells) = csv.reader(io.StringIO(c.get(f"{BASE}/records?format=csv").text))
    assert dict(zip(header, cells, strict=True))["signature_status"] == "bad-signature"


def test_the_api_reads_the_store_read_only_and_shows_each_records_signature(
    tmp_path: Path,
) -> None:
    s = trusting(Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps"), tmp_path)
    c = TestClient(create_app(s, runs=FakeRuns()), base_url="http://localhost")
    # Before any collector wrote a record: none, and the API made no store of its own.
    assert c.get(f"{BASE}/records").json()["records"] == []
    assert c.get(f"{BASE}/stats").json()["total_dumps"] == 0
    assert not s.records_db.exists()
    made = [write_dump(s.dump_dir, core(guest_ram(1)), settings=s) for _ in range(3)]
    store = SQLiteRecordStore(s.records_db)  # the collector's
    store.add(recordsig.sign(made[0].record, collector_signer(s)))
    stranger = Settings(data_dir=tmp_path / "other")  # a key nobody listed
    store.add(recordsig.sign(made[1].record, collector_signer(stranger)))
    store.add(made[2].record)  # written without the chain: unsigned
    rows = c.get(f"{BASE}/records").json()["records"]
    got = {r["dump_path"]: r["signature_status"] for r in rows}
    assert got == {
        str(made[0].path): "valid",
        str(made[1].path): "untrusted-key",
        str(made[2].path): "unsigned",
    }
    assert c.get(f"{BASE}/stats").json()["total_dumps"] == 3
    # The reader it holds cannot write, whatever it is asked.
    reader = c.app.state.store  # type: ignore[attr-defined]
    with pytest.raises(sqlite3.OperationalError, match="readonly|read-only"):
        with reader._conn() as db:
            db.execute("DELETE FROM mem_dumps")
