"""Trigger latency of the running stack (``memdump serve`` against the lab).

    . .lab/env && .venv/bin/python benchmarks/trigger.py [--n 30] [--runs 5]

Measures, on loopback:
  * POST /trigger response time (the contract's target: < 100 ms), over ``--n``
    triggers of an id no hypervisor has (the run starts and fails fast, no capture);
  * trigger -> flow run RUNNING (the runner's poll interval plus the flow-run
    subprocess start; target < 5 s) and trigger -> COMPLETED for one 256 MiB lab VM,
    over ``--runs`` sequential triggers.
Prints p50/p90/max; numbers are for this machine and run only (see README).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.stack import Stack, running_stack  # noqa: E402

BASE = "/api/memory-dumps"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<34} n={len(values):<3} p50={pct(values, 0.5) * 1000:8.1f} ms  "
        f"p90={pct(values, 0.9) * 1000:8.1f} ms  max={max(values) * 1000:8.1f} ms"
    )


def latest_run(stack: Stack) -> tuple[str, str] | None:
    os.environ["PREFECT_API_URL"] = stack.prefect_api
    from datetime import UTC, datetime

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


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=30, help="triggers for the response time")
    ap.add_argument("--runs", type=int, default=5, help="captures for trigger->running")
    ap.add_argument("--vm", default="vm-web-01")
    args = ap.parse_args()
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not inv:
        print("source .lab/env first (lab/up)", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="memdump-bench-") as tmp,
        running_stack(Path(tmp), inv) as stack,
    ):
        respond: list[float] = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            code, _ = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["bench-absent-01"]})
            respond.append(time.perf_counter() - t0)
            assert code == 200
        stack.wait_status()
        to_running: list[float] = []
        to_done: list[float] = []
        for _ in range(args.runs):
            before = latest_run(stack)
            t0 = time.perf_counter()
            code, _ = stack.call("POST", f"{BASE}/trigger", {"vm_ids": [args.vm]})
            assert code == 200
            seen_running = None
            while time.perf_counter() - t0 < 120:
                cur = latest_run(stack)
                if cur and before and cur[0] == before[0]:
                    cur = None
                if cur and seen_running is None and cur[1] in ("RUNNING", "COMPLETED", "FAILED"):
                    seen_running = time.perf_counter() - t0
                if cur and cur[1] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(0.05)
            assert seen_running is not None and cur is not None and cur[1] == "COMPLETED", cur
            to_running.append(seen_running)
            to_done.append(time.perf_counter() - t0)
        poll = stack.env.get("MEMDUMP_RUNNER_POLL_SEC", "1 (default)")
        print(f"memdump serve on loopback; runner poll interval {poll} s")
        print(row("POST /trigger response", respond))
        print(row("trigger -> flow run RUNNING", to_running))
        print(row(f"trigger -> COMPLETED ({args.vm})", to_done))
        print(
            f"target: response p50 < 100 ms: "
            f"{'PASS' if pct(respond, 0.5) < 0.1 else 'FAIL'}; "
            f"trigger->running p50 < 5 s: {'PASS' if pct(to_running, 0.5) < 5 else 'FAIL'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
