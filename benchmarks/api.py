"""API latency of the running stack (``memdump serve`` against the lab).

    . .lab/env && .venv/bin/python benchmarks/api.py [--n 30] [--runs 5]

Measures, on loopback, one request at a time, after the stack has been up ``--settle``
seconds (its start-up done: the first trigger after `memdump serve` starts is not idle):
  * POST /trigger response time (the contract's target: < 100 ms), over ``--n``
    triggers of an id no hypervisor has (the run starts and fails fast, no capture),
    with the rate limit on (``--interval`` s, the check and the keyed run of
    api.runs: what every trigger pays in production), each after the last run ended
    (the stack idle); and the refused trigger sent right after each (429, run in
    progress);
  * GET /status, GET /records?limit=1000 (the store seeded with 5000 records) and
    GET /stats, ``--n`` each;
  * trigger -> flow run RUNNING (the runner's poll interval plus the flow-run
    process start; target < 5 s), trigger -> capture start (the record's ``timestamp``:
    the moment the dump is opened, so the first byte follows within the dump script's
    start) and trigger -> COMPLETED for one 256 MiB lab VM, over ``--runs`` sequential
    triggers.

``--compare-cold`` measures the trigger -> state rows again on a second stack with
``MEMDUMP_ORCHESTRATION__WARM_FLOW_RUNS=false`` (each flow run a new interpreter, as
before deployments/warm.py), in the same run, and prints the ratios (medians).
Prints p50/p99/max; numbers are for this machine and run only (see README).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memdump.records.model import DumpRecord  # noqa: E402
from memdump.records.sqlite import SQLiteRecordStore  # noqa: E402
from tests.helpers.stack import Stack, running_stack  # noqa: E402

BASE = "/api/memory-dumps"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<36} n={len(values):<3} p50={pct(values, 0.5) * 1000:8.1f} ms  "
        f"p99={pct(values, 0.99) * 1000:8.1f} ms  max={max(values) * 1000:8.1f} ms"
    )


def seed(db: Path, n: int) -> None:
    store = SQLiteRecordStore(db)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(n):
        store.add(
            DumpRecord(
                t0 + timedelta(minutes=i),
                f"vm-{i % 50:03d}",
                f"{100 + i % 50}",
                f"{i:064x}",
                5.0,
                1 << 30,
                1,
                2,
                3,
                f"/d/{i}.mem.gz",
                "0" * 64,
                2 << 30,
                "lab",
            )
        )


def latest_run() -> tuple[str, str] | None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    due = FlowRunFilter(  # not next Monday's scheduled run
        expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC))
    )
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=due, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1
        )
    if not runs or runs[0].state is None:
        return None
    return str(runs[0].id), runs[0].state.type.value


def timed(stack: Stack, method: str, path: str, n: int, body: object = None) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        code, _ = stack.call(method, path, body)
        out.append(time.perf_counter() - t0)
        assert code == 200, path
    return out


def trigger_to_states(stack: Stack, vm: str) -> tuple[float, float, float]:
    """Seconds from POST /trigger to RUNNING, to COMPLETED, and to the capture's start
    (the new record's timestamp, UTC)."""
    before = latest_run()
    t0 = time.perf_counter()
    at = datetime.now(UTC)
    code, _ = stack.call("POST", f"{BASE}/trigger", {"vm_ids": [vm]})
    assert code == 200
    running = None
    cur = None
    while time.perf_counter() - t0 < 120:
        cur = latest_run()
        if cur is not None and before is not None and cur[0] == before[0]:
            cur = None
        if cur is not None and running is None and cur[1] in ("RUNNING", *FINAL):
            running = time.perf_counter() - t0
        if cur is not None and cur[1] in FINAL:
            break
        time.sleep(0.05)
    assert running is not None and cur is not None and cur[1] == "COMPLETED", cur
    done = time.perf_counter() - t0
    _, recs = stack.call("GET", f"{BASE}/records?limit=1")
    started = datetime.fromisoformat(recs["records"][0]["timestamp"]).replace(tzinfo=UTC)
    assert recs["records"][0]["vmid"] == vm and started > at, recs
    return running, done, (started - at).total_seconds()


def state_rows(stack: Stack, args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.prefect_auth}
    with temporary_settings(updates=updates):
        runs = [trigger_to_states(stack, args.vm) for _ in range(args.runs)]
    return [
        ("trigger -> flow run RUNNING", [r[0] for r in runs]),
        (f"trigger -> capture start ({args.vm})", [r[2] for r in runs]),
        (f"trigger -> COMPLETED ({args.vm})", [r[1] for r in runs]),
    ]


def idle_triggers(
    stack: Stack, n: int, interval: float
) -> tuple[list[float], list[float], Counter[str]]:
    """POST /trigger n times, each after the last run ended and the interval passed;
    and a second trigger right after each, which must be refused (429: that run is in
    progress): the answers it got, counted by their detail."""
    accepted, refused, second = [], [], Counter[str]()
    for _ in range(n):
        since = datetime.now(UTC) - timedelta(seconds=2)
        for out, want in ((accepted, 200), (refused, 429)):
            t0 = time.perf_counter()
            code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["bench-absent-01"]})
            out.append(time.perf_counter() - t0)
            if want == 429:
                second[f"{code} {body.get('detail') or body.get('message')}"[:60]] += 1
            else:
                assert code == want, (code, body)
        stack.wait_status(since=since)
        time.sleep(interval + 0.1)
    return accepted, refused, second


def measure(stack: Stack, args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    time.sleep(args.settle)
    trig, refused, second = idle_triggers(stack, args.n, args.interval)
    results = [
        ("POST /trigger response (idle)", trig),
        ("POST /trigger refused (in progress)", refused),
        ("GET /status", timed(stack, "GET", f"{BASE}/status", args.n)),
        ("GET /records?limit=1000 (of 5000)", timed(stack, "GET", f"{BASE}/records", args.n)),
        ("GET /stats (5000 records)", timed(stack, "GET", f"{BASE}/stats", args.n)),
    ]
    states = state_rows(stack, args)
    results += states
    poll = stack.env.get("MEMDUMP_ORCHESTRATION__RUNNER_POLL_SEC", "1 (default)")
    print(f"memdump serve on loopback; runner poll interval {poll} s")
    for name, values in results:
        print(row(name, values))
    print("the trigger right after an accepted one:", dict(second))
    running, start = states[0][1], states[1][1]
    print(
        f"targets: trigger p50 < 100 ms: {'PASS' if pct(trig, 0.5) < 0.1 else 'FAIL'}; "
        f"trigger p99 < 100 ms: {'PASS' if pct(trig, 0.99) < 0.1 else 'FAIL'}; "
        f"trigger->running p50 < 5 s: {'PASS' if pct(running, 0.5) < 5 else 'FAIL'}; "
        f"trigger->capture start p50 < 1 s: {'PASS' if pct(start, 0.5) < 1 else 'FAIL'}"
    )
    return states


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=30, help="requests per endpoint")
    ap.add_argument("--runs", type=int, default=5, help="captures for trigger->running")
    ap.add_argument("--vm", default="vm-web-01")
    ap.add_argument("--interval", type=float, default=1.0, help="the trigger rate limit, s")
    ap.add_argument("--settle", type=float, default=10.0, help="s after start-up")
    ap.add_argument(
        "--compare-cold",
        action="store_true",
        help="the trigger -> state rows again without warm flow runs, and the ratios",
    )
    args = ap.parse_args()
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not inv:
        print("source .lab/env first (lab/up)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="memdump-bench-") as tmp:
        seed(Path(tmp) / "records.db", 5000)
        limit = {"api__trigger_min_interval_sec": str(args.interval)}
        with running_stack(Path(tmp), inv, **limit) as stack:
            warm = measure(stack, args)
        if args.compare_cold:
            cold_dir = Path(tmp) / "cold"
            cold_dir.mkdir()
            with running_stack(
                cold_dir, inv, orchestration__warm_flow_runs="false", **limit
            ) as stack:
                cold = state_rows(stack, args)
            print("without warm flow runs (MEMDUMP_ORCHESTRATION__WARM_FLOW_RUNS=false):")
            for name, values in cold:
                print(row(name, values))
            for (name, w), (_, c) in zip(warm, cold, strict=True):
                print(f"  {name}: cold/warm median {pct(c, 0.5) / pct(w, 0.5):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
