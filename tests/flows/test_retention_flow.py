"""The retention flow under Prefect's test harness: deletes, reports, warns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memdump.records.sqlite import SQLiteRecordStore
from tests.unit.test_retention import _stored


def test_retention_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.retention import apply_retention

    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    store = SQLiteRecordStore(tmp_path / "records.db")
    now = datetime.now(UTC)
    new = _stored(tmp_path, "a", now - timedelta(days=1), 300)
    old = _stored(tmp_path, "a", now - timedelta(days=10), 700)
    store.add(new)
    store.add(old)

    state = apply_retention(return_state=True)  # no retention configured: nothing goes
    assert state.is_completed() and state.name == "Completed"
    assert Path(old.dump_path).exists()

    monkeypatch.setenv("MEMDUMP_RETENTION_DAYS", "7")
    monkeypatch.setenv("MEMDUMP_STORAGE_WARN_BYTES", "100")
    state = apply_retention(return_state=True)
    assert state.is_completed() and state.name == "StorageWarning", state
    assert "Deleted 1 dump(s)" in str(state.message)
    assert not Path(old.dump_path).exists() and Path(new.dump_path).exists()
    assert store.stats().total_size_bytes == 300

    state = apply_retention(days=0.5, return_state=True)  # a parameter overrides the setting
    assert state.is_completed() and not Path(new.dump_path).exists()
