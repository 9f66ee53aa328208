"""Issue 14, item 5, wired into the capture chain (memdump.chain.run_chain): each
capture's manifest (``changes``) and record (``chunks_changed``, ``chunks_compared_with``,
``chunks_changed_reason``) say how many chunks differ from the previous capture of the
same VM, or why that is not known; the two always agree, and the dump still verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memdump.chain import run_chain
from memdump.errors import RecordStoreError
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.capture_modes import REF, LiveDriver
from tests.helpers.signing import trusting


def _settings(tmp_path: Path) -> Settings:
    s = Settings(
        data_dir=tmp_path / "data",
        dump_dir=tmp_path / "dumps",
        analysis={"enabled": False},
        chunk_size=64 << 10,
    )
    return trusting(s, tmp_path)  # signed by a trusted key: `verified` (issue 15)


def _changes(record_path: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(manifest_path(Path(record_path)).read_text())
    changes: dict[str, Any] = doc["changes"]
    return changes


def test_each_capture_says_what_changed_since_the_previous_one(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    driver = LiveDriver()
    first = run_chain(driver, REF, s, mode="paused").record  # type: ignore[arg-type]
    assert first.chunks_changed is None and first.chunks_compared_with == ""
    assert first.chunks_changed_reason == "no previous capture of this VM in the record store"
    assert _changes(first.dump_path) == {
        "chunks_changed": None,
        "chunk_count": 1,
        "previous": None,
        "reason": first.chunks_changed_reason,
    }

    same = run_chain(driver, REF, s, mode="paused").record  # type: ignore[arg-type]
    assert (same.chunks_changed, same.chunks_compared_with) == (0, first.dump_path)
    assert same.chunks_changed_reason == ""
    assert _changes(same.dump_path)["previous"] == {
        "dump_path": first.dump_path,
        "timestamp": first.api_dict()["timestamp"],
    }

    # A live capture of the fake has other ELF notes: its one chunk differs.
    live = run_chain(driver, REF, s, mode="live").record  # type: ignore[arg-type]
    assert (live.chunks_changed, live.chunks_compared_with) == (1, same.dump_path)
    assert _changes(live.dump_path)["chunks_changed"] == 1

    rows = {r["dump_path"]: r for r in SQLiteRecordStore(s.records_db).list(10, 0)}
    assert rows[live.dump_path]["chunks_changed"] == 1
    assert rows[first.dump_path]["chunks_changed"] is None
    # The manifest with its changes section is the one the record's manifest_sha256 names.
    assert verify(rows[live.dump_path], s).status == "verified"


def test_a_store_that_cannot_be_read_is_a_reason_not_a_failed_capture(
    tmp_path: Path, monkeypatch: Any
) -> None:
    s = _settings(tmp_path)

    def down(*args: Any) -> Any:
        raise RecordStoreError("store unreachable", retryable=True)

    monkeypatch.setattr("memdump.changes.previous_record", down)
    done = run_chain(LiveDriver(), REF, s, mode="paused")  # type: ignore[arg-type]
    assert done.record.chunks_changed is None
    assert "record store could not be read: store unreachable" in done.record.chunks_changed_reason
    assert _changes(done.record.dump_path)["reason"] == done.record.chunks_changed_reason
