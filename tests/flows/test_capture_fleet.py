"""A trigger over many VMs (issue 17, item 3), in a real flow run under the shared
Prefect test harness, the hypervisors and the capture faked: each VM waits for room
under the caps before its task opens a connection or asks the Prefect server for a slot;
plain ids are located with one connection per hypervisor for the whole run, not one per
hypervisor and VM; a run reads the concurrency limits in one request and writes only
what differs from the settings."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memdump.capture import Capture
from memdump.errors import VMNotFoundError
from memdump.hypervisors import VMRef
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore

FLEET = {"hv-a": ["a1", "a2", "a3"], "hv-b": ["b1", "b2", "b3"]}
CAPS = {"total": 2, "per_hypervisor": 1}
WHO = ("list", "flow", "task")


class Peak:
    """A count that goes up and down, and the most it reached (per key and in all)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        self.most_total = 0

    def up(self, key: str) -> None:
        with self._lock:
            self.now[key] += 1
            self.most[key] = max(self.most[key], self.now[key])
            self.most_total = max(self.most_total, sum(self.now.values()))

    def down(self, key: str) -> None:
        with self._lock:
            self.now[key] -= 1


def _counted(
    peak: Peak, key: str, real: Callable[..., AbstractContextManager[Any]]
) -> Callable[..., AbstractContextManager[None]]:
    """``real`` (a context manager), with ``peak`` counting who is inside it."""

    @contextmanager
    def counted(*args: Any, **kw: Any) -> Iterator[None]:
        peak.up(key)
        try:
            with real(*args, **kw):
                yield
        finally:
            peak.down(key)

    return counted


class Fleet:
    """The fake hypervisors of FLEET and what was asked of them: a driver is connected
    from its first command to its close (what an SSH connection costs)."""

    def __init__(self, vms: dict[str, list[str]]) -> None:
        self.vms = {hv: list(names) for hv, names in vms.items()}  # a test may add some
        # capture tasks connected and not done capturing (waiting for a slot, or capturing)
        self.connected = Peak()
        # by whose driver: "list" (list-vms tasks), "flow" (locating ids), "task" (captures)
        self.connections: dict[str, Counter[str]] = {w: Counter() for w in WHO}
        self.lookups: dict[str, list[tuple[str, str]]] = {w: [] for w in WHO}
        self.captures = Peak()  # captures running at once, per hypervisor
        self._lock = threading.Lock()

    def driver(self, who: str, name: str) -> FleetDriver:
        return FleetDriver(self, who, name)


class FleetDriver:
    def __init__(self, fleet: Fleet, who: str, name: str) -> None:
        self.fleet, self.who, self.name = fleet, who, name
        self.connected = False

    def _use(self) -> None:
        if not self.connected:
            self.connected = True
            with self.fleet._lock:
                self.fleet.connections[self.who][self.name] += 1
            if self.who == "task":
                self.fleet.connected.up(self.name)

    def list_vms(self) -> list[VMRef]:
        self._use()
        return [VMRef(self.name, v, v) for v in self.fleet.vms[self.name]]

    def resolve(self, vm_id: str) -> VMRef:
        self._use()
        with self.fleet._lock:
            self.fleet.lookups[self.who].append((self.name, vm_id))
        if vm_id not in self.fleet.vms[self.name]:
            raise VMNotFoundError(f"no VM {vm_id!r} on hypervisor {self.name}", vm_id=vm_id)
        return VMRef(self.name, vm_id, vm_id)

    def captured(self) -> None:
        """Its capture is over: from here it only waits to be closed (the chain records
        the dump first), an idle connection."""
        if self.connected and self.who == "task":
            self.fleet.connected.down(self.name)
        self.connected = False

    def close(self) -> None:
        self.captured()


def _record(ref: VMRef, tmp: Path) -> DumpRecord:
    return DumpRecord(
        datetime.now(UTC),
        ref.vmid,
        ref.vmid,
        "a" * 64,
        0.05,
        100,
        1,
        2,
        3,
        str(tmp / f"{ref.vmid}.mem.gz"),
        "b" * 64,
        4096,
        ref.hypervisor,
    )


LIMIT_CALLS = (
    "read_global_concurrency_limits",
    "read_global_concurrency_limit_by_name",
    "upsert_global_concurrency_limit_by_name",
    "create_global_concurrency_limit",
    "update_global_concurrency_limit",
)


def _count_limit_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Prefect client's calls about concurrency limits, by name, from now on."""
    from prefect.client.orchestration import SyncPrefectClient

    calls: list[str] = []
    for name in LIMIT_CALLS:
        real = getattr(SyncPrefectClient, name)

        def spy(self: Any, *a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(SyncPrefectClient, name, spy)
    return calls


def _limits() -> dict[str, int]:
    from prefect import get_client

    from tasks.limits import GLOBAL_LIMIT, hypervisor_limit

    names = [GLOBAL_LIMIT, *(hypervisor_limit(hv) for hv in FLEET)]
    with get_client(sync_client=True) as client:
        return {n: client.read_global_concurrency_limit_by_name(n).limit for n in names}


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fleet:
    import json

    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    monkeypatch.setenv(
        "MEMDUMP_HYPERVISORS", json.dumps([{"name": n, "transport": "local"} for n in FLEET])
    )
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__CAPTURE_RETRY_DELAY_SEC", "0")
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__MAX_CONCURRENT_CAPTURES", str(CAPS["total"]))
    monkeypatch.setenv(
        "MEMDUMP_ORCHESTRATION__MAX_CAPTURES_PER_HYPERVISOR", str(CAPS["per_hypervisor"])
    )
    fl = Fleet(FLEET)

    def capture(driver: Any, ref: VMRef, settings: Any, **kw: Any) -> Capture:
        fl.captures.up(ref.hypervisor)
        try:
            time.sleep(0.05)  # long enough for the others to pile up if they can
        finally:
            fl.captures.down(ref.hypervisor)
            driver.captured()
        return Capture(_record(ref, tmp_path), None, None, {})  # type: ignore[arg-type]

    monkeypatch.setattr("memdump.chain.capture", capture)
    monkeypatch.setattr("memdump.chain.open_driver", lambda hv, ssh: fl.driver("task", hv.name))
    monkeypatch.setattr("tasks.listing.open_driver", lambda hv, ssh: fl.driver("list", hv.name))
    monkeypatch.setattr(
        "flows.capture.open_driver", lambda hv, ssh: fl.driver("flow", hv.name), raising=False
    )
    return fl


def test_each_vm_waits_for_room_before_it_connects_or_asks_for_a_slot(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tasks.capture
    from flows.capture import capture_vms
    from memdump.settings import Settings
    from tasks.limits import ensure_limits

    asking = Peak()  # tasks at the Prefect limits (tasks.limits.SLOTS): asking, or holding
    monkeypatch.setattr(
        tasks.capture.SLOTS, "hold", _counted(asking, "prefect", tasks.capture.SLOTS.hold)
    )
    ensure_limits(Settings())  # the limits as configured: the run finds them so
    limit_calls = _count_limit_calls(monkeypatch)
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)
    assert state.is_completed(), state
    rows = SQLiteRecordStore(tmp_path / "records.db").list(100, 0)
    assert sorted(r["vmid"] for r in rows) == sorted(v for vms in FLEET.values() for v in vms)
    # Six VMs, caps 2 in all and 1 per hypervisor: never more connections, nor more
    # tasks at the Prefect server, than captures the caps allow (3 to 6 at once before:
    # each task connected, resolved its VM, then asked the server for a slot).
    assert fleet.connected.most_total <= CAPS["total"]
    assert max(fleet.connected.most.values()) <= CAPS["per_hypervisor"]
    assert asking.most_total <= CAPS["total"]
    # The caps themselves held.
    assert fleet.captures.most_total <= CAPS["total"]
    assert max(fleet.captures.most.values()) <= CAPS["per_hypervisor"]
    # Each task connected once, to its own hypervisor; "all" was listed once per hypervisor.
    assert fleet.connections["task"] == {"hv-a": 3, "hv-b": 3}
    assert fleet.connections["list"] == {"hv-a": 1, "hv-b": 1}
    every = [(hv, v) for hv, vms in FLEET.items() for v in vms]
    assert sorted(fleet.lookups["task"]) == sorted(every)
    # The run read the limits in one request and wrote none (before: an upsert per limit,
    # each a read of its own: 1 + H requests).
    assert limit_calls == ["read_global_concurrency_limits"]


def test_a_fleet_is_queued_for_a_bounded_pool_of_threads_taking_turns(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A trigger over 100 VMs made all their task runs at once; the embedded server's
    SQLite answered that burst "database is locked", and Prefect's engine waited 2 s,
    4 s before the first capture (2026-12-01). The captures are queued for twice the
    global cap plus one thread per hypervisor, the hypervisors taking turns; and the
    flow run's process retries busy answers in milliseconds."""
    import tasks.busy_retries
    import tasks.capture
    from flows.capture import capture_vms

    for hv, prefix in (("hv-a", "a"), ("hv-b", "b")):
        fleet.vms[hv] += [f"{prefix}{i}" for i in range(4, 10)]  # 18 VMs in all
    at_gate = Peak()  # capture task runs at the gate: waiting for a place, or holding one
    monkeypatch.setattr(
        tasks.capture.GATE, "place", _counted(at_gate, "task", tasks.capture.GATE.place)
    )
    monkeypatch.setattr(tasks.busy_retries, "_everywhere", False)
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)
    assert state.is_completed(), state
    rows = SQLiteRecordStore(tmp_path / "records.db").list(100, 0)
    assert len(rows) == 18 and len({r["vmid"] for r in rows}) == 18
    pool = 2 * CAPS["total"] + len(FLEET)
    assert 0 < at_gate.most_total <= pool  # 18 before: every task run at once
    assert fleet.captures.most_total <= CAPS["total"]
    assert tasks.busy_retries._everywhere


def test_the_vms_of_all_take_turns_by_hypervisor() -> None:
    from flows.capture import _taking_turns

    listed: list[tuple[str, str | None]] = [
        ("a1", "hv-a"), ("a2", "hv-a"), ("a3", "hv-a"), ("b1", "hv-b"), ("c1", "hv-c"),
        ("c2", "hv-c"),
    ]  # fmt: skip
    assert _taking_turns(listed) == [
        ("a1", "hv-a"), ("b1", "hv-b"), ("c1", "hv-c"), ("a2", "hv-a"), ("c2", "hv-c"),
        ("a3", "hv-a"),
    ]  # fmt: skip
    assert _taking_turns([]) == []


def test_plain_ids_are_located_with_one_connection_per_hypervisor(
    fleet: Fleet, tmp_path: Path
) -> None:
    from flows.capture import capture_vms

    fleet.vms["hv-a"].append("twin")  # on both: never guessed
    fleet.vms["hv-b"].append("twin")
    ids = ["a1", "b1", "b2", "hv-a:a3", "nowhere", "twin"]
    state = capture_vms(vm_ids=ids, source="test", return_state=True)
    assert state.is_failed()
    assert "2 of 6 VM(s) failed" in (state.message or "")
    assert "twin: VM id 'twin' matches on several hypervisors: hv-a, hv-b" in state.message
    assert "nowhere: no VM 'nowhere' on any hypervisor" in state.message
    rows = SQLiteRecordStore(tmp_path / "records.db").list(100, 0)
    captured = [("hv-a", "a1"), ("hv-a", "a3"), ("hv-b", "b1"), ("hv-b", "b2")]
    assert sorted((r["hypervisor"], r["vmid"]) for r in rows) == captured
    # A located VM's task connects to its own hypervisor only; the two the flow could not
    # place ask every hypervisor themselves (their errors are find's own). Before, every
    # unqualified id's task connected to every hypervisor: 5 x 2.
    assert sorted(fleet.lookups["task"]) == sorted(
        captured + [(hv, v) for hv in FLEET for v in ("nowhere", "twin")]
    )
    assert fleet.connections["task"] == {"hv-a": 4, "hv-b": 4}
    # The flow asked each hypervisor about every unqualified id, over one connection each.
    unqualified = ["a1", "b1", "b2", "nowhere", "twin"]
    assert fleet.connections["flow"] == {"hv-a": 1, "hv-b": 1}
    for hv in FLEET:
        assert sorted(v for h, v in fleet.lookups["flow"] if h == hv) == sorted(unqualified)


def test_limits_follow_a_changed_cap_and_come_back_when_deleted(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import get_client

    from memdump.settings import Settings
    from tasks.limits import GLOBAL_LIMIT, ensure_limits, hypervisor_limit

    wanted = {
        GLOBAL_LIMIT: CAPS["total"],
        **{hypervisor_limit(hv): CAPS["per_hypervisor"] for hv in FLEET},
    }
    ensure_limits(Settings())
    assert _limits() == wanted
    calls = _count_limit_calls(monkeypatch)
    # A changed cap takes effect with the next run: one read, one write for that limit.
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__MAX_CONCURRENT_CAPTURES", "5")
    ensure_limits(Settings())
    assert calls == ["read_global_concurrency_limits", "update_global_concurrency_limit"]
    assert _limits() == {**wanted, GLOBAL_LIMIT: 5}
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__MAX_CONCURRENT_CAPTURES", str(CAPS["total"]))
    # So does a limit gone from the server: it is made again.
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(hypervisor_limit("hv-a"))
    calls.clear()
    ensure_limits(Settings())
    assert sorted(calls) == [
        "create_global_concurrency_limit",
        "read_global_concurrency_limits",
        "update_global_concurrency_limit",
    ]
    assert _limits() == wanted


class PartRuns:
    """Stands in for Prefect's ``run_deployment`` in flows of the fan-out over deployments
    (tasks.fanout): lays out the part's flow run as run_deployment does (a placeholder
    task run in the trigger's flow run, its parent) and runs it at once, on a thread of
    its own as a worker's process would (flows.capture.capture_part), then returns it as
    read back from the server. A part whose first VM is in ``crash`` runs only that many
    of its VMs, then its flow run is marked Crashed, as the crash automation marks one
    whose worker died."""

    def __init__(self, crash: dict[str, list[int]]) -> None:
        self.crash = crash
        self.asked: list[list[str]] = []
        self.polls: set[float] = set()  # how often the trigger's run asked for the end
        self.at_once: set[int] = set()  # each part's share of the global cap
        self._lock = threading.Lock()

    def __call__(self, name: str, parameters: dict[str, Any], **kw: Any) -> Any:
        from uuid import uuid4

        from prefect import Task, get_client
        from prefect.context import FlowRunContext
        from prefect.flow_engine import run_flow
        from prefect.states import Crashed, Running

        from flows.capture import capture_part

        targets = [tuple(t) for t in parameters["targets"]]
        with self._lock:
            self.asked.append([t[0] for t in targets])
            self.polls.add(kw["poll_interval"])
            self.at_once.add(parameters["at_once"])
            plan = self.crash.get(str(targets[0][0]), [])
            cut = plan.pop(0) if plan else None
        ran = {
            "targets": targets if cut is None else targets[:cut],
            "source": "test",
            "at_once": parameters["at_once"],
        }
        parent = FlowRunContext.get()
        assert parent is not None and parent.flow_run is not None
        with get_client(sync_client=True) as client:
            holder = client.create_task_run(
                Task(fn=lambda: None, name=name), parent.flow_run.id, str(uuid4()),
                state=Running(),
            )  # fmt: skip
            run = client.create_flow_run(capture_part, parameters=ran, parent_task_run_id=holder.id)
        worker = threading.Thread(
            target=run_flow, args=(capture_part,), kwargs={"flow_run": run, "parameters": ran}
        )
        worker.start()
        worker.join()
        with get_client(sync_client=True) as client:
            if cut is not None:
                client.set_flow_run_state(run.id, Crashed(message="no heartbeat"), force=True)
            return client.read_flow_run(run.id)


def _fan_out(monkeypatch: pytest.MonkeyPatch, crash: dict[str, list[int]]) -> PartRuns:
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__FANOUT", "deployments")
    parts = PartRuns(crash)
    monkeypatch.setattr("prefect.deployments.run_deployment", parts)
    return parts


def test_fan_out_deals_the_vms_into_parts_and_a_crashed_part_is_run_again_for_the_rest(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A flow run per part, as many parts as the global cap (2), not one per VM (each
    costs a worker a process and the server a dozen writes). The part whose worker died
    after one VM is started again for its other two only: none captured twice."""
    from api.runs import PrefectRuns
    from flows.capture import capture_vms

    parts = _fan_out(monkeypatch, crash={"a1": [1]})
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)
    assert state.is_completed(), state.message
    # The two parts (at once, in either order), then the crashed one's rest.
    assert sorted(parts.asked[:2]) == [["a1", "a2", "a3"], ["b1", "b2", "b3"]]
    assert parts.asked[2:] == [["a2", "a3"]]
    assert parts.polls == {1.0}  # not Prefect's 5 s: 2.5 s more per trigger on average
    # Each part its share of the cap (2 parts, cap 2): here both run in this one process,
    # whose gate then holds them to 1 at once in all.
    assert parts.at_once == {1} and fleet.captures.most_total == 1
    rows = SQLiteRecordStore(tmp_path / "records.db").list(100, 0)
    assert sorted(r["vmid"] for r in rows) == sorted(v for vms in FLEET.values() for v in vms)
    latest = PrefectRuns("capture-vms", "unused").latest()
    assert latest is not None and latest.id == str(state.state_details.flow_run_id)
    assert [(v.vm_id, v.state) for v in latest.vms] == [
        (vm, "completed") for vm in ("a1", "b1", "a2", "b2", "a3", "b3")
    ]


def test_fan_out_a_part_that_crashes_twice_fails_only_its_unended_vms(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from api.runs import PrefectRuns
    from flows.capture import capture_vms

    parts = _fan_out(monkeypatch, crash={"a1": [1], "a2": [0]})
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)
    assert state.is_failed()
    assert "2 of 6 VM(s) failed" in str(state.message)
    assert parts.asked[2:] == [["a2", "a3"]]  # started again once only
    rows = SQLiteRecordStore(tmp_path / "records.db").list(100, 0)
    assert sorted(r["vmid"] for r in rows) == ["a1", "b1", "b2", "b3"]
    latest = PrefectRuns("capture-vms", "unused").latest()
    assert latest is not None
    got = {v.vm_id: (v.state, v.error) for v in latest.vms}
    assert len(latest.vms) == 6
    for vm in ("a1", "b1", "b2", "b3"):
        assert got[vm] == ("completed", None)
    for vm in ("a2", "a3"):
        state_, error = got[vm]
        assert state_ == "failed" and "crashed (its worker is gone)" in str(error), got


def test_fan_out_a_vm_whose_outcome_was_not_published_is_not_passed_off_as_captured(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The part's flow run could not write one VM's outcome (the Prefect server refused
    it for good): the trigger's run does not guess; that VM fails, named, the others
    complete, and its record (written before) stays."""
    import flows.capture
    from flows.capture import capture_vms

    real = flows.capture.publish_outcome

    def publish(outcome: Any) -> None:
        if outcome.vm_id == "b2":
            raise RuntimeError("500 Internal Server Error")
        real(outcome)

    monkeypatch.setattr(flows.capture, "publish_outcome", publish)
    _fan_out(monkeypatch, crash={})
    state = capture_vms(vm_ids=["all"], source="test", return_state=True)
    assert state.is_failed()
    assert str(state.message).startswith("1 of 6 VM(s) failed: b2: flow run ")
    assert "ended without this VM's outcome (COMPLETED" in str(state.message)
    rows = SQLiteRecordStore(tmp_path / "records.db").list(100, 0)
    assert sorted(r["vmid"] for r in rows) == sorted(v for vms in FLEET.values() for v in vms)
