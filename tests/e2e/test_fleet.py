"""Issue 17: one "all" trigger over a fleet of lab guests (``lab/up --many``) through the
real stack, the smallest size of benchmarks/fleet.py: every VM recorded exactly once,
the global and per-hypervisor caps held (from the records' start and end times, with
tests/helpers/fleet.py, the benchmark's own check), /status showing each VM final.

Four 16 MiB guests as three qemu hypervisors (lab-many-1 has guests 1 and 4), caps 2 in
all and 1 per hypervisor: both caps bind (three hypervisors could run three at once,
lab-many-1 two), so a broken limit can show in the records. The module brings the fleet
up and leaves it as it found it (tests/integration/test_lab_many.py owns it too: each
resets it to what it needs).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.helpers import fleet
from tests.helpers.stack import Stack, lab_inventory, running_stack

pytestmark = pytest.mark.lab

BASE = "/api/memory-dumps"
N, MIB, H = 4, 16, 3
GLOBAL_CAP, HV_CAP = 2, 1
RUNNER_POLL_SEC = 600  # the runner's own look for due flow runs: every ten minutes


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    lab_inventory()  # the lab is up (its sshd reaches the guests' QMP sockets)
    with fleet.restored():
        inv = fleet.up(N, MIB, H)
        with running_stack(
            tmp_path_factory.mktemp("fleet"),
            str(inv),
            max_concurrent_captures=str(GLOBAL_CAP),
            max_captures_per_hypervisor=str(HV_CAP),
            analysis="false",  # the orchestration is under test, not the Volatility check
            capture_retry_delay_sec="1",
            # Only the API's ring starts a trigger's flow run in time here (deployments.wake).
            orchestration__runner_poll_sec=str(RUNNER_POLL_SEC),
        ) as st:
            yield st


def test_all_over_the_fleet_records_each_vm_once_within_the_caps(fleet_stack: Stack) -> None:
    st = fleet_stack
    code, body = st.call("POST", f"{BASE}/trigger", {"vm_ids": ["all"]})
    assert code == 200, body
    status = st.wait_status(timeout=180)
    vms = fleet.guest_names(N)
    assert status["status"] == "completed", status
    assert status["error"] is None
    assert sorted(v["vm_id"] for v in status["vms"]) == vms, status["vms"]
    assert {v["state"] for v in status["vms"]} == {"completed"}, status["vms"]

    code, body = st.call("GET", f"{BASE}/records?limit=1000")
    assert code == 200
    recs = body["records"]  # the stack is this module's: all of them are this trigger's
    assert fleet.recorded_once(recs, vms) == []
    assert {r["hypervisor"] for r in recs} == {f"lab-many-{k}" for k in range(1, H + 1)}
    assert fleet.cap_violations(recs, global_cap=GLOBAL_CAP, per_hypervisor_cap=HV_CAP) == []

    # The same records all started at once break both caps: the check reads this data.
    first = min(datetime.fromisoformat(r["timestamp"]) for r in recs)
    bunched = [{**r, "timestamp": first.isoformat()} for r in recs]
    broken = fleet.cap_violations(bunched, global_cap=GLOBAL_CAP, per_hypervisor_cap=HV_CAP)
    assert [v.split(":")[0] for v in broken] == [
        f"global cap {GLOBAL_CAP}",
        f"hypervisor 'lab-many-1' cap {HV_CAP}",
    ]


def test_a_trigger_starts_at_once_though_the_runner_polls_every_ten_minutes(
    fleet_stack: Stack,
) -> None:
    # After the runner's first poll (at its start) and before its next: a trigger waits
    # for the ring (the API -> deployments.wake), or ten minutes.
    st = fleet_stack
    since = datetime.now(UTC) - timedelta(seconds=1)
    code, body = st.call("POST", f"{BASE}/trigger", {"vm_ids": [fleet.guest_names(N)[0]]})
    assert code == 200, body
    status = st.wait_status(timeout=RUNNER_POLL_SEC / 10, since=since)
    assert status["status"] == "completed", status


# The checks themselves, on records made up here.

T0 = datetime(2026, 12, 1, 2, 0, 0)


def rec(vmid: str, hv: str, start: float, duration: float) -> dict[str, Any]:
    return {
        "vmid": vmid,
        "hypervisor": hv,
        "timestamp": (T0 + timedelta(seconds=start)).isoformat(),
        "duration_sec": duration,
    }


def test_the_cap_check_finds_overlaps_and_passes_back_to_back_captures() -> None:
    back_to_back = [rec("a", "h1", 0, 1.0), rec("b", "h1", 1.0, 1.0), rec("c", "h2", 0.5, 1.0)]
    assert fleet.cap_violations(back_to_back, global_cap=2, per_hypervisor_cap=1) == []
    # b starts 2 ms before a ends: two at once on h1.
    overlap = [rec("a", "h1", 0, 1.0), rec("b", "h1", 0.998, 1.0), rec("c", "h2", 5, 1.0)]
    assert fleet.cap_violations(overlap, global_cap=2, per_hypervisor_cap=1) == [
        f"hypervisor 'h1' cap 1: 2 captures at once at {T0 + timedelta(seconds=0.998)}: ['a', 'b']"
    ]
    # One per hypervisor, three at once: the global cap.
    spread = [rec("a", "h1", 0, 1.0), rec("b", "h2", 0.2, 1.0), rec("c", "h3", 0.4, 1.0)]
    assert fleet.cap_violations(spread, global_cap=2, per_hypervisor_cap=1) == [
        f"global cap 2: 3 captures at once at {T0 + timedelta(seconds=0.4)}: ['a', 'b', 'c']"
    ]
    assert fleet.cap_violations(spread, global_cap=3, per_hypervisor_cap=1) == []


def test_the_once_check_finds_missing_repeated_and_foreign_records() -> None:
    vms = fleet.guest_names(3)
    assert vms == ["vm-many-001", "vm-many-002", "vm-many-003"]
    good = [rec(v, "h1", i, 1.0) for i, v in enumerate(vms)]
    assert fleet.recorded_once(good, vms) == []
    bad = [*good[:2], rec("vm-many-002", "h1", 9, 1.0), rec("vm-web-01", "lab", 9, 1.0)]
    assert fleet.recorded_once(bad, vms) == [
        "1 VM(s) without a record: ['vm-many-003']",
        "1 VM(s) recorded more than once: ['vm-many-002']",
        "1 record(s) of VMs not in the fleet: ['vm-web-01']",
    ]
