"""Issue 11 item 7 in a real Prefect flow run (test harness) against the lab: one
hypervisor that cannot be reached (a port where nothing listens) fails only its own part
of "all", with the reason in the run's state, its summary artifact and /status's per-VM
detail; the lab's VMs are captured and recorded all the same."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from memdump.hypervisors import open_driver
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.lab import lab_missing
from tests.helpers.markdown import render_table

pytestmark = pytest.mark.lab


def _closed_port() -> int:
    # Bound then closed: nothing listens there (connect is refused at once).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab_and_dead(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    lab_inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not lab_inv or not Path(lab_inv).is_file():
        lab_missing()
    lab = next(hv for hv in yaml.safe_load(Path(lab_inv).read_text())["hypervisors"])
    assert lab["name"] == "lab" and lab["driver"] == "libvirt"
    dead = {**lab, "name": "lab-down", "port": _closed_port()}
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"hypervisors": [dead, lab]}))  # the dead one first
    for key, value in {
        "MEMDUMP_INVENTORY_FILE": str(inv),
        "MEMDUMP_DATA_DIR": str(tmp_path / "data"),
        "MEMDUMP_DUMP_DIR": str(tmp_path / "dumps"),
        "MEMDUMP_ANALYSIS__ENABLED": "false",
        "MEMDUMP_ORCHESTRATION__CAPTURE_RETRY_DELAY_SEC": "0",
    }.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_unreachable_hypervisor_fails_only_its_vms(lab_and_dead: Path) -> None:
    from prefect import get_client

    from api.runs import PrefectRuns
    from flows.capture import capture_vms

    settings = Settings()
    lab = open_driver(settings.hypervisor("lab"), settings.ssh)
    try:
        lab_vms = {ref.vmid for ref in lab.list_vms()}
    finally:
        lab.close()
    assert lab_vms  # the lab runs VMs

    state = capture_vms(vm_ids=["all"], source="test", return_state=True)

    # The run fails because of the dead hypervisor, and says so...
    assert state.is_failed() and state.name != "TimedOut"
    assert "lab-down:all" in (state.message or "")
    assert "cannot connect" in (state.message or "")
    # ...but every VM of the lab was captured and recorded.
    rows = SQLiteRecordStore(settings.records_db).list(100, 0)
    assert {r["vmid"] for r in rows} >= lab_vms
    assert {r["hypervisor"] for r in rows} == {"lab"}

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_latest_artifacts(limit=50)
    summary = next(a for a in arts if a.key == "capture-summary" and a.flow_run_id == run_id)
    table = {row[0]: row for row in render_table(str(summary.data))[1:]}
    assert table["lab-down:all"][1] == "failed"
    assert "cannot list the VMs of hypervisor lab-down" in table["lab-down:all"][7]
    assert "cannot connect" in table["lab-down:all"][7]
    assert all(table[vm][1] == "completed" for vm in lab_vms)

    # /status's per-VM detail, as the API reads it from Prefect.
    latest = PrefectRuns("capture-vms", "unused").latest()
    assert latest is not None and latest.id == str(run_id)
    detail = {v.vm_id: v for v in latest.vms}
    assert detail["lab-down:all"].state == "failed"
    assert "cannot connect" in (detail["lab-down:all"].error or "")
    assert all(detail[vm].state == "completed" for vm in lab_vms)
