"""The engine's one chain of a VM (memdump.chain, issue 13 item 2): capture -> offload
-> record, as the Prefect task and ``memdump capture`` run it; and the one Location type
with its one confinement for verify and retention (memdump.stored)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memdump import chain, retention
from memdump.chain import offload, run_chain
from memdump.errors import (
    ObjectStoreAccessError,
    ObjectStoreUnavailableError,
    OffloadFailedError,
)
from memdump.locations import Location
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import S3Settings, Settings
from memdump.verify import verify
from tests.helpers.capture_modes import REF, LiveDriver
from tests.helpers.stores import FlakyStore


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        dump_dir=tmp_path / "dumps",
        analysis={"enabled": False},
        orchestration={"capture_retry_delay_sec": 0, "offload_retries": 2},
        **kw,
    )


def test_the_chain_captures_and_records(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    done = run_chain(LiveDriver(), REF, s, trigger={"source": "test"})  # type: ignore[arg-type]
    dump = Path(done.record.dump_path)
    assert dump.is_file() and manifest_path(dump).is_file()
    assert done.recorded and done.outbox is None and done.offloaded is None  # no S3
    (row,) = SQLiteRecordStore(s.records_db).list(10, 0)
    assert row == done.record.api_dict()


def test_a_record_the_store_cannot_take_waits_in_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(tmp_path)
    store = FlakyStore(s.records_db)
    store.down = True
    monkeypatch.setattr("memdump.records.open_store", lambda settings: store)
    done = run_chain(LiveDriver(), REF, s)  # type: ignore[arg-type]
    assert not done.recorded and done.outbox is not None and done.outbox.depth == 1
    assert store.list(10, 0) == []


def test_offload_retries_a_retryable_error_then_keeps_the_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(tmp_path, s3=S3Settings(bucket="forensics"))
    rec = run_chain(LiveDriver(), REF, _settings(tmp_path)).record  # type: ignore[arg-type]
    calls: list[int] = []

    def down(record: Any, settings: Any) -> Any:
        calls.append(1)
        raise ObjectStoreUnavailableError("connection refused")

    monkeypatch.setattr(chain, "_offload_once", down)
    with pytest.raises(OffloadFailedError) as ei:
        offload(rec, s)
    assert len(calls) == 3  # offload_retries=2: three attempts
    # Never retryable as a whole: a retry would capture the VM again.
    assert not ei.value.retryable
    assert str(ei.value) == "offload failed (local file kept): connection refused"
    assert Path(rec.dump_path).is_file() and manifest_path(Path(rec.dump_path)).is_file()

    calls.clear()

    def denied(record: Any, settings: Any) -> Any:
        calls.append(1)
        raise ObjectStoreAccessError("access denied")

    monkeypatch.setattr(chain, "_offload_once", denied)
    with pytest.raises(OffloadFailedError):
        offload(rec, s)
    assert len(calls) == 1  # not retryable: one attempt


def test_an_offload_failure_fails_the_chain_without_a_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(tmp_path, s3=S3Settings(bucket="forensics"))

    def denied(record: Any, settings: Any) -> Any:
        raise ObjectStoreAccessError("access denied")

    monkeypatch.setattr(chain, "_offload_once", denied)
    with pytest.raises(OffloadFailedError):
        run_chain(LiveDriver(), REF, s)  # type: ignore[arg-type]
    assert SQLiteRecordStore(s.records_db).list(10, 0) == []  # no record claims an object
    (kept,) = (tmp_path / "dumps").glob("*.mem.gz")
    assert manifest_path(kept).is_file()


@pytest.mark.parametrize(
    ("where", "kind"),
    [("s3://b/memdump/x.mem.gz", "s3"), ("/srv/dumps/x.mem.gz", "local"), ("", "local")],
)
def test_a_location_is_a_local_path_or_an_s3_object(where: str, kind: str) -> None:
    assert Location.of(where).kind == kind


def test_verify_and_retention_refuse_an_s3_record_alike_without_s3(tmp_path: Path) -> None:
    # Once ConfigError from verify and LocationError from retention for the same record.
    s = _settings(tmp_path)
    name = "hv_vm1_20261129T015216.123456Z_00ff00.mem.gz"
    row = {
        "dump_path": f"s3://forensics/memdump/{name}",
        "timestamp": "2026-01-01T00:00:00",
        "vmid": "vm1",
        "gzip_size_bytes": 1,
    }
    with pytest.raises(Exception) as from_verify:
        verify(row, s)
    report = retention.Report()
    retention._apply_one(row, s, SQLiteRecordStore(s.records_db), retention._when(row), report)
    assert type(from_verify.value).__name__ == "LocationError"
    assert report.errors == {row["dump_path"]: f"refused: {from_verify.value}"}
    assert "S3 is not configured" in str(from_verify.value)


def test_what_only_follows_the_dump_is_imported_beside_it() -> None:
    # `memdump capture` starts without the custody log's and the timestamps' modules
    # (their imports would come before the dump); the chain's preload brings them in.
    code = (
        "import sys, memdump.cli.app as app, memdump.chain as chain\n"
        "app.engine('capture')\n"
        "before = sorted(m for m in chain.AFTER_CAPTURE if m in sys.modules)\n"
        "chain._preload()\n"
        "after = sorted(m for m in chain.AFTER_CAPTURE if m in sys.modules)\n"
        "print(before, after)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert r.stdout.strip() == "[] ['memdump.custody', 'memdump.timestamping']", r.stderr
