"""The retention flow under Prefect's test harness: deletes, reports, warns; refuses
parameters that would delete every dump; a dry run lists and deletes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memdump.records.sqlite import SQLiteRecordStore
from tests.helpers.dumps import stored


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MEMDUMP_DUMP_DIR", str(tmp_path / "dumps"))
    monkeypatch.setenv("MEMDUMP_COLLECTOR_ID", "col-1")
    return tmp_path


def _artifact(flow_run_id: Any, key: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[key]),
            )
        )
    return str(art.data)


def test_retention_flow(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.retention import apply_retention

    store = SQLiteRecordStore(env / "records.db")
    now = datetime.now(UTC)
    new = stored(env / "dumps", "a", now - timedelta(days=1), 300, collector="col-1")
    old = stored(env / "dumps", "a", now - timedelta(days=10), 700, collector="col-1")
    store.add(new)
    store.add(old)

    state = apply_retention(return_state=True)  # no retention configured: nothing goes
    assert state.is_completed() and state.name == "Completed"
    assert Path(old.dump_path).exists()

    monkeypatch.setenv("MEMDUMP_RETENTION__DAYS", "7")
    monkeypatch.setenv("MEMDUMP_STORAGE_WARN_BYTES", "100")
    state = apply_retention(return_state=True)
    assert state.is_completed() and state.name == "StorageWarning", state
    assert "Deleted 1 dump(s)" in str(state.message)
    assert not Path(old.dump_path).exists() and Path(new.dump_path).exists()
    assert store.stats().total_size_bytes == 300

    state = apply_retention(days=0.5, return_state=True)  # a parameter overrides the setting
    assert state.is_completed() and not Path(new.dump_path).exists()


@pytest.mark.parametrize(
    "params", [{"keep_last": 0}, {"days": 0}, {"days": -1}, {"days": 7, "keep_last": 0}]
)
def test_parameters_that_delete_everything_are_refused(env: Path, params: dict[str, Any]) -> None:
    from flows.retention import apply_retention

    store = SQLiteRecordStore(env / "records.db")
    rec = stored(env / "dumps", "a", datetime.now(UTC) - timedelta(days=30), 10, collector="col-1")
    store.add(rec)
    state = apply_retention(**params, return_state=True)
    assert state.is_failed() and "refused" in str(state.message), state
    assert Path(rec.dump_path).exists() and store.list(1, 0)[0]["deleted_at"] == ""


def test_dry_run_lists_candidates_as_an_artifact_and_deletes_nothing(env: Path) -> None:
    from flows.retention import apply_retention
    from memdump.retention import md

    store = SQLiteRecordStore(env / "records.db")
    now = datetime.now(UTC)
    recs = [
        stored(env / "dumps", "100", now - timedelta(hours=h), 10, hypervisor=hv, collector="col-1")
        for hv in ("hvA", "hvB")
        for h in (1, 2, 3)
    ]
    for r in recs:
        store.add(r)
    state = apply_retention(keep_last=2, dry_run=True, return_state=True)
    assert state.is_completed(), state
    assert all(Path(r.dump_path).exists() for r in recs)
    assert all(r["deleted_at"] == "" for r in store.list(10, 0))
    text = _artifact(state.state_details.flow_run_id, "retention-dry-run")
    assert text.startswith("Dry run: would delete 2")
    # The oldest of each hypervisor's vmid 100, escaped for markdown.
    listed = [line for line in text.splitlines() if line.startswith("- would delete ")]
    assert len(listed) == 2
    for r in (recs[2], recs[5]):
        assert any(md(r.dump_path) in line for line in listed), r.dump_path
