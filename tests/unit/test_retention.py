"""Retention's selection on a fake clock, and a run over real files and a real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from memdump import retention
from memdump.manifest import manifest_path
from memdump.records.model import DumpRecord, iso_utc
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def row(vmid: str, age_days: float, deleted: str = "") -> dict[str, Any]:
    ts = NOW - timedelta(days=age_days)
    return {
        "vmid": vmid,
        "timestamp": iso_utc(ts),
        "deleted_at": deleted,
        "dump_path": f"/d/{vmid}_{age_days}",
    }


def paths(rows: list[Any]) -> list[str]:
    return [r["dump_path"] for r in rows]


ROWS = [row("a", 1), row("a", 10), row("a", 40), row("b", 2), row("b", 31), row("c", 100, "x")]


def test_select_by_age_by_count_and_both() -> None:
    assert paths(retention.select(ROWS, NOW, days=30, keep_last=None)) == [
        "/d/b_31", "/d/a_40"
    ]  # fmt: skip
    assert paths(retention.select(ROWS, NOW, days=None, keep_last=1)) == [
        "/d/a_10", "/d/b_31", "/d/a_40"
    ]  # fmt: skip
    assert paths(retention.select(ROWS, NOW, days=5, keep_last=2)) == [
        "/d/a_10", "/d/b_31", "/d/a_40"
    ]  # fmt: skip
    assert retention.select(ROWS, NOW, days=None, keep_last=None) == []
    # Exactly at the cutoff is kept; already-deleted dumps are never selected again.
    assert retention.select([row("a", 30)], NOW, days=30, keep_last=None) == []
    assert retention.select([row("c", 100, "x")], NOW, days=1, keep_last=None) == []
    # Deleted dumps do not count towards keep_last.
    kept = [row("a", 1), row("a", 2, "x"), row("a", 3)]
    assert paths(retention.select(kept, NOW, days=None, keep_last=2)) == []


def _stored(d: Path, vmid: str, when: datetime, size: int) -> DumpRecord:
    path = d / f"{vmid}_{int(when.timestamp())}.mem.gz"
    path.write_bytes(b"x" * size)
    manifest_path(path).write_text("{}")
    return DumpRecord(
        when, vmid, vmid, f"{int(when.timestamp()):064x}", 1.0, size, 1, 2, 3, str(path),
        "0" * 64, size, "lab",
    )  # fmt: skip


def test_apply_deletes_files_keeps_records_and_reports(tmp_path: Path) -> None:
    store = SQLiteRecordStore(tmp_path / "r.db")
    recs = [
        _stored(tmp_path, "a", NOW - timedelta(days=1), 100),
        _stored(tmp_path, "a", NOW - timedelta(days=9), 200),
        _stored(tmp_path, "b", NOW - timedelta(days=20), 400),
    ]
    for r in recs:
        store.add(r)
    Path(recs[2].dump_path).unlink()  # already gone: marked, nothing freed
    s = Settings(data_dir=tmp_path, storage_warn_bytes=50)
    report = retention.apply(s, store, NOW, days=7)
    assert report.deleted == [recs[1].dump_path, recs[2].dump_path]
    assert report.freed_bytes == 200 and report.errors == {}
    assert report.stored_bytes == 100 and report.over_threshold
    assert not Path(recs[1].dump_path).exists()
    assert not manifest_path(Path(recs[1].dump_path)).exists()
    assert Path(recs[0].dump_path).exists() and manifest_path(Path(recs[0].dump_path)).exists()
    rows = store.list(10, 0)
    assert [r["deleted_at"] for r in rows] == ["", iso_utc(NOW), iso_utc(NOW)]
    assert store.stats().total_dumps == 3  # records stay
    assert "WARNING" in retention.describe(report)
    again = retention.apply(s, store, NOW, days=7)
    assert again.deleted == [] and again.freed_bytes == 0
    off = retention.apply(Settings(data_dir=tmp_path), store, NOW)
    assert off.deleted == [] and not off.over_threshold
