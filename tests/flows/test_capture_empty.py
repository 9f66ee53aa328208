"""Issue 16 item 3: an empty capture is never silently green. In real Prefect flow runs
(the test harness): a trigger of "all" whose hypervisors run no VM completes (the
contract's error stays null) saying "nothing captured" in the run's message, at the top
of its summary artifact and in /status's per-VM detail; a hypervisor without VMs next to
one with VMs is named the same way; and an inventory without a hypervisor fails the run,
naming the setting.

The empty hypervisor is real: the qemu driver over the lab's sshd (host key checked),
scanning a QMP directory that holds no VM socket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from markdown_it import MarkdownIt

from api.main import create_app
from api.runs import PrefectRuns
from memdump.records.sqlite import SQLiteRecordStore
from memdump.runinfo import CAPTURE_FLOW, NO_RUNNING_VM, SUMMARY_KEY
from memdump.settings import Settings
from memdump.targets import Listing
from tests.helpers.api import client
from tests.helpers.lab import lab_missing
from tests.helpers.markdown import render_table

pytestmark = pytest.mark.lab


def _summary(run_id: Any) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as pc:
        arts = pc.read_latest_artifacts(limit=50)
    return next(a for a in arts if a.key == SUMMARY_KEY and a.flow_run_id == run_id)


def _status(tmp_path: Path) -> dict[str, Any]:
    """/status as the API answers it, read from this harness's Prefect."""
    settings = Settings(data_dir=tmp_path / "api", api={"status_cache_sec": 0})
    runs = PrefectRuns(CAPTURE_FLOW, "unused")
    app = create_app(settings, store=SQLiteRecordStore(tmp_path / "api.db"), runs=runs)
    body: dict[str, Any] = client(app).get("/api/memory-dumps/status").json()
    return body


@pytest.fixture
def empty_lab_hypervisor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """An inventory of one real hypervisor that runs no VM: the lab's sshd, qemu driver,
    an empty QMP directory."""
    lab_inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not lab_inv or not Path(lab_inv).is_file():
        lab_missing()
    lab = yaml.safe_load(Path(lab_inv).read_text())["hypervisors"][0]
    qmp_dir = tmp_path / "qmp"
    qmp_dir.mkdir(mode=0o700)
    hv = {k: v for k, v in lab.items() if k not in ("libvirt_uri", "driver")}
    hv.update(name="lab-empty", driver="qemu", qmp_dir=str(qmp_dir))
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"hypervisors": [hv]}))
    monkeypatch.delenv("MEMDUMP_HYPERVISORS", raising=False)
    for key, value in {
        "MEMDUMP_INVENTORY_FILE": str(inv),
        "MEMDUMP_DATA_DIR": str(tmp_path / "data"),
        "MEMDUMP_DUMP_DIR": str(tmp_path / "dumps"),
    }.items():
        monkeypatch.setenv(key, value)
    return "lab-empty"


def test_all_on_hypervisors_without_vms_says_nothing_was_captured(
    empty_lab_hypervisor: str, tmp_path: Path
) -> None:
    from prefect import get_client

    from flows.capture import capture_vms

    hv = empty_lab_hypervisor
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)

    # Completed (nothing failed), and its message says what happened.
    assert state.is_completed()
    assert state.message == f"nothing captured: no running VM on hypervisor(s) {hv}"

    # The summary: a line above the table, and the hypervisor's row.
    run_id = state.state_details.flow_run_id
    summary = _summary(run_id)
    text = str(summary.data)
    first, blank, table = text.partition("\n\n")
    assert blank and MarkdownIt("commonmark").render(first) == (
        f"<p><strong>Nothing captured</strong>: no running VM on hypervisor(s) {hv}.</p>\n"
    )
    rows = render_table(table)[1:]
    note = f"no running VM on hypervisor {hv}: nothing to capture there"
    assert rows == [[f"{hv}:all", "no running VM", "", "", "", "", "", note]]
    assert "1 hypervisor(s) with no running VM" in (summary.description or "")

    # The hypervisor's list task run is a Completed state named so (data for /status).
    with get_client(sync_client=True) as pc:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        trs = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert [(t.state_type.value, t.state_name) for t in trs] == [("COMPLETED", NO_RUNNING_VM)]

    # /status: completed, error null (the contract), the per-VM detail says it.
    st = _status(tmp_path)
    assert st["status"] == "completed" and st["error"] is None
    assert st["vm_ids"] == ["all"]
    assert st["vms"] == [
        {
            "vm_id": f"{hv}:all",
            "state": "completed",
            "progress": None,
            "bytes_done": None,
            "bytes_total": None,
            "error": None,
            "note": note,
        }
    ]


def test_a_hypervisor_without_vms_next_to_one_with_vms(
    fake_engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two hypervisors (fakes for the listing and the chain): the run completes with the
    VM of one captured, and names the other as running no VM."""
    from flows.capture import capture_vms

    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    monkeypatch.setenv(
        "MEMDUMP_HYPERVISORS",
        '[{"name": "fakehv", "transport": "local"}, {"name": "idlehv", "transport": "local"}]',
    )
    listings = {"fakehv": ("vm-a",), "idlehv": ()}

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            pass

    def list_one(driver: Any) -> Listing:
        from memdump.hypervisors import VMRef

        vms = tuple(VMRef(driver.name, v, v) for v in listings[driver.name])
        return Listing(driver.name, vms)

    monkeypatch.setattr("tasks.listing.open_driver", lambda hv, ssh: Named(hv.name))
    monkeypatch.setattr("tasks.listing.list_one", list_one)

    state = capture_vms(vm_ids=["all"], source="test", return_state=True)

    assert state.is_completed()
    assert state.message == "1 VM(s) captured; no running VM on hypervisor(s) idlehv"
    assert fake_engine["calls"] == {"vm-a": 1}
    summary = str(_summary(state.state_details.flow_run_id).data)
    assert not summary.startswith("**Nothing captured**")  # something was captured
    rows = {r[0]: r for r in render_table(summary)[1:]}
    assert rows["vm-a"][1] == "completed"
    assert rows["idlehv:all"][1] == "no running VM"
    st = _status(tmp_path)
    assert st["status"] == "completed" and st["error"] is None
    by_vm = {v["vm_id"]: v for v in st["vms"]}
    assert set(by_vm) == {"vm-a", "idlehv:all"}
    assert by_vm["vm-a"]["state"] == "completed" and by_vm["vm-a"]["note"] is None
    assert by_vm["idlehv:all"]["state"] == "completed"
    assert (
        by_vm["idlehv:all"]["note"]
        == "no running VM on hypervisor idlehv: nothing to capture there"
    )


def test_all_with_an_empty_inventory_fails_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flows.capture import capture_vms

    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    monkeypatch.setenv("MEMDUMP_HYPERVISORS", "[]")
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert message.startswith("cannot list VMs: no hypervisor in the inventory"), message
    assert "MEMDUMP_INVENTORY_FILE" in message and "MEMDUMP_HYPERVISORS" in message
    st = _status(tmp_path)
    assert st["status"] == "failed" and st["error"] == message
