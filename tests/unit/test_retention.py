"""Retention's selection on a fake clock, and runs over real files and a real store:
grouping by hypervisor + vmid, the bounds, the dry run, each copy deleted where it
lives, and records pointing outside the dump directory refused (issue 11: 2, 3, 10)."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from memdump import retention
from memdump.errors import ConfigError
from memdump.manifest import manifest_path
from memdump.records.model import iso_utc
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.dumps import stored

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


def test_select_groups_by_hypervisor_and_vmid() -> None:
    # Proxmox vmid 100 on two nodes: hvB's newer dumps must not push out hvA's.
    rows = [
        {**row("100", age), "hypervisor": hv, "dump_path": f"{hv}:{age}"}
        for hv, ages in (("hvA", (5, 6, 7)), ("hvB", (1, 2, 3)))
        for age in ages
    ]
    assert paths(retention.select(rows, NOW, days=None, keep_last=2)) == ["hvB:3", "hvA:7"]


@pytest.mark.parametrize(
    ("days", "keep_last"),
    [(0, None), (-1, None), (0.0, 5), (math.nan, None), (math.inf, None), (None, 0),
     (None, -3), (7, 0), (True, None), (None, True)],
)  # fmt: skip
def test_bounds_refused_in_settings_and_at_apply(tmp_path: Path, days: Any, keep_last: Any) -> None:
    rec = stored(tmp_path / "dumps", "a", NOW - timedelta(days=40), 10, collector="me")
    store = SQLiteRecordStore(tmp_path / "r.db")
    store.add(rec)
    s = Settings(data_dir=tmp_path, dump_dir=tmp_path / "dumps", collector_id="me")
    with pytest.raises(ConfigError):
        retention.apply(s, store, NOW, days=days, keep_last=keep_last)
    assert Path(rec.dump_path).exists() and store.list(1, 0)[0]["deleted_at"] == ""
    if isinstance(days, bool) or isinstance(keep_last, bool):
        return  # pydantic reads a bool as 1 in settings: the settings' own bounds hold
    given = {"days": days, "keep_last": keep_last}
    with pytest.raises(ValidationError):
        Settings(retention={k: v for k, v in given.items() if v is not None})


def _setup(tmp_path: Path, **over: Any) -> tuple[Settings, SQLiteRecordStore]:
    s = Settings(
        data_dir=tmp_path, dump_dir=tmp_path / "dumps", collector_id="me",
        storage_warn_bytes=50, **over,
    )  # fmt: skip
    return s, SQLiteRecordStore(tmp_path / "r.db")


def test_apply_deletes_files_keeps_records_and_reports(tmp_path: Path) -> None:
    s, store = _setup(tmp_path)
    d = s.dump_dir
    recs = [
        stored(d, "a", NOW - timedelta(days=1), 100, collector="me"),
        stored(d, "a", NOW - timedelta(days=9), 200, collector="me"),
        stored(d, "b", NOW - timedelta(days=20), 400, collector="me"),
    ]
    for r in recs:
        store.add(r)
    Path(recs[2].dump_path).unlink()  # ours and already gone: marked, nothing freed
    report = retention.apply(s, store, NOW, days=7)
    assert report.deleted == [recs[1].dump_path, recs[2].dump_path]
    assert report.freed_bytes == 200 and report.errors == {} and report.left == {}
    assert report.stored_bytes == 100 and report.over_threshold
    assert not Path(recs[1].dump_path).exists()
    assert not manifest_path(Path(recs[1].dump_path)).exists()
    assert Path(recs[0].dump_path).exists() and manifest_path(Path(recs[0].dump_path)).exists()
    rows = store.list(10, 0)
    assert [r["deleted_at"] for r in rows] == ["", iso_utc(NOW), iso_utc(NOW)]
    assert [r["local_deleted_at"] for r in rows] == ["", iso_utc(NOW), iso_utc(NOW)]
    assert store.stats().total_dumps == 3  # records stay
    assert "WARNING" in retention.describe(report)
    again = retention.apply(s, store, NOW, days=7)
    assert again.deleted == [] and again.freed_bytes == 0
    off = retention.apply(Settings(data_dir=tmp_path, dump_dir=s.dump_dir), store, NOW)
    assert off.deleted == [] and not off.over_threshold


def test_keeps_k_per_hypervisor_and_vmid(tmp_path: Path) -> None:
    s, store = _setup(tmp_path)
    recs = {
        hv: [stored(s.dump_dir, "100", NOW - timedelta(hours=h), 10, hypervisor=hv,
                    collector="me") for h in hours]
        for hv, hours in (("hvA", (30, 31, 32)), ("hvB", (1, 2, 3)))
    }  # fmt: skip
    for rs in recs.values():
        for r in rs:
            store.add(r)
    report = retention.apply(s, store, NOW, keep_last=2)
    assert report.deleted == [recs["hvB"][2].dump_path, recs["hvA"][2].dump_path]
    for hv in ("hvA", "hvB"):
        assert [Path(r.dump_path).exists() for r in recs[hv]] == [True, True, False]


def test_dry_run_lists_and_deletes_nothing(tmp_path: Path) -> None:
    s, store = _setup(tmp_path)
    new = stored(s.dump_dir, "a", NOW - timedelta(days=1), 10, collector="me")
    old = stored(s.dump_dir, "a", NOW - timedelta(days=9), 10, collector="me")
    for r in (new, old):
        store.add(r)
    report = retention.apply(s, store, NOW, days=7, dry_run=True)
    assert report.would_delete == [old.dump_path] and report.deleted == []
    assert Path(old.dump_path).exists() and manifest_path(Path(old.dump_path)).exists()
    assert all(r["deleted_at"] == r["local_deleted_at"] == "" for r in store.list(10, 0))
    text = retention.describe(report)
    assert text.startswith("Dry run: would delete 1") and retention.md(old.dump_path) in text


def test_another_collectors_copy_is_left_and_the_record_not_marked(tmp_path: Path) -> None:
    s, store = _setup(tmp_path)
    theirs = stored(s.dump_dir, "a", NOW - timedelta(days=9), 10, collector="other")
    store.add(theirs)
    report = retention.apply(s, store, NOW, days=7)
    assert report.deleted == [] and report.errors == {}
    assert "collector other" in report.left[theirs.dump_path]
    assert Path(theirs.dump_path).exists()
    assert store.list(1, 0)[0]["deleted_at"] == ""
    # The collector that holds it finishes the job.
    report = retention.apply(s.model_copy(update={"collector_id": "other"}), store, NOW, days=7)
    assert report.deleted == [theirs.dump_path] and not Path(theirs.dump_path).exists()
    assert store.list(1, 0)[0]["deleted_at"] == iso_utc(NOW)


def test_old_record_missing_here_is_not_taken_as_gone(tmp_path: Path) -> None:
    s, store = _setup(tmp_path)
    here = stored(s.dump_dir, "a", NOW - timedelta(days=9), 10, old_name=True)
    elsewhere = stored(s.dump_dir, "b", NOW - timedelta(days=9), 10, old_name=True)
    Path(elsewhere.dump_path).unlink()  # on another collector, or gone: we cannot tell
    for r in (here, elsewhere):
        store.add(r)
    report = retention.apply(s, store, NOW, days=7)
    assert report.deleted == [here.dump_path] and not Path(here.dump_path).exists()
    assert elsewhere.dump_path in report.left
    marks = {r["dump_path"]: r["deleted_at"] for r in store.list(10, 0)}
    assert marks == {here.dump_path: iso_utc(NOW), elsewhere.dump_path: ""}


def test_a_record_pointing_outside_the_dump_dir_is_refused(tmp_path: Path) -> None:
    s, store = _setup(tmp_path)
    victim = tmp_path / "101_1699520400.mem.gz"  # a dump-like name, outside the dump dir
    victim.write_bytes(b"precious")
    rec = stored(s.dump_dir, "a", NOW - timedelta(days=9), 10, collector="me")
    forged = dataclasses.replace(rec, dump_path=str(victim), local_path=str(victim))
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    forged2 = dataclasses.replace(
        stored(s.dump_dir, "b", NOW - timedelta(days=9), 10), dump_path=str(other)
    )
    for r in (forged, forged2):
        store.add(r)
    report = retention.apply(s, store, NOW, days=7)
    assert report.deleted == []
    assert set(report.errors) == {str(victim), str(other)}
    assert all("refused" in e for e in report.errors.values())
    assert victim.read_bytes() == b"precious" and other.read_text() == "keep"
    assert all(r["deleted_at"] == "" for r in store.list(10, 0))


def test_markdown_from_records_is_escaped() -> None:
    report = retention.Report(
        deleted=["/d/x`](http://evil)<img src=x>"],
        errors={"/d/*y*\n# head": "boom | `x`"},
        left={"[z](u)": "why"},
    )
    text = retention.describe(report)
    for raw in ("`](", " <img", ")<img", "*y*", "\n# head", "| `x`", "[z](u)"):
        assert raw not in text, raw
    assert "\\<img" in text and "\\\\x0a" in text
