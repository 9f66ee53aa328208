"""Production mode on this machine: several collectors sharing one Prefect server.

Started here, stopped here (each by its own PID): Debian's PostgreSQL in a private data
dir, a Prefect server on it, the process work pool "memdump" with the deployments of
prefect.yaml (`prefect --no-prompt deploy --all`), two workers as separate processes
(`python -m deployments.worker`, flow runs at most 2 each), the API as a process of its
own, and a second lab sshd. Two hypervisors: the lab's libvirt (vm-web-01, vm-db-01,
through the lab sshd) and plain QEMU (two 1 GiB VMs, through the second sshd), at most
1 capture per hypervisor and 3 in all. MEMDUMP_ORCHESTRATION__FANOUT=deployments: a trigger's flow
run deals its four VMs into three parts (the global cap) and starts a flow run per part,
which any worker takes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.collectors import pg_bin
from tests.helpers.collectors import postgres as private_postgres
from tests.helpers.lab import remote_temp_dirs
from tests.helpers.procs import forkserver_below, freeze, parent, signal_all
from tests.helpers.qmp_lab import qmp
from tests.helpers.services import stop, wait_http
from tests.helpers.stack import REPO, free_port, lab_inventory

pytestmark = pytest.mark.lab

QEMU_VMS = ("vm-qcol-01", "vm-qcol-02")
LIBVIRT_VMS = ("vm-web-01", "vm-db-01")
PART_FLOW = "capture-part"
HEARTBEAT_SEC = 30  # of the workers' flow runs (Prefect's minimum); 3 missing: Crashed
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


def _vms_of(fr: dict[str, Any]) -> list[str]:
    """The VMs of a part's flow run, from its parameters."""
    return [str(t[0]) for t in fr["parameters"].get("targets", [])]


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # Not under pytest's 0700 tmp: the postgres user must reach its data dir.
    d = Path(tempfile.mkdtemp(prefix="memdump-collectors-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    if not os.environ.get("MEMDUMP_KEEP_TEST_DIR"):  # kept: its logs, for a post-mortem
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres(base: Path) -> Iterator[str]:
    """A private PostgreSQL cluster on a free loopback port; the Prefect database URL."""
    try:
        pg_bin()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with private_postgres(base) as (url, _):
        yield url


@dataclass
class Collectors:
    api: str
    prefect_api: str
    env: dict[str, str]
    workers: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        r = httpx.request(method, self.api + path, json=body, timeout=30)
        return r.status_code, r.json()

    def wait_done(self, timeout: float, since: datetime) -> dict[str, Any]:
        """/status once the run triggered at ``since`` is final; failing after ``timeout``
        seconds with its flow runs (post_mortem)."""
        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            _, body = self.call("GET", "/api/memory-dumps/status")
            if body["status"] not in ("in_progress", "idle"):
                return dict(body)
            time.sleep(0.5)
        raise AssertionError(f"not final after {timeout} s:\n" + self.post_mortem(body, since))

    def state_type(self, flow_run_id: str) -> str:
        r = httpx.get(f"{self.prefect_api}/flow_runs/{flow_run_id}", timeout=30)
        r.raise_for_status()
        return str(r.json()["state_type"])

    def heartbeats(self, flow_run_id: str, since: datetime) -> int:
        """How many heartbeats of the flow run the server has (as stored events)."""
        r = httpx.post(
            f"{self.prefect_api}/events/filter",
            json={
                "filter": {
                    "occurred": {"since": since.isoformat()},
                    "event": {"name": ["prefect.flow-run.heartbeat"]},
                    "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                },
                "limit": 10,
            },
            timeout=30,
        )
        r.raise_for_status()
        return len(r.json()["events"])

    def flow_runs(self, flow: str, since: datetime) -> list[dict[str, Any]]:
        r = httpx.post(
            f"{self.prefect_api}/flow_runs/filter",
            json={"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC"},
            timeout=30,
        )
        r.raise_for_status()
        return [fr for fr in r.json() if datetime.fromisoformat(fr["created"]) >= since]

    def post_mortem(self, status: dict[str, Any], since: datetime) -> str:
        """What a failed assertion shows: the whole /status answer and every flow run of
        the trigger with its state, message and worker (pytest would cut the dict short)."""
        lines = [json.dumps(status, indent=1)]
        for flow in ("capture-vms", PART_FLOW):
            for fr in self.flow_runs(flow, since):
                st = fr.get("state") or {}
                lines.append(
                    f"{flow} {fr['name']} {_vms_of(fr)} "
                    f"{st.get('type')}/{st.get('name')} on {self.worker_of(fr)}: "
                    f"{st.get('message')}"
                )
        return "\n".join(lines)

    def worker_of(self, fr: dict[str, Any]) -> str | None:
        """The worker that runs flow run ``fr`` (as the API lists it). Both workers may
        try to submit one; the server lets one through and tells the other to abort
        ("Aborted submission of flow run '<id>'"), so the attempt alone does not say which
        (taking it for the runner once made the test kill the trigger's own worker). The
        one that runs it logs "Flow run '<name>' submitted to infrastructure"."""
        for name, log in self.logs.items():
            text = log.read_text(errors="replace")
            if (
                f"submitting flow run '{fr['id']}'" in text
                and f"Flow run '{fr['name']}' submitted to infrastructure" in text
                and f"Aborted submission of flow run '{fr['id']}'" not in text
            ):
                return name
        return None


def _second_sshd(base: Path, lab_dir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """The lab's sshd again (same host key and authorized key) on another port."""
    port = free_port()
    conf = (lab_dir / "ssh" / "sshd_config").read_text()
    lines = []
    for line in conf.splitlines():
        key = line.split(" ", 1)[0]
        if key == "Port":
            line = f"Port {port}"
        elif key == "PidFile":
            line = f"PidFile {base / 'sshd2.pid'}"
        lines.append(line)
    (base / "sshd2_config").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-f", str(base / "sshd2_config"), "-E", str(base / "sshd2.log")],
        start_new_session=True,
    )
    key = (lab_dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known = base / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {' '.join(key)}\n")
    deadline = time.monotonic() + 30
    while True:
        try:
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "second sshd not up"
            time.sleep(0.1)
    return proc, port, known


@pytest.fixture(scope="module")
def qemu_vms(base: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The two QEMU VMs' `lab/up`, started before PostgreSQL and the Prefect server and
    running beside them (collectors waits for it before it starts the workers); the VMs
    it started are removed at the end."""
    run = Path(lab_inventory()).parent / "run" / "qemu"
    started = [vm for vm in QEMU_VMS if not (run / f"{vm}.pid").is_file()]
    argv = [str(REPO / "lab/up")] + [a for vm in QEMU_VMS for a in ("--qemu", f"{vm}:1024")]
    with open(base / "lab-up.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)
        for vm in started:
            subprocess.run(
                [str(REPO / "lab/down"), "--vm", vm], check=False, capture_output=True, timeout=120
            )


@pytest.fixture(scope="module")
def collectors(
    base: Path, qemu_vms: subprocess.Popen[bytes], postgres: str
) -> Iterator[Collectors]:
    lab_env_inventory = Path(lab_inventory())
    lab_dir = lab_env_inventory.parent
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sshd2, port2, known2 = _second_sshd(base, lab_dir)
        procs.append(sshd2)
        inventory = base / "inventory.yaml"
        inventory.write_text(
            lab_env_inventory.read_text()
            + f"""  - name: lab-qemu
    driver: qemu
    transport: ssh
    host: 127.0.0.1
    port: {port2}
    user: root
    key_file: {lab_dir / "ssh" / "id_ed25519"}
    known_hosts: {known2}
    qmp_dir: {lab_dir / "run" / "qemu"}
"""
        )
        prefect_port, api_port = free_port(), free_port()
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEMDUMP_"))}
        env.update(
            PREFECT_HOME=str(base / "prefect-home"),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=postgres,
            # Slots of a killed capture come back as soon as their lease runs out.
            PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="2",
            # Heartbeats readable from /events/filter within a second (the kill waits
            # for them); the automation sees events as they come, whatever this is.
            PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="0.5",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        log = base / "prefect-server.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "prefect"), "server", "start",
                 "--host", "127.0.0.1", "--port", str(prefect_port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        procs.append(server)
        wait_http(f"{prefect_api}/health", server, log)
        env = {k: v for k, v in env.items() if not k.startswith("PREFECT_SERVER_")}
        env.update(
            PREFECT_API_URL=prefect_api,
            MEMDUMP_HOME=str(REPO),
            MEMDUMP_DATA_DIR=str(base / "data"),
            MEMDUMP_DUMP_DIR=str(base / "data" / "dumps"),
            MEMDUMP_INVENTORY_FILE=str(inventory),
            MEMDUMP_ORCHESTRATION__FANOUT="deployments",
            MEMDUMP_ORCHESTRATION__HEARTBEAT_SEC=str(HEARTBEAT_SEC),
            MEMDUMP_ORCHESTRATION__MAX_CAPTURES_PER_HYPERVISOR="1",
            MEMDUMP_ORCHESTRATION__MAX_CONCURRENT_CAPTURES="3",
            MEMDUMP_ANALYSIS__ENABLED="false",
            MEMDUMP_API__TRIGGER_MIN_INTERVAL_SEC="0",
            MEMDUMP_API__PORT=str(api_port),
        )
        prefect = str(Path(sys.executable).parent / "prefect")
        _run([prefect, "work-pool", "create", "memdump", "--type", "process"], env=env, cwd=REPO)
        _run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO)
        # The VMs are up before a worker starts (its start-up cleans every hypervisor).
        rc = qemu_vms.wait(300)
        assert rc == 0, (base / "lab-up.log").read_text(errors="replace")[-3000:]
        workers, logs = {}, {}
        for name in ("collector-a", "collector-b"):
            logs[name] = base / f"{name}.log"
            with open(logs[name], "wb") as out:
                workers[name] = subprocess.Popen(
                    [sys.executable, "-m", "deployments.worker", "--pool", "memdump",
                     "--name", name, "--limit", "2"],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            procs.append(workers[name])
        log = base / "api.log"
        with open(log, "wb") as out:
            api = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api.main:app",
                 "--host", "127.0.0.1", "--port", str(api_port)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        procs.append(api)
        wait_http(f"http://127.0.0.1:{api_port}/health", api, log)
        # Both workers are polling the pool before the first trigger.
        deadline = time.monotonic() + 120
        while True:
            r = httpx.post(f"{prefect_api}/work_pools/memdump/workers/filter", json={}, timeout=10)
            if {w["name"] for w in r.json()} >= set(workers):
                break
            assert time.monotonic() < deadline, f"workers not polling: {r.text}"
            time.sleep(0.5)
        yield Collectors(f"http://127.0.0.1:{api_port}", prefect_api, env, workers, logs, procs)
    finally:
        for proc in reversed(procs):
            stop(proc)


def _intervals(records: list[dict[str, Any]]) -> list[tuple[datetime, datetime, str]]:
    out = []
    for r in records:
        start = datetime.fromisoformat(r["timestamp"])
        out.append((start, start + timedelta(seconds=r["duration_sec"]), r["hypervisor"]))
    return out


def _max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def _records_since(c: Collectors, since: datetime) -> list[dict[str, Any]]:
    code, body = c.call("GET", "/api/memory-dumps/records?limit=1000")
    assert code == 200
    return [r for r in body["records"] if datetime.fromisoformat(r["timestamp"]) >= since]


def test_all_across_two_hypervisors_holds_the_caps_on_both_workers(c: Collectors) -> None:
    t0 = datetime.now(UTC)
    code, _ = c.call("POST", "/api/memory-dumps/trigger", {"vm_ids": ["all"]})
    assert code == 200
    st = c.wait_done(timeout=300, since=t0)
    assert st["status"] == "completed", c.post_mortem(st, t0)
    recs = _records_since(c, t0.replace(tzinfo=None))
    assert sorted(r["vmid"] for r in recs) == sorted(LIBVIRT_VMS + QEMU_VMS)
    assert {r["hypervisor"] for r in recs} == {"lab", "lab-qemu"}
    spans = _intervals(recs)
    for hv in ("lab", "lab-qemu"):
        assert _max_overlap([(s, e) for s, e, h in spans if h == hv]) == 1, spans
    assert _max_overlap([(s, e) for s, e, _ in spans]) <= 3
    # A flow run per part (as many as the global cap), not per VM; each VM in one part;
    # both workers took some.
    children = c.flow_runs(PART_FLOW, t0)
    assert len(children) == 3 and all(fr["state_type"] == "COMPLETED" for fr in children)
    assert sorted(vm for fr in children for vm in _vms_of(fr)) == sorted(LIBVIRT_VMS + QEMU_VMS)
    assert {c.worker_of(fr) for fr in children} == set(c.workers)


@pytest.fixture
def c(collectors: Collectors) -> Collectors:
    return collectors


def _claimed(c: Collectors, worker: str) -> list[str]:
    """The flow runs ``worker`` took on: each it started to submit ("submitting", logged
    before it asks the server for Pending) and did not give up ("Aborted submission")."""
    text = c.logs[worker].read_text(errors="replace")
    ids = re.findall(rf"Worker '{worker}' submitting flow run '([0-9a-f-]{{36}})'", text)
    return [i for i in dict.fromkeys(ids) if f"Aborted submission of flow run '{i}'" not in text]


def _unsafe_to_kill(c: Collectors, worker: str, victim_run: str, since: datetime) -> str | None:
    """Why killing ``worker`` now would leave a flow run that nothing marks, None if no
    reason. Asked while the worker is frozen (SIGSTOP), so what it took on stays put.

    The crash automation (tasks/automations.py) marks a flow run whose heartbeats
    stopped: one whose first heartbeat never reached the server (still Pending, or
    Running for a moment before its first heartbeat) would stay as it is for ever, and the
    trigger's flow run waiting for it too (seen in CI: the test's wait outlasted its
    600 s timeout)."""
    for run_id in _claimed(c, worker):
        fr = httpx.get(f"{c.prefect_api}/flow_runs/{run_id}", timeout=30).json()
        st = fr["state_type"]
        if st in FINAL:
            continue
        if st != "RUNNING":
            return f"flow run {fr['name']} is {st}"
        if not c.heartbeats(run_id, since):
            return f"flow run {fr['name']} has no heartbeat on the server yet"
    if victim_run not in _claimed(c, worker):
        return "the victim is not among the worker's flow runs"
    fr = httpx.get(f"{c.prefect_api}/flow_runs/{victim_run}", timeout=30).json()
    recorded = {r["vmid"] for r in _records_since(c, since.replace(tzinfo=None))}
    if not [vm for vm in _vms_of(fr) if vm in QEMU_VMS and vm not in recorded]:
        return "its 1 GiB VMs already have their records"  # a kill now would cut no capture
    return None


def test_a_worker_killed_mid_run_is_marked_and_the_rest_completes(c: Collectors) -> None:
    t0 = datetime.now(UTC)
    code, _ = c.call("POST", "/api/memory-dumps/trigger", {"vm_ids": ["all"]})
    assert code == 200
    # A part's flow run with a 1 GiB VM, running on the worker that does not run the
    # trigger's, killed at a moment every flow run of that worker has a heartbeat on the
    # server: what the crash automation needs to mark them (see _unsafe_to_kill).
    victim = victim_run = ""
    why = "no part with a 1 GiB VM running on the second worker"
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"no moment to kill a worker in 120 s: {why}"
        parents = c.flow_runs("capture-vms", t0)
        parent_worker = c.worker_of(parents[-1]) if parents else None
        for fr in c.flow_runs(PART_FLOW, t0):
            w = c.worker_of(fr)
            # A 1 GiB VM: its capture lasts seconds, so it can die before its record.
            big = any(vm in QEMU_VMS for vm in _vms_of(fr))
            if fr["state_type"] == "RUNNING" and big and parent_worker and w and w != parent_worker:
                victim, victim_run = w, fr["id"]
                break
        else:
            time.sleep(0.3)
            continue
        # The whole collector stops at once, as a machine lost: no more flow runs taken,
        # no request sent, while it is judged.
        frozen = freeze(c.workers[victim].pid)
        why = _unsafe_to_kill(c, victim, victim_run, t0) or ""
        if not why:
            lost = [i for i in _claimed(c, victim) if c.state_type(i) not in FINAL]
            victim_vms = _vms_of(httpx.get(f"{c.prefect_api}/flow_runs/{victim_run}").json())
            ended = {r["vmid"] for r in _records_since(c, t0.replace(tzinfo=None))}
            cut = [vm for vm in victim_vms if vm in QEMU_VMS and vm not in ended]
            # Its flow runs are forks of its warm forkserver (deployments.warm_worker).
            forkserver = forkserver_below(c.workers[victim].pid)
            forked = [p for p in frozen if parent(p) == forkserver]
            killed_at = datetime.now(UTC)
            signal_all(frozen, signal.SIGKILL)
            break
        signal_all(frozen, signal.SIGCONT)
        print(f"not killing {victim} yet: {why}")  # in pytest's report of a failure
        time.sleep(0.3)
    # The wrapper, the worker, its forkserver, a flow-run process at least.
    assert len(frozen) >= 4 and forked, frozen
    c.workers[victim].wait()
    killed = time.monotonic()

    # Each lost flow run: Crashed 3 heartbeats after its last one (before the kill), the
    # server evaluating the automation every few seconds; a minute more for a busy machine.
    bound = 3 * HEARTBEAT_SEC + 60
    while any(c.state_type(i) not in FINAL for i in lost):
        assert time.monotonic() - killed < bound, (
            f"the killed worker's flow runs are not all marked {bound} s after the kill:\n"
            + c.post_mortem(c.call("GET", "/api/memory-dumps/status")[1], t0)
        )
        time.sleep(1)
    assert victim_run in lost
    for run_id in lost:
        r = httpx.get(f"{c.prefect_api}/flow_runs/{run_id}", timeout=30).json()
        assert r["state_type"] == "CRASHED", r["state"]
        assert "heartbeat" in (r["state"]["message"] or "")

    # The rest: the lost part started again for its VMs with no outcome yet (its 1 GiB
    # VM among them), on the worker left, beside whatever had not started yet.
    st = c.wait_done(timeout=240, since=t0)
    # the lost VM was captured again elsewhere
    assert st["status"] == "completed", c.post_mortem(st, t0)
    recs = _records_since(c, t0.replace(tzinfo=None))
    vmids = [rec["vmid"] for rec in recs]
    assert sorted(set(vmids)) == sorted(LIBVIRT_VMS + QEMU_VMS)  # none lost
    assert len(vmids) == 4  # none twice: the killed capture left no record, and the
    # part's VMs that had ended before the kill were not captured again
    # Every part's flow run was created at the trigger: one created after the kill is the
    # lost part started again, for its VMs without an end only.
    again = [_vms_of(fr) for fr in c.flow_runs(PART_FLOW, killed_at)]
    assert len(again) == len(lost), again
    assert [vms for vms in again if set(cut) <= set(vms) <= set(victim_vms) - ended], (
        again, victim_vms, cut, ended
    )  # fmt: skip
    for rec in recs:
        assert Path(rec["dump_path"]).is_file()
    spans = _intervals(recs)
    for hv in ("lab", "lab-qemu"):
        assert _max_overlap([(s, e) for s, e, h in spans if h == hv]) == 1, spans
    # The hypervisors are clean: no dump script's temp dir left, every guest runs.
    deadline = time.monotonic() + 60
    while remote_temp_dirs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert remote_temp_dirs() == []
    lab_dir = Path(lab_inventory()).parent
    for vm in QEMU_VMS:
        sock = lab_dir / "run" / "qemu" / f"{vm}.qmp"
        assert qmp(sock, "query-status")["return"]["status"] == "running"
