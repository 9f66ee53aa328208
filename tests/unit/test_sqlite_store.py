from datetime import UTC, datetime, timedelta
from pathlib import Path

from memdump.records.model import API_FIELDS, DumpRecord
from memdump.records.sqlite import SQLiteRecordStore

T0 = datetime(2025, 11, 11, 10, 30, 0, 123456, tzinfo=UTC)


def rec(i: int, vmid: str = "101", size: int = 1000) -> DumpRecord:
    ts = T0 + timedelta(minutes=i)
    return DumpRecord(
        ts,
        f"vm-{vmid}",
        vmid,
        f"{i:064x}",
        1.0 + i,
        size,
        1,
        2,
        3,
        f"/d/{vmid}_{i}.mem.gz",
        "ab" * 32,
        4096,
        "lab",
    )


def test_add_is_idempotent_and_listing_is_newest_first(tmp_path: Path) -> None:
    s = SQLiteRecordStore(tmp_path / "r.db")
    assert s.add(rec(0)) and s.add(rec(1)) and s.add(rec(2, "102"))
    assert not s.add(rec(1))  # replay of the same record
    rows = s.list(10, 0)
    assert [r["sha256"][-1] for r in rows] == ["2", "1", "0"]
    assert list(rows[0]) == list(API_FIELDS)
    assert rows[2]["timestamp"] == "2025-11-11T10:30:00.123456"
    assert [r["sha256"][-1] for r in s.list(1, 1)] == ["1"]
    assert s.list(10, 5) == []


def test_stats(tmp_path: Path) -> None:
    s = SQLiteRecordStore(tmp_path / "r.db")
    empty = s.stats()
    assert (empty.total_dumps, empty.total_vms, empty.last_dump) == (0, 0, None)
    for i, vm in enumerate(["101", "101", "102"]):
        s.add(rec(i, vm, size=100 * (i + 1)))
    st = s.stats()
    assert (st.total_dumps, st.total_vms, st.total_size_bytes) == (3, 2, 600)
    assert st.avg_duration_sec == 2.0
    assert st.last_dump == "2025-11-11T10:32:00.123456"
