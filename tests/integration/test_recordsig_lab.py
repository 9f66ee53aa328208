"""Issue 15, item 2 (the record) on the real parts: a lab capture through the real chain
writes a record signed by the collector's key (memdump.recordsig) that verifies; the
record edited in the SQLite store afterwards (its dom, then its timestamp) fails verify
as bad-signature, while the dump, manifest and manifest's signature are untouched; and
the record edited with its signature removed (which would pass for an older, unsigned
record) fails too: its signed manifest says the record is signed, and by which key."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from memdump.chain import run_chain
from memdump.hypervisors import Driver
from memdump.manifest import manifest_path
from memdump.settings import Settings
from memdump.signing import collector_signer
from memdump.verify import verify
from tests.helpers.stores import record_row

pytestmark = pytest.mark.lab

VM = "vm-web-01"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "data_dir": tmp_path / "data",
            "analysis": settings.analysis.model_copy(update={"enabled": False}),
        }
    )


def test_a_lab_capture_signs_its_record_and_an_edit_in_the_store_is_caught(
    driver: Driver, settings: Settings
) -> None:
    done = run_chain(driver, driver.resolve(VM), settings, mode="paused")
    assert done.recorded and done.record.record_signature
    row = record_row(settings, done.record.dump_path)
    assert row["record_signature"] == done.record.record_signature
    v = verify(row, settings)
    assert v.status == "verified", v
    assert v.signature is not None and v.signature["record"]["status"] == "valid"
    db = sqlite3.connect(settings.records_db)
    with db:
        db.execute(
            "UPDATE mem_dumps SET dom = ? WHERE dump_path = ?", ("vm-db-01", row["dump_path"])
        )
    db.close()
    v = verify(record_row(settings, done.record.dump_path), settings)
    assert v.status == "bad-signature", v
    assert v.signature is not None and v.signature["record"]["status"] == "bad-signature"
    assert v.signature["status"] == "valid"  # the manifest's: untouched
    db = sqlite3.connect(settings.records_db)
    with db:
        db.execute(
            "UPDATE mem_dumps SET dom = ?, time_us = time_us + 3600000000 WHERE dump_path = ?",
            (row["dom"], row["dump_path"]),
        )
    db.close()
    assert verify(record_row(settings, done.record.dump_path), settings).status == "bad-signature"

    # The signature removed as well (it would pass for an older, unsigned record): the
    # signed manifest says the record is signed, and by which key.
    doc = json.loads(manifest_path(Path(done.record.dump_path)).read_bytes())
    fp = collector_signer(settings).fingerprint
    assert doc["record_signature"] == {"fields": "memdump-record-v1", "key_fingerprint": fp}
    db = sqlite3.connect(settings.records_db)
    with db:
        db.execute(
            "UPDATE mem_dumps SET record_signature = '' WHERE dump_path = ?", (row["dump_path"],)
        )
    db.close()
    v = verify(record_row(settings, done.record.dump_path), settings)
    assert v.status == "bad-signature", v
    assert v.signature is not None and v.signature["status"] == "valid"  # the manifest's
    assert v.signature["record"]["status"] == "bad-signature"
    assert "no signature" in v.signature["record"]["detail"]
