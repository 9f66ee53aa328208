"""VMs per minute with 1, 2 and 3 concurrent captures, against the sum of single captures.

    . .lab/env && .venv/bin/python benchmarks/scale.py [--vms 8] [--mib 256] [--runs 1]

Brings the lab to ``--vms`` running VMs (the two default ones plus ``vm-scale-NN``,
added with ``lab/up --vm`` and removed afterwards), then for each concurrency N in
``--concurrency`` (default 1,2,3) starts ``memdump serve`` with
MEMDUMP_ORCHESTRATION__MAX_CONCURRENT_CAPTURES=N and
MEMDUMP_ORCHESTRATION__MAX_CAPTURES_PER_HYPERVISOR=N, triggers
"all", and measures the run's wall time (trigger to completed) and the sum of the
captures' own durations (from their records). The scaling ratio is the sum of the single
captures (the N=1 run's) over the run's wall time: 1.0 means no gain over one capture at
a time (and the N=1 run itself is below 1.0 by the run's own overhead). Also reports,
from the records' start and end times, how many captures overlapped at most. One
machine, one runner: workers on several machines are issue 7's production mode.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.stack import running_stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = "/api/memory-dumps"


def running_vms() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [n for n in out.split() if n]


def max_overlap(recs: list[dict[str, Any]]) -> int:
    events = []
    for r in recs:
        start = datetime.fromisoformat(r["timestamp"])
        events += [(start, 1), (start + timedelta(seconds=r["duration_sec"]), -1)]
    depth = best = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        depth += step
        best = max(best, depth)
    return best


def measure(inv: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memdump-scale-") as tmp:
        with running_stack(
            Path(tmp),
            inv,
            max_concurrent_captures=str(n),
            max_captures_per_hypervisor=str(n),
            analysis="false",  # the capture itself: the Volatility check is measured apart
        ) as st:
            t0 = time.monotonic()
            code, body = st.call("POST", f"{BASE}/trigger", {"vm_ids": ["all"]})
            assert code == 200, body
            status = st.wait_status(timeout=1800)
            wall = time.monotonic() - t0
            assert status["status"] == "completed", status
            _, recs = st.call("GET", f"{BASE}/records")
            recs = recs["records"]
            return {
                "n": n,
                "wall": wall,
                "sum": sum(r["duration_sec"] for r in recs),
                "overlap": max_overlap(recs),
                "vms": len(recs),
            }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--concurrency", default="1,2,3")
    args = ap.parse_args()
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not inv:
        print("source .lab/env first (lab/up)", file=sys.stderr)
        return 2
    have = running_vms()
    added = []
    try:
        i = 1
        while len(have) + len(added) < args.vms:
            name = f"vm-scale-{i:02d}"
            i += 1
            if name in have:
                continue
            subprocess.run(
                [str(REPO / "lab/up"), "--vm", f"{name}:{args.mib}"],
                check=True,
                capture_output=True,
            )
            added.append(name)
        rows = [measure(inv, int(n)) for n in args.concurrency.split(",")]
    finally:
        for name in added:
            subprocess.run([str(REPO / "lab/down"), "--vm", name], check=False, capture_output=True)
    # The baseline: the captures one at a time (the first row when it is N=1).
    single = next((r["sum"] for r in rows if r["n"] == 1), rows[0]["sum"])
    print(f"{rows[0]['vms']} VMs ('all'; added ones {args.mib} MiB), one runner")
    print(f"sum of single captures (N=1): {single:.1f} s")
    print(
        "| concurrent | wall s | VMs/min | sum of this run's captures s "
        "| scaling (single sum / wall) | max overlap |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['wall']:.1f} | {60 * r['vms'] / r['wall']:.1f} | {r['sum']:.1f} | "
            f"{single / r['wall']:.2f} | {r['overlap']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
