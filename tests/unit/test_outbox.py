from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memdump.records.model import DumpRecord
from memdump.records.outbox import DurableRecorder, Outbox
from memdump.records.sqlite import SQLiteRecordStore
from tests.helpers.stores import FlakyStore


def rec(i: int) -> DumpRecord:
    return DumpRecord(
        datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=i),
        f"vm{i}",
        f"vm{i}",
        f"{i:064x}",
        1.0,
        10,
        1,
        2,
        3,
        f"/d/{i}",
        "0" * 64,
        100,
        "hv",
    )


@pytest.fixture
def store(tmp_path: Path) -> FlakyStore:
    return FlakyStore(tmp_path / "records.db")


def test_write_through_when_up(store: FlakyStore, tmp_path: Path) -> None:
    r = DurableRecorder(store, Outbox(tmp_path / "outbox.db"))
    assert r.record(rec(1)) is True
    assert r.outbox.state().depth == 0 and store.stats().total_dumps == 1


def test_kept_while_down_then_replayed_in_order(store: FlakyStore, tmp_path: Path) -> None:
    r = DurableRecorder(store, Outbox(tmp_path / "outbox.db"))
    store.down = True
    assert r.record(rec(1)) is False and r.record(rec(2)) is False
    st = r.outbox.state()
    assert st.depth == 2 and "Connection refused" in (st.last_error or "")
    assert r.replay() == 2  # still down: nothing lost, nothing written
    # A collector restart: a new outbox object on the same file still has them.
    r2 = DurableRecorder(store, Outbox(tmp_path / "outbox.db"))
    store.down = False
    assert r2.record(rec(3)) is True
    assert store.writes == ["vm1", "vm2", "vm3"]  # capture order
    assert r2.outbox.state().depth == 0 and store.stats().total_dumps == 3


def test_lost_answer_is_written_exactly_once(store: FlakyStore, tmp_path: Path) -> None:
    r = DurableRecorder(store, Outbox(tmp_path / "outbox.db"))
    store.lose_ack = True
    assert r.record(rec(1)) is False  # the store has it, we could not know
    assert r.replay() == 0
    assert store.stats().total_dumps == 1 and len(store.writes) == 2


def test_same_record_queued_twice_is_one(store: FlakyStore, tmp_path: Path) -> None:
    r = DurableRecorder(store, Outbox(tmp_path / "outbox.db"))
    store.down = True
    r.record(rec(1))
    r.record(rec(1))
    assert r.outbox.state().depth == 1


def test_record_roundtrip() -> None:
    a = rec(5)
    assert DumpRecord.from_dict(a.full_dict()) == a


def test_a_record_queued_before_locations_existed_is_replayed(tmp_path: Path) -> None:
    import json
    import sqlite3

    # An outbox row written by a memdump from before the location extras (issue 11).
    old = {k: v for k, v in rec(7).full_dict().items() if k not in {
        "collector", "local_path", "local_deleted_at", "s3_uri", "s3_version_id",
        "s3_deleted_at"}}  # fmt: skip
    box = Outbox(tmp_path / "outbox.db")
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        db.execute(
            "INSERT INTO outbox (key, record, queued_at) VALUES (?, ?, 0)",
            (rec(7).key, json.dumps(old)),
        )
    db.close()
    store = SQLiteRecordStore(tmp_path / "records.db")
    assert DurableRecorder(store, box).replay() == 0
    (row,) = store.list(10, 0)
    assert row["dump_path"] == "/d/7" and row["local_path"] == row["s3_uri"] == ""
