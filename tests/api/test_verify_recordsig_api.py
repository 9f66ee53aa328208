"""Issue 15, items 2 and 6, the API side of the record's signature: /records shows the
record_signature extra, and POST /verify reports the record's signature check in
signature.record (valid; bad-signature once the record is edited in the store) without
changing the answer's contract fields."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
