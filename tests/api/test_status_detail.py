"""/status per-VM detail (`vms`, beyond the contract): its shape through the API with a
fake Runs backend, how it is derived from Prefect task runs and progress artifacts, and
how few Prefect queries it costs (tests/api/test_status_fleet.py: against a real Prefect
server)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from fastapi.testclient import TestClient
from prefect import states
from prefect.client.schemas.filters import Operator
from prefect.client.schemas.objects import Artifact, FlowRun, State, TaskRun

from api.main import create_app
from api.runs import PrefectRuns, RunSummary, VMRun, vm_detail
from memdump.records.sqlite import SQLiteRecordStore
from memdump.runinfo import TARGETS_KEY, Progress, step_tag
from memdump.settings import Settings
from tests.helpers.api import FakeRuns
from tests.helpers.contract_doc import contract_examples
from tests.helpers.targets import targets_artifact

BASE = "/api/memory-dumps"
T = datetime(2025, 11, 11, 10, 30, 45, 123456, tzinfo=UTC)
VM_KEYS = ["vm_id", "state", "progress", "bytes_done", "bytes_total", "error", "note"]
VM_STATES = {"pending", "running", "retrying", "completed", "failed", "timeout", "error"}


@pytest.fixture
def runs() -> FakeRuns:
    return FakeRuns()


@pytest.fixture
def client(tmp_path: Path, runs: FakeRuns) -> TestClient:
    store = SQLiteRecordStore(tmp_path / "r.db")
    settings = Settings(data_dir=tmp_path, api={"status_cache_sec": 0})
    return TestClient(create_app(settings, store=store, runs=runs), base_url="http://localhost")


# -- through the API ------------------------------------------------------------------


def test_idle_has_empty_vms_after_the_contract_fields(client: TestClient) -> None:
    idle = contract_examples()["3. Get Dump Status"][2]
    body = client.get(f"{BASE}/status").json()
    assert list(body) == [*idle, "vms"]
    assert body.pop("vms") == []
    assert body == idle


def test_vms_shape_in_progress(client: TestClient, runs: FakeRuns) -> None:
    in_progress = contract_examples()["3. Get Dump Status"][1]
    runs.run = RunSummary(
        "r",
        "RUNNING",
        "Running",
        ["101", "102"],
        T,
        None,
        None,
        (
            VMRun("101", "running", 42.5, None, 114 << 20, 268 << 20),
            VMRun("102", "pending", None, None),
        ),
    )
    body = client.get(f"{BASE}/status").json()
    assert list(body)[-1] == "vms"
    assert body["vms"] == [
        {
            "vm_id": "101",
            "state": "running",
            "progress": 42.5,
            "bytes_done": 114 << 20,
            "bytes_total": 268 << 20,
            "error": None,
            "note": None,
        },
        {
            "vm_id": "102",
            "state": "pending",
            "progress": None,
            "bytes_done": None,
            "bytes_total": None,
            "error": None,
            "note": None,
        },
    ]
    for vm in body.pop("vms"):
        assert list(vm) == VM_KEYS
    # The documented fields are untouched by the extra one.
    assert body == in_progress


def test_vms_shape_finished(client: TestClient, runs: FakeRuns) -> None:
    runs.run = RunSummary(
        "r",
        "FAILED",
        "Failed",
        ["101", "nope"],
        T,
        3.5,
        "1 of 2 VM(s) failed: nope: no VM 'nope' on any hypervisor",
        (
            VMRun("101", "completed", 100.0, None),
            VMRun("nope", "failed", None, "no VM 'nope' on any hypervisor"),
        ),
    )
    body = client.get(f"{BASE}/status").json()
    assert body["status"] == "failed" and body["duration"] == 3.5
    assert body["vms"] == [
        {
            "vm_id": "101",
            "state": "completed",
            "progress": 100.0,
            "bytes_done": None,
            "bytes_total": None,
            "error": None,
            "note": None,
        },
        {
            "vm_id": "nope",
            "state": "failed",
            "progress": None,
            "bytes_done": None,
            "bytes_total": None,
            "error": body["vms"][1]["error"],
            "note": None,
        },
    ]
    assert "nope" in body["vms"][1]["error"]


def test_unidentified_vm_of_an_all_trigger(client: TestClient, runs: FakeRuns) -> None:
    runs.run = RunSummary(
        "r", "RUNNING", "Running", ["all"], T, None, None, (VMRun(None, "pending", None, None),)
    )
    assert client.get(f"{BASE}/status").json()["vms"] == [
        {
            "vm_id": None,
            "state": "pending",
            "progress": None,
            "bytes_done": None,
            "bytes_total": None,
            "error": None,
            "note": None,
        }
    ]


def test_openapi_documents_vms(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    status = schemas["StatusResponse"]
    assert list(status["properties"])[-1] == "vms"
    assert "vms" in status["required"]
    assert status["properties"]["vms"]["items"] == {"$ref": "#/components/schemas/VMStatus"}
    assert status["properties"]["vms"]["description"]
    vm = schemas["VMStatus"]
    assert list(vm["properties"]) == VM_KEYS
    assert set(vm["properties"]["state"]["enum"]) == VM_STATES
    for key in VM_KEYS:
        assert vm["properties"][key].get("description"), key


# -- from Prefect objects -------------------------------------------------------------

FLOW_RUN = uuid4()


def _state(factory: Any, at: datetime | None = None, **kw: Any) -> State[Any]:
    st: State[Any] = factory(**kw)
    if at is not None:
        st.timestamp = at  # type: ignore[assignment]
    return st


STEPS = {"capture-vm": "capture", "list-vms": "list"}


def task_run(
    task: str,
    state: State[Any] | None,
    *,
    n: int,
    vm: str | None = None,
    hypervisor: str | None = None,
) -> TaskRun:
    """A task run as the capture flow creates it: its step as a tag, its VM in its flow
    run's targets (NAMED)."""
    step = STEPS.get(task)
    tags = [step_tag(step)] if step else []
    tr = TaskRun(
        id=uuid4(),
        name=f"{task}-{uuid4().hex[:3]}",
        flow_run_id=FLOW_RUN,
        task_key=f"{task.replace('-', '_')}-3242fc41",
        dynamic_key=str(uuid4()),
        state=state,
        task_inputs={},
        tags=tags,
        created=T + timedelta(milliseconds=n),
    )
    if vm is not None:
        NAMED[tr.id] = (vm, hypervisor)
    return tr


NAMED: dict[UUID, tuple[str, str | None]] = {}  # task run -> its VM, as the flow names it


def named(runs: Iterable[TaskRun]) -> Artifact:
    """The targets artifact the flow publishes for ``runs`` (memdump.runinfo.Target)."""
    return targets_artifact(FLOW_RUN, [(t.id, *NAMED[t.id]) for t in runs if t.id in NAMED])


def detail(
    vm_ids: list[str], final: bool, runs: Iterable[TaskRun], arts: Iterable[Artifact], **kw: Any
) -> tuple[VMRun, ...]:
    """vm_detail with the targets artifact of ``runs`` among the artifacts."""
    runs = list(runs)
    return vm_detail(vm_ids, final, runs, [*arts, named(runs)], **kw)


def progress(
    tr: TaskRun, vm: str, value: float, *, n: int = 0, name: str = "", done: int | None = None
) -> Artifact:
    # As tasks/capture.py writes it: the byte counts (its metadata) once streaming
    # reports them.
    return Artifact(
        id=uuid4(),
        key=f"capture-progress-{vm.lower()}",
        type="progress",
        data=value,
        description=f"{name or vm} on lab: bytes streamed / dump size",
        metadata_=None if done is None else Progress(done, 4000).to_metadata(),
        flow_run_id=FLOW_RUN,
        task_run_id=tr.id,
        created=T + timedelta(seconds=1, milliseconds=n),
    )


def chain(
    capture: State[Any], n: int, vm: str | None = None, hypervisor: str | None = None
) -> tuple[TaskRun, list[TaskRun]]:
    """A VM's capture task run: its whole chain (capture, offload, record)."""
    cap = task_run("capture-vm", capture, n=n, vm=vm, hypervisor=hypervisor)
    return cap, [cap]


def test_before_the_task_runs_exist() -> None:
    assert detail(["a", "b", "a"], False, [], []) == (
        VMRun("a", "pending", None, None),
        VMRun("b", "pending", None, None),
    )
    assert detail(["all"], False, [], []) == ()
    # A run that ended before any capture started (cancelled, crashed).
    assert detail(["a"], True, [], []) == (VMRun("a", "error", None, None),)


def test_streaming_waiting_and_failed_are_told_apart() -> None:
    listed = task_run("list-targets", states.Completed(), n=0)
    # Created in this order; each names its VM in its tags.
    c1, r1 = chain(states.Running(), n=1, vm="vm-web-01")  # waits for a capture slot
    c2, r2 = chain(states.Running(), n=2, vm="vm-db-01")  # streams: has the artifact
    c3, r3 = chain(
        states.Failed(
            message="Task run encountered an exception VMNotFoundError: "
            "no VM 'nope-01' on any hypervisor"
        ),
        n=3,
        vm="nope-01",
    )
    arts = [
        progress(c2, "vm-db-01", 12.0, n=0, done=480),
        progress(c2, "vm-db-01", 37.5, n=1, done=1500),
    ]
    got = detail(
        ["vm-web-01", "nope-01", "vm-db-01"], False, [listed, *r1, *r2, *r3], reversed(arts)
    )
    assert got == (
        VMRun("vm-web-01", "pending", None, None),
        VMRun("nope-01", "failed", None, "no VM 'nope-01' on any hypervisor"),
        VMRun("vm-db-01", "running", 37.5, None, 1500, 4000),
    )


def test_a_vm_is_done_when_its_whole_chain_is() -> None:
    # One task run per VM runs capture, offload and record (memdump.chain): streamed to
    # 100 % and still running is the offload or the record; a failure after the capture
    # says which step failed.
    cap_a, a = chain(states.Completed(), n=1, vm="a")
    cap_b, b = chain(states.Running(), n=2, vm="b")
    cap_c, c = chain(
        states.Failed(
            message="Task run encountered an exception OffloadFailedError: "
            "offload failed (local file kept): denied"
        ),
        n=3,
        vm="c",
    )
    cap_d, d = chain(
        states.Failed(
            message="Task run encountered an exception RecordNotWrittenError: "
            "record not written: disk I/O error"
        ),
        n=4,
        vm="d",
    )
    caps = {"a": cap_a, "b": cap_b, "c": cap_c, "d": cap_d}
    arts = [progress(cap, vm, 100.0) for vm, cap in caps.items()]
    got = detail(["a", "b", "c", "d"], False, [*a, *b, *c, *d], arts)
    assert got == (
        VMRun("a", "completed", 100.0, None),
        VMRun("b", "running", 100.0, None),
        VMRun("c", "failed", 100.0, "offload failed (local file kept): denied"),
        VMRun("d", "failed", 100.0, "record not written: disk I/O error"),
    )


def test_timeout_retry_and_crash() -> None:
    cap_t, t = chain(
        states.Failed(name="TimedOut", message="vm-a: past the deadline"), n=1, vm="vm-a"
    )
    # Retrying: the artifact is from the attempt before, so no progress is claimed yet.
    retry_at = T + timedelta(seconds=5)
    cap_r, r = chain(_state(states.Retrying, retry_at), n=2, vm="vm-b")
    cap_w, w = chain(states.AwaitingRetry(), n=3, vm="vm-c")
    arts = [
        progress(cap_t, "vm-a", 60.0),
        progress(cap_r, "vm-b", 80.0),
        progress(cap_w, "vm-c", 5.0),
    ]
    got = detail(["vm-a", "vm-b", "vm-c"], False, [*t, *r, *w], arts)
    assert got == (
        VMRun("vm-a", "timeout", 60.0, "vm-a: past the deadline"),
        VMRun("vm-b", "pending", None, None),
        VMRun("vm-c", "retrying", 5.0, None),
    )
    # The flow run ended (crashed, cancelled) while VMs were still going: not "running".
    got = detail(["vm-b", "vm-c"], True, [*r, *w], arts)
    assert [(v.vm_id, v.state) for v in got] == [("vm-b", "error"), ("vm-c", "error")]
    crashed, cr = chain(states.Crashed(message="process killed"), n=4, vm="x")
    assert detail(["x"], True, cr, []) == (VMRun("x", "error", None, "process killed"),)


def test_all_trigger_names_vms_from_their_tags() -> None:
    # A VM of "all" is named by its tags from the start (before, only once its progress
    # artifact existed: a VM waiting for a capture slot had no id yet).
    c1, r1 = chain(states.Running(), n=1, vm="DB_X", hypervisor="lab")
    c2, r2 = chain(states.Running(), n=2, vm="vm-web-01", hypervisor="lab")
    c3, r3 = chain(states.Pending(), n=3, vm="vm-app-01", hypervisor="lab")
    arts = [progress(c2, "vm-web-01", 10.0), progress(c1, "db-x", 99.0, name="DB_X")]
    got = detail(["all"], False, [*r1, *r2, *r3], arts)
    # In creation order.
    assert got == (
        VMRun("DB_X", "running", 99.0, None),
        VMRun("vm-web-01", "running", 10.0, None),
        VMRun("vm-app-01", "pending", None, None),
    )


def test_fan_out_over_deployments_reads_each_vms_capture_in_its_parts_run() -> None:
    """MEMDUMP_ORCHESTRATION__FANOUT=deployments: the run's VMs are dealt into parts, a
    child flow run each; the run's targets name the part's task run for each of its VMs,
    the child's targets the VM's own capture task run there, which streams, writes the
    progress artifact and ends when the VM's chain ends (not when its part does)."""

    def part(state: State[Any], n: int) -> TaskRun:
        return task_run("capture-part", state, n=n)

    def capture(state: State[Any], n: int, child: UUID) -> TaskRun:
        tr = task_run("capture-vm", state, n=n)
        tr.flow_run_id = child
        return tr

    p1, p2 = part(states.Running(), 1), part(states.Running(), 2)
    p3 = part(states.Failed(message="2 of 2 VM(s) did not end: flow run x crashed"), 3)
    p4 = part(states.Pending(), 4)
    c1, c1_again, c2, c3 = uuid4(), uuid4(), uuid4(), uuid4()
    a = capture(states.Running(), 10, c1)  # streaming
    b1 = capture(states.Running(), 11, c1)  # its part's worker died mid-capture...
    b2 = capture(states.Pending(), 20, c1_again)  # ...and the part was started again
    c = capture(states.AwaitingRetry(), 12, c2)  # a retryable error: retried in a moment
    d = capture(states.Completed(), 13, c2)  # done, its part still going
    e = capture(states.Failed(message="capture failed"), 14, c2)
    g = capture(states.Running(), 15, c3)  # its part's flow run crashed twice
    arts = [
        progress(a, "a", 40.0, done=1600),
        progress(b1, "b", 70.0),  # of the attempt that crashed: not the VM's progress now
        progress(c, "c", 5.0),
        progress(e, "e", 30.0),
        progress(g, "g", 60.0),
        targets_artifact(
            FLOW_RUN,
            [
                *[(p1.id, vm, "hv") for vm in ("a", "b")],
                *[(p2.id, vm, "hv") for vm in ("c", "d", "e")],
                *[(p3.id, vm, "hv") for vm in ("g", "h")],
                (p4.id, "i", "hv"),
                (uuid4(), "j", "hv"),  # its part's task run not created yet
            ],
        ),
        targets_artifact(c1, [(a.id, "a", "hv"), (b1.id, "b", "hv")]),
        targets_artifact(c1_again, [(b2.id, "b", "hv")]),
        targets_artifact(c2, [(c.id, "c", "hv"), (d.id, "d", "hv"), (e.id, "e", "hv")]),
        targets_artifact(c3, [(g.id, "g", "hv")]),
    ]
    got = vm_detail(
        ["all"], False, [p1, p2, p3, p4, a, b1, b2, c, d, e, g], arts, run_id=str(FLOW_RUN)
    )
    crashed = "2 of 2 VM(s) did not end: flow run x crashed"
    # In the order of the run's targets.
    assert got == (
        VMRun("a", "running", 40.0, None, 1600, 4000),
        VMRun("b", "pending", None, None),
        VMRun("c", "retrying", 5.0, None),
        VMRun("d", "completed", 100.0, None),
        VMRun("e", "failed", 30.0, "capture failed"),
        VMRun("g", "failed", None, crashed),
        VMRun("h", "failed", None, crashed),
        VMRun("i", "pending", None, None),
        VMRun("j", "pending", None, None),
    )


def test_every_entry_has_a_known_state() -> None:
    factories = [
        states.Scheduled,
        states.Pending,
        states.Running,
        states.Retrying,
        states.AwaitingRetry,
        states.Paused,
        states.Completed,
        states.Failed,
        states.Crashed,
        states.Cancelled,
        states.Cancelling,
    ]
    trs = [task_run("capture-vm", f(), n=i, vm=f"v{i}") for i, f in enumerate(factories)]
    for final in (False, True):
        got = detail([f"v{i}" for i in range(len(trs))], final, trs, [])
        assert len(got) == len(trs)
        assert {v.state for v in got} <= VM_STATES
        if final:
            assert {v.state for v in got} <= {"completed", "failed", "timeout", "error"}


# -- how many Prefect queries ----------------------------------------------------------


class FakePrefect:
    """Stands in for Prefect's sync client: answers as the server filters (the run and
    its child flow runs' task runs, those of given ids or in flight; the progress
    artifacts of given task runs); counts queries."""

    def __init__(self, flow_run: FlowRun, task_runs: list[TaskRun], arts: list[Artifact]):
        self.flow_run, self.task_runs, self.arts = flow_run, task_runs, arts
        self.calls: list[str] = []

    def __enter__(self) -> FakePrefect:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read_flow_runs(self, **kw: Any) -> list[FlowRun]:
        self.calls.append("flow_runs")
        return [self.flow_run]

    def _in_scope(self, flt: Any) -> None:
        assert flt.operator == Operator.or_
        assert flt.id.any_ == flt.parent_flow_run_id.any_ == [self.flow_run.id]

    def read_task_runs(self, **kw: Any) -> list[TaskRun]:
        self.calls.append("task_runs")
        self._in_scope(kw["flow_run_filter"])
        rows = self.task_runs
        which = kw.get("task_run_filter")
        if which is not None:
            assert which.operator == Operator.or_
            ids = set(which.id.any_) if which.id is not None else set()
            kinds = set(which.state.type.any_)
            rows = [t for t in rows if t.id in ids or (t.state and t.state.type) in kinds]
        return rows[kw["offset"] : kw["offset"] + kw["limit"]]

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The plain HTTP client's one request: the newest run (PrefectRuns._newest)."""
        assert request.url.path.endswith("/flow_runs/filter")
        self.calls.append("flow_runs")
        return httpx.Response(200, json=[self.flow_run.model_dump(mode="json")])

    def runs(self, monkeypatch: pytest.MonkeyPatch) -> PrefectRuns:
        """A PrefectRuns on this fake: Prefect's client, and the plain one."""
        import prefect

        monkeypatch.setattr(prefect, "get_client", lambda sync_client: self)
        runs = PrefectRuns("capture-vms", "on-demand")
        http = httpx.Client(
            base_url="http://prefect.test/api/", transport=httpx.MockTransport(self.handle)
        )
        monkeypatch.setattr(runs, "_http", lambda: http)
        return runs

    def request(self, method: str, path: str, json: Any) -> Any:
        self.calls.append("count")
        assert (method, path) == ("POST", "/task_runs/count")
        assert json["flow_runs"]["id"]["any_"] == [str(self.flow_run.id)]
        return SimpleNamespace(json=lambda: len(self.task_runs))

    def read_artifacts(self, **kw: Any) -> list[Artifact]:
        flt = kw["artifact_filter"]
        if flt.key.any_ == [TARGETS_KEY]:  # the flow run's targets
            self.calls.append("targets")
            runs = set(flt.flow_run_id.any_)
            return [named(t for t in self.task_runs if t.flow_run_id in runs)]
        self.calls.append("artifacts")
        assert flt.type.any_ == ["progress"]
        rows = [a for a in self.arts if a.task_run_id in set(flt.task_run_id.any_)]
        return rows[kw["offset"] : kw["offset"] + kw["limit"]]


def _flow_run(state: State[Any], vm_ids: list[str]) -> FlowRun:
    return FlowRun(
        id=FLOW_RUN,
        name="r",
        flow_id=uuid4(),
        parameters={"vm_ids": vm_ids, "source": "api"},
        state=state,
        expected_start_time=T,
        start_time=T,
        end_time=T + timedelta(seconds=3) if state.is_final() else None,
    )


def test_latest_reads_what_is_in_flight_and_nothing_once_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    cap, r = chain(states.Running(), n=1, vm="vm-a")
    done, d = chain(states.Completed(), n=2, vm="vm-b")
    arts = [progress(cap, "vm-a", 50.0), progress(done, "vm-b", 100.0)]
    fake = FakePrefect(_flow_run(states.Running(), ["vm-a", "vm-b"]), [*r, *d], arts)
    runs = fake.runs(monkeypatch)

    got = runs.latest()  # the first read of a run: all of it, and which VM each is for
    assert got is not None and got.vms == (
        VMRun("vm-a", "running", 50.0, None),
        VMRun("vm-b", "completed", 100.0, None),
    )
    assert fake.calls == ["flow_runs", "task_runs", "artifacts", "targets"]

    # Then how many task runs there are, the one in flight (vm-b's has finished: kept)
    # and its artifact; the targets are known.
    fake.calls.clear()
    fake.arts[0] = fake.arts[0].model_copy(update={"data": 75.0})  # updated in place
    got = runs.latest()
    assert got is not None and got.vms[0] == VMRun("vm-a", "running", 75.0, None)
    assert fake.calls == ["flow_runs", "count", "task_runs", "artifacts"]

    # Finished: read once more, then the detail is kept (it cannot change).
    ok = states.Completed()
    fake.flow_run = _flow_run(ok, ["vm-a", "vm-b"])
    fake.task_runs[0] = cap.model_copy(update={"state": ok})  # as the server answers now
    fake.calls.clear()
    for _ in range(3):
        got = runs.latest()
        assert got is not None and got.vms == (
            VMRun("vm-a", "completed", 100.0, None),
            VMRun("vm-b", "completed", 100.0, None),
        )
    assert fake.calls == ["flow_runs", "count", "task_runs", "artifacts", "flow_runs", "flow_runs"]
    assert got.duration == 3.0


def test_latest_before_any_capture_task_skips_the_artifact_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    fake = FakePrefect(_flow_run(states.Scheduled(), ["vm-a", "vm-b"]), [], [])
    got = fake.runs(monkeypatch).latest()
    assert got is not None and [v.vm_id for v in got.vms] == ["vm-a", "vm-b"]
    assert fake.calls == ["flow_runs", "task_runs"]


def test_many_task_runs_are_paged(monkeypatch: pytest.MonkeyPatch) -> None:

    trs = [task_run("capture-vm", states.Pending(), n=i, vm=f"vm-{i}") for i in range(250)]
    fake = FakePrefect(_flow_run(states.Running(), ["all"]), trs, [])
    got = fake.runs(monkeypatch).latest()
    assert got is not None and len(got.vms) == 250
    assert fake.calls == ["flow_runs", "task_runs", "task_runs", "artifacts", "targets"]


def test_error_text_is_without_prefect_boilerplate() -> None:
    cap, r = chain(
        states.Failed(message="Task run encountered an exception SSHError: host key mismatch"),
        n=1,
        vm="vm-a",
    )
    (vm,) = detail(["vm-a"], True, r, [])
    assert vm.error == "host key mismatch" and not re.search("encountered", vm.error)


def test_a_vm_whose_task_run_does_not_exist_yet_is_listed() -> None:
    # Mapped task runs are created one by one: a poll can see the first before the second.
    cap, runs = chain(states.Running(), n=1, vm="vm-web-01")
    got = detail(["vm-web-01", "vm-db-01"], False, runs, [])
    assert got == (
        VMRun("vm-web-01", "pending", None, None),
        VMRun("vm-db-01", "pending", None, None),
    )
    assert detail(["vm-web-01", "vm-db-01"], True, runs, [])[1] == VMRun(
        "vm-db-01", "error", None, None
    )


def test_a_queued_capture_of_the_targets_is_pending_before_its_task_run_exists() -> None:
    # The flow queues its captures for a bounded pool of threads (flows.capture): its
    # targets name every VM at once, a task run is created when a thread takes it.
    cap, runs = chain(states.Running(), n=1, vm="vm-a")
    # Two hypervisors may have the same VM id (Proxmox's "101"): two targets, two entries.
    queued = [(uuid4(), "vm-b", "hv-2"), (uuid4(), "vm-c", "hv-1"), (uuid4(), "vm-a", "hv-2")]
    targets = targets_artifact(FLOW_RUN, [(cap.id, "vm-a", "hv-1"), *queued])
    arts = [progress(cap, "vm-a", 20.0), targets]
    assert vm_detail(["all"], False, runs, arts, run_id=str(FLOW_RUN)) == (
        VMRun("vm-a", "running", 20.0, None),
        VMRun("vm-b", "pending", None, None),
        VMRun("vm-c", "pending", None, None),
        VMRun("vm-a", "pending", None, None),
    )
    assert [v.state for v in vm_detail(["all"], True, runs, arts)] == ["error"] * 4
    # Another flow run's targets (a child's, with the fan-out) are its own to show.
    other = targets_artifact(uuid4(), queued)
    assert vm_detail(["all"], False, runs, [arts[0], named(runs), other], run_id=str(FLOW_RUN)) == (
        VMRun("vm-a", "running", 20.0, None),
    )


def test_a_capture_is_named_by_its_flow_runs_targets_once_they_are_published() -> None:
    # The flow publishes which VM each capture is for once it has submitted them all: a
    # read in between sees captures it cannot name yet. They are left out (a VM asked for
    # shows as pending) until named; a run that ended before naming them shows them
    # without a VM id rather than not at all.
    cap, runs = chain(states.Running(), n=1, vm="vm-a")
    arts = [progress(cap, "vm-a", 20.0)]
    assert vm_detail(["vm-a"], False, runs, arts) == (VMRun("vm-a", "pending", None, None),)
    assert vm_detail(["all"], False, runs, arts) == ()
    assert detail(["vm-a"], False, runs, arts) == (VMRun("vm-a", "running", 20.0, None),)
    assert vm_detail(["all"], True, runs, arts) == (
        VMRun(None, "error", 20.0, "did not finish: the run ended first"),
    )


def test_targets_come_back_as_written_and_a_bad_row_is_left_out() -> None:
    from memdump.runinfo import Target, targets_from_data, targets_to_data

    targets = [Target("t1", "vm-a", "hv-1"), Target("t2", "101", None)]
    assert targets_from_data(targets_to_data(targets)) == targets
    rows = '[{"task_run_id": "t1", "vm_id": "vm-a"}, {"task_run_id": 3, "vm_id": "x"}, [1], 7]'
    assert targets_from_data(rows) == [Target("t1", "vm-a", None)]
    assert targets_from_data("not json") == targets_from_data(None) == []
