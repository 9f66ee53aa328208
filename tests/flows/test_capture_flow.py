"""Flow and task logic under Prefect's test harness (a real, temporary Prefect server);
the engine is replaced by fakes here; the lab-backed runs are in tests/e2e."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.states import Completed, Failed

from memdump.errors import (
    CaptureTimeoutError,
    HostKeyError,
    StreamInterruptedError,
    VMNotFoundError,
)
from memdump.records.sqlite import SQLiteRecordStore
from tasks.capture import retry_if_retryable


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (StreamInterruptedError("cut"), True),
        (HostKeyError("mitm"), False),
        (VMNotFoundError("nope"), False),
        (ValueError("bug"), False),
    ],
)
def test_retry_only_retryable(exc: Exception, retry: bool) -> None:
    assert retry_if_retryable(None, None, Failed(data=exc)) is retry
    assert retry_if_retryable(None, None, Completed()) is False


def test_flow_retries_retryable_errors_and_records(fake_engine: dict[str, Any]) -> None:
    from flows.capture import capture_vms

    fake_engine["plan"]["vm-a"] = [StreamInterruptedError("cut", op="stream")]
    fake_engine["plan"]["vm-b"] = [HostKeyError("host key mismatch")]
    state = capture_vms(
        vm_ids=["vm-a", "vm-b", "unknown-1", "vm-a"], source="test", return_state=True
    )
    assert state.is_failed() and state.name != "TimedOut"
    assert "2 of 3 VM(s) failed" in state.message
    assert "host key mismatch" in state.message and "unknown-1" in state.message
    assert fake_engine["calls"] == {"vm-a": 2, "vm-b": 1}  # retried once, never retried
    rows = SQLiteRecordStore(fake_engine["db"]).list(10, 0)
    assert [r["vmid"] for r in rows] == ["vm-a"]
    # What started each capture goes into its manifest: the source and this flow run.
    assert {t["source"] for t in fake_engine["triggers"]} == {"test"}
    assert {t["flow_run_id"] for t in fake_engine["triggers"]} == {
        str(state.state_details.flow_run_id)
    }


def test_flow_timeout_is_timed_out(fake_engine: dict[str, Any]) -> None:
    from flows.capture import capture_vms

    fake_engine["plan"]["vm-t"] = [CaptureTimeoutError("capture exceeded its deadline")]
    state = capture_vms(vm_ids=["vm-t", "vm-ok"], source="test", return_state=True)
    assert state.is_failed() and state.name == "TimedOut"
    assert fake_engine["calls"] == {"vm-t": 1, "vm-ok": 1}


def test_flow_completes_with_artifacts(fake_engine: dict[str, Any]) -> None:
    from prefect import get_client

    from flows.capture import capture_vms

    state = capture_vms(vm_ids=["vm-x", "vm-y"], source="test", return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        summary = client.read_latest_artifacts(limit=50)
    by_key = {a.key: a for a in summary}
    assert (
        # VM ids are escaped in the markdown (issue 11 item 14): "-" is "\-" there.
        "vm\\-x" in by_key["capture-summary"].data and "completed" in by_key["capture-summary"].data
    )
    assert by_key["capture-progress-vm-x"].data == 100


def test_store_down_keeps_record_in_outbox_and_run_completes(
    fake_engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flows.capture import capture_vms
    from memdump.records import open_recorder
    from memdump.settings import Settings
    from tests.helpers.stores import FlakyStore

    store = FlakyStore(tmp_path / "records.db")
    store.down = True
    monkeypatch.setattr("memdump.records.open_store", lambda settings: store)
    state = capture_vms(vm_ids=["vm-o"], source="test", return_state=True)
    assert state.is_completed(), state  # the capture is complete; its record waits
    recorder = open_recorder(Settings())
    assert recorder.outbox.state().depth == 1
    store.down = False
    assert recorder.replay() == 0
    assert [r["vmid"] for r in store.list(10, 0)] == ["vm-o"]
