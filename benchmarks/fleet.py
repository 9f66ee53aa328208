"""One "all" trigger over a fleet of N small lab guests through the real stack (issue 17).

    . .lab/env && .venv/bin/python benchmarks/fleet.py [--sizes 25,50,100] [--collectors]
        [--mib 16] [--hypervisors 4] [--max-concurrent 3] [--per-hypervisor 2]
        [--idle-triggers 3] [--rate 5] [--json FILE] [--keep]

For each N of ``--sizes``: ``lab/up --many N:MIB:H`` (tests/helpers/fleet.py; guests
vm-many-001..N as H qemu hypervisors, <lab>/inventory-many.yaml, whose "all" is exactly
the fleet), then ``memdump serve`` on that inventory (tests/helpers/stack.py; with
``--collectors``, the largest N instead runs on the production set-up of
tests/e2e/test_collectors.py: PostgreSQL, a Prefect server on it, two workers and the API,
MEMDUMP_ORCHESTRATION__FANOUT=deployments, tests/helpers/collectors.py). On it:

  idle      ``--idle-triggers`` triggers of an id no hypervisor has (the run fails fast,
            nothing captured), each after the last one ended: POST /trigger latency
            with the stack idle; then POST one ``"all"`` trigger (timed too).
  during    a sampler thread, ``--rate`` requests/s in all, alternating GET /status and
            GET /records?limit=1000 (p50/p99), and every 5 s a trigger of the absent id:
            the API refuses a trigger while a run is in progress (429, README "Access
            and limits"), so it is the refusal's latency; one accepted would start a
            second run, and is reported. Another thread samples the RSS of the stack's
            processes by PID from /proc every 0.5 s, each with all its descendants (the
            runner's or a worker's flow-run processes): the peak per part and in all, and the CPU
            seconds each part used from the trigger to the run's end (the rest of the
            machine's busy time is the lab: its QEMUs, sshd, the hypervisor scripts).
  after     wall time (the trigger sent -> the run's end_time in Prefect), the sum of
            the records' duration_sec, orchestration overhead per VM = (wall x c - sum)
            / N with c the effective concurrency: the global cap (min(global cap,
            per-hypervisor cap x H, N); the captures cannot run more at once), task
            runs, artifacts and log lines per VM (Prefect API: the trigger's flow run
            and its child flow runs), and correctness: every VM recorded exactly once,
            both caps held throughout (from the records' start and end times,
            tests/helpers/fleet.py, the check tests/e2e/test_fleet.py makes), /status
            showing N VMs completed. Where the wall went, from the records: trigger ->
            first capture, first capture -> last capture end (of it, time with no
            capture running, and how many ran on average), last capture end -> run
            end; each capture's interval is in the JSON.

Prints a table (a column per N, and how each measure grows: the exponent k of
measure ~ N^k between the smallest and largest N: constant k < 0.3, linear 0.3..1.3,
worse above) and the numbers as JSON (``--json FILE``, else after the table). Every wait
is bounded; everything started is stopped by PID; the lab's fleet is left as it was
found (brought back to its N:MIB:H, or stopped if there was none) unless ``--keep``.
The Volatility check is off, as in benchmarks/scale.py (``--analysis`` turns it on).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.api import pct  # noqa: E402
from tests.helpers import fleet  # noqa: E402
from tests.helpers.procs import parent, pids  # noqa: E402
from tests.helpers.stack import running_stack  # noqa: E402

BASE = "/api/memory-dumps"
ABSENT = "fleet-absent-01"  # no hypervisor has it: its run fails fast, captures nothing
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PROBE_EVERY = 5.0  # s between refused-trigger probes during the run


@dataclass
class Target:
    """A running stack as the benchmark sees it."""

    api: str
    prefect_api: str
    prefect_headers: dict[str, str]
    procs: dict[str, int]  # part -> the pid of its root process
    mode: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api + BASE, timeout=60)

    def prefect(self) -> httpx.Client:
        return httpx.Client(base_url=self.prefect_api, headers=self.prefect_headers, timeout=60)


def basic(auth: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


@contextmanager
def serve_target(data: Path, inventory: Path, settings: dict[str, str]) -> Iterator[Target]:
    """``memdump serve`` (tests/helpers/stack.py); its parts' pids from its log."""
    with running_stack(data, str(inventory), **settings) as st:
        text = (data / "serve.log").read_text(errors="replace")
        # Its children (Prefect server, runner, API), each with its own descendants.
        procs = {m[1]: int(m[2]) for m in re.finditer(r"started (.+?) \(pid (\d+)\)", text)}
        yield Target(st.api, st.prefect_api, basic(st.prefect_auth), procs, "memdump serve")


@contextmanager
def collectors_target(data: Path, inventory: Path, settings: dict[str, str]) -> Iterator[Target]:
    """PostgreSQL + Prefect server + two workers + API (tests/helpers/collectors.py)."""
    from tests.helpers.collectors import collector_stack, postgres

    data.chmod(0o755)  # the postgres user reaches its data dir under it
    with postgres(data) as (url, pg_pid), collector_stack(data, url, inventory, settings) as cs:
        procs = {name: p.pid for name, p in cs.procs.items()}
        procs["postgresql"] = pg_pid
        yield Target(cs.api, cs.prefect_api, {}, procs, "PostgreSQL + 2 workers")


# --- samplers --------------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a kernel thread / zombie without memory


def cpu_sec(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (user + system)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Peak RSS (MiB) of each part (its root pid and all descendants) and of their sum,
    and the CPU seconds each part's tree used between the first and the last sample
    (a child that ended counts in its parent's waited-for time)."""

    def __init__(self, procs: dict[str, int], every: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.procs, self.every = procs, every
        self.stop = threading.Event()
        self.peak: dict[str, float] = {}
        self.peak_procs: dict[str, int] = {}
        self.cpu_first: dict[str, float] = {}
        self.cpu_last: dict[str, float] = {}

    def sample(self) -> None:
        kids: dict[int, list[int]] = {}
        for p in pids():
            up = parent(p)
            if up is not None:
                kids.setdefault(up, []).append(p)
        total = 0.0
        for name, root in self.procs.items():
            tree, todo = [root], [root]
            while todo:
                for k in kids.get(todo.pop(), []):
                    tree.append(k)
                    todo.append(k)
            mib = sum(vm_rss_kib(p) for p in tree) / 1024
            self.cpu_last[name] = sum(cpu_sec(p) for p in tree)
            self.cpu_first.setdefault(name, self.cpu_last[name])
            self.peak[name] = max(self.peak.get(name, 0.0), mib)
            self.peak_procs[name] = max(self.peak_procs.get(name, 0), len(tree))
            total += mib
        self.peak["total"] = max(self.peak.get("total", 0.0), total)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()


class HttpSampler(threading.Thread):
    """GET /status and /records?limit=1000 in turn at ``rate`` requests/s, and a trigger
    of the absent id every PROBE_EVERY s, until stopped."""

    def __init__(self, target: Target, rate: float) -> None:
        super().__init__(name="http-sampler", daemon=True)
        self.target, self.rate = target, rate
        self.stop = threading.Event()
        self.lat: dict[str, list[float]] = {}
        self.ended: dict[str, list[float]] = {}  # monotonic: when each of ``lat`` ended
        self.codes: dict[str, dict[int, int]] = {}
        self.errors: list[str] = []
        self.status_final_at: float | None = None  # monotonic: /status first showed the end
        self.final_status: dict[str, Any] | None = None  # that answer
        self.accepted: list[datetime] = []  # when a probe that got a 200 was sent

    def timed(self, c: httpx.Client, name: str, method: str, path: str, body: Any = None) -> Any:
        t0 = time.perf_counter()
        try:
            r = c.request(method, path, json=body)
            r.read()
        except httpx.HTTPError as exc:
            self.errors.append(f"{name}: {exc!r}")
            return None
        self.lat.setdefault(name, []).append(time.perf_counter() - t0)
        self.ended.setdefault(name, []).append(time.monotonic())
        by = self.codes.setdefault(name, {})
        by[r.status_code] = by.get(r.status_code, 0) + 1
        return r

    def run(self) -> None:
        gap = 1 / self.rate
        i, next_probe = 0, time.monotonic() + PROBE_EVERY / 2
        with self.target.client() as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                # No probe once /status showed the end: it would start a run.
                if t0 >= next_probe and self.status_final_at is None:
                    sent = datetime.now(UTC)
                    r = self.timed(c, "POST /trigger (run in progress)", "POST", "/trigger",
                                   {"vm_ids": [ABSENT]})  # fmt: skip
                    if r is not None and r.status_code == 200:
                        self.accepted.append(sent)
                    next_probe = t0 + PROBE_EVERY
                elif i % 2 == 0:
                    r = self.timed(c, "GET /status", "GET", "/status")
                    if r is not None and r.status_code == 200 and self.status_final_at is None:
                        body = r.json()
                        if body["status"] not in ("in_progress", "idle"):
                            self.status_final_at = time.monotonic()
                            self.final_status = body
                    i += 1
                else:
                    self.timed(c, "GET /records?limit=1000", "GET", "/records?limit=1000")
                    i += 1
                self.stop.wait(max(0.0, gap - (time.monotonic() - t0)))


# --- one size --------------------------------------------------------------------------


def wait_status_final(c: httpx.Client, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = c.get("/status").json()
        if body["status"] not in ("in_progress", "idle"):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"/status still {body['status']} after {timeout:.0f} s")
        time.sleep(0.2)


def trigger(c: httpx.Client, vm_ids: list[str]) -> float:
    t0 = time.perf_counter()
    r = c.post("/trigger", json={"vm_ids": vm_ids})
    took = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"trigger {vm_ids}: {r.status_code} {r.text}")
    return took


def the_run(pf: httpx.Client, since: datetime, timeout: float = 60) -> dict[str, Any]:
    """The "all" trigger's flow run: created at or after ``since`` by the API (not one
    the weekly schedule made meanwhile for a later date)."""
    deadline = time.monotonic() + timeout
    while True:
        due = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        r = pf.post(
            "/flow_runs/filter",
            json={
                "flows": {"name": {"any_": ["capture-vms"]}},
                "flow_runs": {"expected_start_time": {"before_": due}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 20,
            },
        )
        r.raise_for_status()
        for fr in r.json():
            if (
                fr["parameters"].get("vm_ids") == ["all"]
                and fr["parameters"].get("source") == "api"
                and datetime.fromisoformat(fr["created"]) >= since
            ):
                return dict(fr)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no flow run of the trigger after {timeout} s")
        time.sleep(0.2)


def wait_run(pf: httpx.Client, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        fr: dict[str, Any] = pf.get(f"/flow_runs/{run_id}").json()
        if fr["state_type"] in FINAL:
            return fr
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run_id} still {fr['state_type']} after {timeout:.0f} s")
        time.sleep(1)


def prefect_counts(pf: httpx.Client, run_id: str) -> dict[str, Any]:
    """Flow runs, task runs (by step tag), artifacts and log lines of the trigger's flow
    run and its child flow runs (the deployments fan-out)."""
    children = pf.post(
        "/flow_runs/filter",
        json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "limit": 200},
    ).json()
    ids = [run_id, *(fr["id"] for fr in children)]
    if len(children) == 200:  # more than a page: count them all
        ids = [run_id]
        offset = 0
        while page := pf.post(
            "/flow_runs/filter",
            json={
                "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}},
                "limit": 200,
                "offset": offset,
            },
        ).json():
            ids += [fr["id"] for fr in page]
            offset += len(page)
    by_step: dict[str, int] = {}
    offset = 0
    while page := pf.post(
        "/task_runs/filter",
        json={"flow_runs": {"id": {"any_": ids}}, "limit": 200, "offset": offset},
    ).json():
        for tr in page:
            step = next((t for t in tr["tags"] if t.startswith("step:")), tr["name"].split("-")[0])
            by_step[step] = by_step.get(step, 0) + 1
        offset += len(page)
    artifacts = pf.post("/artifacts/count", json={"artifacts": {"flow_run_id": {"any_": ids}}})
    logs = offset = 0
    while page := pf.post(
        "/logs/filter",
        json={"logs": {"flow_run_id": {"any_": ids}}, "limit": 200, "offset": offset},
    ).json():
        logs += len(page)
        offset += len(page)
    return {
        "flow_runs": len(ids),
        "task_runs": sum(by_step.values()),
        "task_runs_by_step": by_step,
        "artifacts": int(artifacts.json()),
        "logs": logs,
    }


def phases(spans: list[fleet.Span], t0: datetime, end: datetime) -> dict[str, Any]:
    """Where the wall time went, from the captures' intervals (naive UTC, as records
    give them): before the first capture (the flow run's start, the listing), between
    the first start and the last end (and of it, time with no capture running; the mean
    number running), after the last end (the summary, the run's end)."""
    if not spans:
        return {}
    first, last = min(s.start for s in spans), max(s.end for s in spans)
    body = (last - first).total_seconds()
    idle, reach = 0.0, first
    for s in sorted(spans, key=lambda s: s.start):
        if s.start > reach:
            idle += (s.start - reach).total_seconds()
        reach = max(reach, s.end)
    busy = sum((s.end - s.start).total_seconds() for s in spans)
    return {
        "head_s": round((first - t0).total_seconds(), 2),
        "body_s": round(body, 2),
        "body_idle_s": round(idle, 2),
        "mean_running": round(busy / body, 2) if body > 0 else None,
        "tail_s": round((end - last).total_seconds(), 2),
    }


def ms(values: list[float], q: float) -> float | None:
    return round(pct(values, q) * 1000, 1) if values else None


def host_busy_sec() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (/proc/stat): the lab's
    hypervisors, sshd, QEMU, the stack and the sampler share this machine's cores."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def measure(
    target: Target, n: int, args: argparse.Namespace, caps: tuple[int, int]
) -> dict[str, Any]:
    global_cap, hv_cap = caps
    timeout = max(300.0, 20.0 * n)
    out: dict[str, Any] = {"n": n, "mode": target.mode, "caps": list(caps)}
    with target.client() as c, target.prefect() as pf:
        idle = []
        for _ in range(args.idle_triggers):
            idle.append(trigger(c, [ABSENT]))
            wait_status_final(c, 120)
        rss = RssSampler(target.procs)
        rss.sample()
        rss.start()
        http = HttpSampler(target, args.rate)
        since = datetime.now(UTC)
        t0 = time.monotonic()
        busy0 = host_busy_sec()
        all_took = trigger(c, ["all"])
        http.start()
        try:
            run = the_run(pf, since)
            run = wait_run(pf, run["id"], timeout)
            busy_s = host_busy_sec() - busy0
            busy = busy_s / ((time.monotonic() - t0) * (os.cpu_count() or 1))
            rss.sample()  # the parts' CPU at the run's end
            cpu = {k: round(v - rss.cpu_first[k], 1) for k, v in rss.cpu_last.items()}
            # /status catches up (its cache, the sampler's pace), unless a probe started
            # a newer run, which /status then shows instead.
            deadline = time.monotonic() + 30
            while http.status_final_at is None and not http.accepted:
                if time.monotonic() > deadline or not http.is_alive():
                    break
                time.sleep(0.1)
        finally:
            http.stop.set()
            rss.stop.set()
            http.join(30)
            rss.join(30)
        status_seen = (http.status_final_at or time.monotonic()) - t0
        end = datetime.fromisoformat(run["end_time"])
        wall = (end - since).total_seconds()
        status = http.final_status or c.get("/status").json()
        recs = [
            r
            for r in c.get("/records", params={"limit": 1000}).json()["records"]
            if datetime.fromisoformat(r["timestamp"]) >= since.replace(tzinfo=None)
        ]
        counts = prefect_counts(pf, run["id"])
    vms = fleet.guest_names(n)
    total = sum(float(r["duration_sec"]) for r in recs)
    conc = min(global_cap, hv_cap * min(args.hypervisors, n), n)
    spans = fleet.spans(recs)
    t_zero = since.replace(tzinfo=None)
    timeline = phases(spans, t_zero, end.replace(tzinfo=None))
    problems = fleet.recorded_once(recs, vms) + fleet.cap_violations(
        recs, global_cap=global_cap, per_hypervisor_cap=hv_cap
    )
    if run["state_type"] != "COMPLETED":
        problems.append(f"run {run['state_type']}: {run['state']['message']}")
    done_vms = sum(1 for v in status.get("vms", []) if v["state"] == "completed")
    # A probe accepted before the run's end is a trigger let through during a run; one
    # sent after it (before /status showed the end) only raced the sampler, and its own
    # run then stands in /status: the fleet run's last answer is not to be had.
    during = [a for a in http.accepted if a < end]
    raced = len(http.accepted) > len(during)
    if http.final_status is None and not raced:
        problems.append(f"/status never showed the run's end (last: {status['status']})")
    elif http.final_status is not None and done_vms != n:
        problems.append(f"/status shows {done_vms} of {n} VMs completed")
    if during:
        problems.append(f"{len(during)} trigger(s) accepted while the run was in progress")
    out.update(
        wall_s=round(wall, 2),
        status_final_seen_s=round(status_seen, 2),
        sum_capture_s=round(total, 2),
        mean_capture_s=round(total / len(recs), 3) if recs else None,
        concurrency=conc,
        overhead_per_vm_s=round((wall * conc - total) / n, 3),
        host_cpu_busy_pct=round(100 * busy, 1),
        **timeline,
        peak_overlap=fleet.peak(spans)[0],
        peak_overlap_per_hypervisor=max(
            (
                fleet.peak(s for s in spans if s.hypervisor == hv)[0]
                for hv in {s.hypervisor for s in spans}
            ),
            default=0,
        ),  # fmt: skip
        **counts,
        task_runs_per_vm=round(counts["task_runs"] / n, 2),
        artifacts_per_vm=round(counts["artifacts"] / n, 2),
        logs_per_vm=round(counts["logs"] / n, 2),
        peak_rss_mib={k: round(v, 1) for k, v in rss.peak.items()},
        cpu_s={**cpu, "rest of the machine": round(busy_s - sum(cpu.values()), 1)},
        host_cpu_s=round(busy_s, 1),
        peak_processes=rss.peak_procs,
        latency_ms={
            name: {"n": len(v), "p50": ms(v, 0.5), "p99": ms(v, 0.99), "max": ms(v, 1.0)}
            for name, v in http.lat.items()
        },
        # Which of them were slow, and when: (s after the trigger, ms), slowest first.
        slowest_ms={
            name: sorted(
                (
                    [round(e - t0, 1), round(x * 1000)]
                    for x, e in zip(v, http.ended[name], strict=True)
                ),
                key=lambda p: -p[1],
            )[:5]
            for name, v in http.lat.items()
        },
        codes={k: {str(c): n for c, n in v.items()} for k, v in http.codes.items()},
        http_errors=http.errors[:10],
        trigger_idle_ms={
            "n": len(idle) + 1,
            "min": round(min([*idle, all_took]) * 1000, 1),
            "median": round(statistics.median([*idle, all_took]) * 1000, 1),
            "max": round(max([*idle, all_took]) * 1000, 1),
            "all": round(all_took * 1000, 1),
        },
        records=len(recs),
        status_vms_completed=done_vms,
        probes_accepted_after_end=len(http.accepted) - len(during),
        ok=not problems,
        problems=problems,
        captures=[
            [
                s.vmid,
                s.hypervisor,
                round((s.start - t_zero).total_seconds(), 3),
                round((s.end - s.start).total_seconds(), 3),
            ]
            for s in sorted(spans, key=lambda s: s.start)
        ],  # fmt: skip
    )
    return out


# --- report ----------------------------------------------------------------------------

# (label, path into a size's dict)
ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("wall s (trigger -> run end)", ("wall_s",)),
    ("/status final seen s", ("status_final_seen_s",)),
    ("sum of captures s", ("sum_capture_s",)),
    ("mean capture s", ("mean_capture_s",)),
    ("overhead per VM s", ("overhead_per_vm_s",)),
    ("host CPU busy % (all cores, trigger -> run end)", ("host_cpu_busy_pct",)),
    ("trigger -> first capture s", ("head_s",)),
    ("first capture -> last capture end s", ("body_s",)),
    ("  of it no capture running s", ("body_idle_s",)),
    ("  captures running, mean", ("mean_running",)),
    ("last capture end -> run end s", ("tail_s",)),
    ("peak overlap (all / per hv)", ("peak_overlap",)),
    ("flow runs", ("flow_runs",)),
    ("task runs per VM", ("task_runs_per_vm",)),
    ("artifacts per VM", ("artifacts_per_vm",)),
    ("log lines per VM", ("logs_per_vm",)),
    ("peak RSS total MiB", ("peak_rss_mib", "total")),
    ("CPU s, whole machine (trigger -> run end)", ("host_cpu_s",)),
    ("GET /status p50 ms", ("latency_ms", "GET /status", "p50")),
    ("GET /status p99 ms", ("latency_ms", "GET /status", "p99")),
    ("GET /records?limit=1000 p50 ms", ("latency_ms", "GET /records?limit=1000", "p50")),
    ("GET /records?limit=1000 p99 ms", ("latency_ms", "GET /records?limit=1000", "p99")),
    ("POST /trigger idle median ms", ("trigger_idle_ms", "median")),
    ("POST /trigger idle max ms", ("trigger_idle_ms", "max")),
    ("POST /trigger during run p50 ms", ("latency_ms", "POST /trigger (run in progress)", "p50")),
    ("POST /trigger during run max ms", ("latency_ms", "POST /trigger (run in progress)", "max")),
]


def get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def growth(first: dict[str, Any], last: dict[str, Any], path: tuple[str, ...]) -> str:
    a, b = get(first, path), get(last, path)
    if not isinstance(a, int | float) or not isinstance(b, int | float) or a <= 0 or b <= 0:
        return ""
    if first["n"] == last["n"]:
        return ""
    k = math.log(b / a) / math.log(last["n"] / first["n"])
    kind = "constant" if k < 0.3 else "linear" if k <= 1.3 else "worse"
    return f"x{b / a:.2f} (k={k:.2f}, {kind})"


def report(rows: list[dict[str, Any]]) -> str:
    sizes = [str(r["n"]) for r in rows]
    lines = [
        "| measure | " + " | ".join(f"N={s}" for s in sizes) + " | growth |",
        "|---" * (len(rows) + 2) + "|",
    ]
    paths = list(ROWS)
    for part in sorted({p for r in rows for p in r["peak_rss_mib"] if p != "total"}):
        paths.append((f"peak RSS {part} MiB", ("peak_rss_mib", part)))
    for part in sorted({p for r in rows for p in r.get("cpu_s", {})}):
        paths.append((f"CPU s, {part}", ("cpu_s", part)))
    for label, path in paths:
        vals = []
        for r in rows:
            v = get(r, path)
            if path == ("peak_overlap",):
                v = f"{v} / {r['peak_overlap_per_hypervisor']}"
            vals.append("-" if v is None else str(v))
        g = "" if path == ("peak_overlap",) else growth(rows[0], rows[-1], path)
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {g} |")
    lines.append(
        "| correct (once, caps, /status) | "
        + " | ".join("yes" if r["ok"] else "NO" for r in rows)
        + " | |"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="25,50,100")
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--hypervisors", type=int, default=4)
    ap.add_argument("--max-concurrent", type=int, default=3, help="global cap (default 3)")
    ap.add_argument("--per-hypervisor", type=int, default=2, help="per-hypervisor cap (2)")
    ap.add_argument("--idle-triggers", type=int, default=3)
    ap.add_argument("--rate", type=float, default=5.0, help="sampler requests/s in all")
    ap.add_argument("--collectors", action="store_true", help="largest N on PostgreSQL + 2 workers")
    ap.add_argument("--analysis", action="store_true", help="keep the Volatility check on")
    ap.add_argument("--json", type=Path, help="write the numbers here (default: stdout)")
    ap.add_argument("--keep", action="store_true", help="leave the last fleet running")
    args = ap.parse_args()
    if not os.environ.get("MEMDUMP_INVENTORY_FILE"):
        print("source .lab/env first (lab/up)", file=sys.stderr)
        return 2
    sizes = sorted(int(s) for s in args.sizes.split(","))
    caps = (args.max_concurrent, args.per_hypervisor)
    settings = {
        "max_concurrent_captures": str(caps[0]),
        "max_captures_per_hypervisor": str(caps[1]),
        "analysis": "true" if args.analysis else "false",
        # The trigger limit on, as by default (tests/helpers/stack.py turns it off): a
        # trigger during the run is refused, and timed as such; 1 s, not the default
        # 60, lets the idle triggers follow each other.
        "trigger_min_interval_sec": "1",
    }
    rows = []
    with fleet.restored(keep=args.keep):
        for n in sizes:
            t0 = time.monotonic()
            inv = fleet.up(n, args.mib, min(args.hypervisors, n))
            print(f"N={n}: lab/up --many {n}:{args.mib}:{args.hypervisors} "
                  f"{time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
            start: Callable[..., AbstractContextManager[Target]] = (
                collectors_target if args.collectors and n == sizes[-1] else serve_target
            )
            with tempfile.TemporaryDirectory(prefix="memdump-fleet-", dir="/tmp") as tmp:
                with start(Path(tmp), inv, settings) as target:
                    row = measure(target, n, args, caps)
            rows.append(row)
            verdict = "ok" if row["ok"] else row["problems"]
            print(f"N={n}: wall {row['wall_s']} s, overhead/VM {row['overhead_per_vm_s']} s, "
                  f"{verdict}", file=sys.stderr, flush=True)  # fmt: skip
    print(
        f"fleet: {args.mib} MiB guests as {args.hypervisors} qemu hypervisors; caps "
        f"{caps[0]} in all, {caps[1]} per hypervisor (c = effective concurrency = "
        f"min(global cap, per-hv cap x H, N) = the global cap here); sampler {args.rate} req/s"
    )
    print(report(rows))
    for row in rows:
        for name, slow in row["slowest_ms"].items():
            pairs = ", ".join(f"{ms} ms at {at} s" for at, ms in slow)
            print(f"N={row['n']}: slowest {name}: {pairs} (after the trigger)")
    doc = json.dumps({"args": vars(args) | {"json": str(args.json)}, "sizes": rows}, indent=1)
    if args.json:
        args.json.write_text(doc + "\n")
    else:
        print(doc)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
