"""Capture modes through the flow (issue 12, items 1 and 4): the flow and its tasks take
the mode from the settings (the inventory entry's capture_mode), the real engine
(memdump.capture) captures live or falls back, and the stored record carries the mode,
the fallback reason and the pause. Only the driver is a fake (tests/helpers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memdump.hypervisors import VMRef
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from tests.helpers.capture_modes import LiveDriver


@pytest.fixture
def live_inventory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    monkeypatch.delenv("MEMDUMP_CAPTURE_MODE", raising=False)
    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MEMDUMP_DUMP_DIR", str(tmp_path / "dumps"))
    monkeypatch.setenv("MEMDUMP_ANALYSIS__ENABLED", "false")
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__CAPTURE_RETRY_DELAY_SEC", "0")
    # The global mode stays paused: the hypervisor's entry asks for live.
    monkeypatch.setenv(
        "MEMDUMP_HYPERVISORS", '[{"name": "hv", "transport": "local", "capture_mode": "live"}]'
    )
    drivers = {"vm-live": LiveDriver(), "vm-refused": LiveDriver(refuse="open")}

    def find(_drivers: list[Any], vm_id: str) -> tuple[Any, VMRef]:
        return drivers[vm_id], VMRef("hv", vm_id, vm_id)

    monkeypatch.setattr("memdump.chain.open_driver", lambda hv, ssh: LiveDriver())
    monkeypatch.setattr("memdump.chain.find", find)
    return tmp_path


def test_flow_captures_live_or_falls_back_with_the_reason(live_inventory: Path) -> None:
    from flows.capture import capture_vms

    state = capture_vms(vm_ids=["vm-live", "vm-refused"], source="test", return_state=True)
    assert state.is_completed(), state
    rows = {r["vmid"]: r for r in SQLiteRecordStore(live_inventory / "records.db").list(10, 0)}
    assert (rows["vm-live"]["capture_mode"], rows["vm-live"]["live_fallback_reason"]) == (
        "live",
        "",
    )
    assert rows["vm-live"]["pause_ms"] == 7.0
    refused = rows["vm-refused"]
    assert refused["capture_mode"] == "paused"
    assert "vm.unprivileged_userfaultfd is 0" in refused["live_fallback_reason"]
    doc = json.loads(manifest_path(Path(refused["dump_path"])).read_bytes())
    assert doc["capture"]["mode_requested"] == "live"
    assert doc["capture"]["fallback_reason"] == refused["live_fallback_reason"]
