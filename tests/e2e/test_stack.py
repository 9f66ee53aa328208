"""Trigger -> Prefect flow run on the runner -> captures of lab VMs -> records, status,
stats, through the real HTTP API of ``memdump serve``."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from isal import igzip

from tests.helpers.lab import assert_hypervisor_clean, virsh
from tests.helpers.procs import forkserver_below, reaped_children_cpu_ticks, wait_for
from tests.helpers.stack import Stack

pytestmark = pytest.mark.lab

BASE = "/api/memory-dumps"


def test_trigger_completes_and_records(stack: Stack) -> None:
    # The stack is shared by the session: judge only what this trigger added.
    _, old = stack.call("GET", f"{BASE}/records")
    _, old_stats = stack.call("GET", f"{BASE}/stats")
    # The run is forked from the runner's warm forkserver (deployments.warm): once it
    # has ended, the forkserver has reaped it, so its children's CPU time has grown.
    forkserver = forkserver_below(stack.pid)
    reaped = reaped_children_cpu_ticks(forkserver)
    t0 = time.monotonic()
    code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01", "vm-db-01"]})
    assert code == 200, body
    assert time.monotonic() - t0 < 5  # the trigger returns once the run exists
    assert body["status"] == "scheduled" and body["vm_ids"] == ["vm-web-01", "vm-db-01"]
    assert body["message"] == "Memory dump scheduled for 2 VM(s)"

    status = stack.wait_status()
    assert status["status"] == "completed", status
    assert status["vm_ids"] == ["vm-web-01", "vm-db-01"] and status["error"] is None
    assert status["last_trigger"]["status"] == "completed"
    assert status["duration"] > 0 and status["last_trigger"]["duration"] == status["duration"]
    # (the run's process ends a moment after its state is final)
    assert wait_for(lambda: reaped_children_cpu_ticks(forkserver) > reaped, 60)

    code, recs = stack.call("GET", f"{BASE}/records")
    assert code == 200 and recs["count"] == old["count"] + 2
    new = recs["records"][:2]  # newest first
    assert recs["records"][2:] == old["records"]
    by_vm = {r["vmid"]: r for r in new}
    assert set(by_vm) == {"vm-web-01", "vm-db-01"}
    for rec in by_vm.values():
        raw = igzip.decompress(Path(rec["dump_path"]).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == rec["sha256"]
        assert rec["gzip_size_bytes"] == Path(rec["dump_path"]).stat().st_size

    # The per-hypervisor limit is 1 in this stack: the two captures never overlapped.
    spans = sorted(
        (
            datetime.fromisoformat(r["timestamp"]),
            datetime.fromisoformat(r["timestamp"]) + timedelta(seconds=r["duration_sec"]),
        )
        for r in new
    )
    assert spans[0][1] <= spans[1][0], spans

    code, stats = stack.call("GET", f"{BASE}/stats")
    assert code == 200 and stats["total_dumps"] == old_stats["total_dumps"] + 2
    assert stats["total_vms"] == len({r["vmid"] for r in recs["records"]})
    assert stats["total_size_bytes"] == old_stats["total_size_bytes"] + sum(
        r["gzip_size_bytes"] for r in new
    )
    assert stats["last_dump"] == new[0]["timestamp"]


def test_unknown_vm_fails_only_itself(stack: Stack) -> None:
    _, before = stack.call("GET", f"{BASE}/stats")
    code, _ = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01", "nope-01"]})
    assert code == 200
    status = stack.wait_status()
    assert status["status"] == "failed"
    assert "nope-01" in status["error"] and "1 of 2" in status["error"]
    _, after = stack.call("GET", f"{BASE}/stats")
    assert after["total_dumps"] == before["total_dumps"] + 1


@pytest.mark.usefixtures("on_stack_prefect")
def test_status_comes_from_prefect_not_process_memory(stack: Stack) -> None:
    # A second API instance (a replica, or the API after a restart) reads the same status.
    from fastapi.testclient import TestClient

    from api.main import create_app
    from memdump.settings import Settings

    _, live = stack.call("GET", f"{BASE}/status")
    replica = TestClient(create_app(Settings(data_dir=stack.data_dir)), base_url="http://localhost")
    assert replica.get(f"{BASE}/status").json() == live


@pytest.mark.usefixtures("on_stack_prefect")
def test_deployments_and_limits_exist(stack: Stack) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name("capture-vms/weekly")
        assert weekly.parameters == {"vm_ids": ["all"], "source": "schedule"}
        assert [s.schedule.cron for s in weekly.schedules] == ["0 2 * * 1"]  # type: ignore[union-attr]
        client.read_deployment_by_name("capture-vms/on-demand")
        verify = client.read_deployment_by_name("verify-dumps/verify-weekly")
        # No days: the flow reads MEMDUMP_VERIFY__DAYS when it runs (deployments/catalog.py).
        assert verify.parameters == {}
        assert all(s.schedule.timezone == "UTC" for s in [*weekly.schedules, *verify.schedules])  # type: ignore[union-attr]
        assert [s.schedule.cron for s in verify.schedules] == ["0 4 * * 0"]  # type: ignore[union-attr]
        keep = client.read_deployment_by_name("apply-retention/retention-daily")
        assert [s.schedule.cron for s in keep.schedules] == ["30 3 * * *"]  # type: ignore[union-attr]
        assert client.read_global_concurrency_limit_by_name("memdump-captures").limit == 3
        assert client.read_global_concurrency_limit_by_name("memdump-hv-lab").limit == 1


def test_all_captures_every_running_vm(stack: Stack) -> None:
    _, before = stack.call("GET", f"{BASE}/stats")
    code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["all"]})
    assert code == 200 and body["vm_ids"] == ["all"]
    status = stack.wait_status()
    assert status["status"] == "completed", status
    running = set(virsh("list", "--name").split())
    _, recs = stack.call("GET", f"{BASE}/records?limit={len(running)}")
    assert {r["vmid"] for r in recs["records"]} == running
    _, after = stack.call("GET", f"{BASE}/stats")
    assert after["total_dumps"] == before["total_dumps"] + len(running)


@pytest.mark.usefixtures("on_stack_prefect")
def test_timeout_stops_the_dump_and_reports_timeout(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flow runs in this process against the stack's Prefect server, with a deadline
    # far shorter than a dump: the capture must stop itself and the run end TimedOut.
    for k, v in stack.env.items():
        if k.startswith("MEMDUMP_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("MEMDUMP_CAPTURE_TIMEOUT_SEC", "0.3")
    from flows.capture import capture_vms

    dumps_before = set((stack.data_dir / "dumps").glob("*"))
    started = datetime.now(UTC) - timedelta(seconds=1)  # the server's clock: whole seconds
    state = capture_vms(vm_ids=["vm-web-01"], source="test", return_state=True)
    assert state.is_failed() and state.name == "TimedOut", state
    status = stack.wait_status(since=started)
    assert status["status"] == "timeout" and "deadline" in status["error"]
    # Nothing kept, the remote side cleaned up, no dump job left, the guest runs.
    assert set((stack.data_dir / "dumps").glob("*")) == dumps_before
    assert_hypervisor_clean("vm-web-01")
    assert "None" in virsh("domjobinfo", "vm-web-01")


def test_an_id_qualified_by_its_hypervisor(stack: Stack) -> None:
    code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["lab:vm-db-01"]})
    assert code == 200, body
    status = stack.wait_status()
    assert status["status"] == "completed", status
    _, recs = stack.call("GET", f"{BASE}/records?limit=1")
    (rec,) = recs["records"]
    assert rec["vmid"] == "vm-db-01" and rec["hypervisor"] == "lab"
    code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["elsewhere:vm-db-01"]})
    assert code == 200
    status = stack.wait_status()
    assert status["status"] == "failed" and "no hypervisor 'elsewhere'" in status["error"]
