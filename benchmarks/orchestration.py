"""The capture flow's orchestration alone: N VMs whose capture is a sleep (issue 17).

    .venv/bin/python benchmarks/orchestration.py [--sizes 25,100] [--capture-sec 1.0]
        [--hypervisors 4] [--max-concurrent 3] [--per-hypervisor 2] [--repeat 1]
        [--json FILE]

benchmarks/fleet.py measures a trigger over real lab guests through the whole stack;
its numbers mix the orchestration with SSH sessions, QEMU and a loaded machine. This one
keeps only what every VM costs in Prefect and in memdump's chain around the capture:
the real ``capture_vms`` flow on a real, temporary Prefect server (Prefect's test
harness: SQLite, as ``memdump serve`` has it), N VMs spread over H hypervisors as
``"all"`` lists them, the real gate, Prefect limits, task runs, progress artifacts,
record store (SQLite) and custody log; the capture itself (memdump.chain.capture) is
replaced by a sleep of ``--capture-sec`` that reports its start and end, and the
hypervisor listing and the drivers by fakes (no SSH).

Reported per N: wall (the flow's call -> its return), the captures' spans, overhead
per VM = (wall x c - sum of captures) / N with c = min(global cap, per-hypervisor cap x
H, N) (the same definition as benchmarks/fleet.py), the flow's start -> first capture,
the time inside the captures' span with fewer than c captures running (with VMs still
waiting), the mean number running, and the growth between the smallest and largest N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _setup_env(tmp: Path, hypervisors: int, max_concurrent: int, per_hv: int) -> None:
    os.environ["MEMDUMP_DATA_DIR"] = str(tmp / "data")
    os.environ["MEMDUMP_HYPERVISORS"] = json.dumps(
        [{"name": f"hv-{k}", "transport": "local"} for k in range(1, hypervisors + 1)]
    )
    os.environ["MEMDUMP_ORCHESTRATION__MAX_CONCURRENT_CAPTURES"] = str(max_concurrent)
    os.environ["MEMDUMP_ORCHESTRATION__MAX_CAPTURES_PER_HYPERVISOR"] = str(per_hv)
    os.environ["MEMDUMP_ANALYSIS__ENABLED"] = "false"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.pop("MEMDUMP_INVENTORY_FILE", None)


def _fakes(capture_sec: float, spans: list[tuple[str, float, float]], lock: threading.Lock) -> None:
    """The engine's edges replaced: no hypervisor, a capture that sleeps."""
    import flows.capture as fc
    import memdump.chain as chain
    from memdump.capture import Capture
    from memdump.hypervisors import VMRef
    from memdump.records.model import DumpRecord
    from memdump.settings import Settings

    class Driver:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            pass

    def open_driver(hv: Any, ssh: Any) -> Driver:
        return Driver(hv.name)

    def find(drivers: list[Driver], vm_id: str) -> tuple[Driver, VMRef]:
        return drivers[0], VMRef(drivers[0].name, vm_id, vm_id)

    def capture(driver: Any, ref: VMRef, settings: Any, progress: Any = None, **_: Any) -> Capture:
        t0 = time.time()
        if progress:
            progress(0, 100)
        time.sleep(capture_sec)
        if progress:
            progress(100, 100)
        t1 = time.time()
        with lock:
            spans.append((ref.vmid, t0, t1))
        dumps = Path(os.environ["MEMDUMP_DATA_DIR"]) / "dumps"
        rec = DumpRecord(
            datetime_now(), ref.vmid, ref.name, "a" * 64, t1 - t0, 100, 1, 2, 3,
            str(dumps / f"{ref.vmid}.mem.gz"), "b" * 64, 4096, ref.hypervisor,
        )  # fmt: skip
        return Capture(rec, None, None, {})  # type: ignore[arg-type]

    chain.open_driver = open_driver  # type: ignore[assignment]
    chain.find = find  # type: ignore[assignment]
    chain.capture = capture  # type: ignore[assignment]

    def list_targets(settings: Settings, vm_ids: list[str]) -> Any:
        n = int(os.environ["MEMDUMP_BENCH_N"])
        hvs = [hv.name for hv in settings.inventory]
        vms = [(f"vm-{i:04d}", hvs[i % len(hvs)]) for i in range(n)]
        return fc.Targets(vms)

    fc.list_targets = list_targets  # type: ignore[assignment]


def datetime_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _measure(n: int, args: argparse.Namespace, spans: list[tuple[str, float, float]]) -> dict:
    from flows.capture import capture_vms

    spans.clear()
    os.environ["MEMDUMP_BENCH_N"] = str(n)
    t0 = time.time()
    state = capture_vms(["all"], source="benchmark", return_state=True)
    t1 = time.time()
    assert state.is_completed(), state.message
    assert sorted(v for v, _, _ in spans) == sorted(f"vm-{i:04d}" for i in range(n)), "not once"
    c = min(args.max_concurrent, args.per_hypervisor * args.hypervisors, n)
    wall = t1 - t0
    total = sum(e - s for _, s, e in spans)
    first = min(s for _, s, _ in spans)
    last = max(e for _, _, e in spans)
    # Time in the captures' span with fewer than c running (VMs were still waiting until
    # the last capture started).
    last_start = max(s for _, s, _ in spans)
    events = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans])
    running, prev, short, area = 0, first, 0.0, 0.0
    for t, d in events:
        if t > prev:
            area += running * (t - prev)
            if running < c and prev < last_start:
                short += min(t, last_start) - prev
        running += d
        prev = t
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "sum_capture_s": round(total, 3),
        "overhead_per_vm_s": round((wall * c - total) / n, 3),
        "start_to_first_capture_s": round(first - t0, 3),
        "last_capture_to_end_s": round(t1 - last, 3),
        "under_cap_while_waiting_s": round(short, 3),
        "mean_running": round(area / (last - first), 2),
        "concurrency": c,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="25,100")
    ap.add_argument("--capture-sec", type=float, default=1.0)
    ap.add_argument("--hypervisors", type=int, default=4)
    ap.add_argument("--max-concurrent", type=int, default=3)
    ap.add_argument("--per-hypervisor", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per N (the median is shown)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from benchmarks.fleet import growth  # the same growth classes as the fleet benchmark

    with tempfile.TemporaryDirectory(prefix="memdump-orch-") as tmp:
        _setup_env(Path(tmp), args.hypervisors, args.max_concurrent, args.per_hypervisor)
        from prefect.testing.utilities import prefect_test_harness

        spans: list[tuple[str, float, float]] = []
        _fakes(args.capture_sec, spans, threading.Lock())
        results: list[dict] = []
        with prefect_test_harness(server_startup_timeout=120):
            for n in sizes:
                runs = [_measure(n, args, spans) for _ in range(args.repeat)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                med["runs"] = runs
                results.append(med)
                print(f"N={n}: wall {med['wall_s']:.2f} s, overhead/VM "
                      f"{med['overhead_per_vm_s']:.3f} s", file=sys.stderr)  # fmt: skip
    rows = [
        ("wall s", "wall_s"),
        ("sum of captures s", "sum_capture_s"),
        ("overhead per VM s", "overhead_per_vm_s"),
        ("flow start -> first capture s", "start_to_first_capture_s"),
        ("below the cap with VMs waiting s", "under_cap_while_waiting_s"),
        ("captures running, mean", "mean_running"),
        ("last capture -> flow end s", "last_capture_to_end_s"),
    ]
    print(f"capture = sleep {args.capture_sec} s; caps {args.max_concurrent} in all, "
          f"{args.per_hypervisor} per hypervisor, {args.hypervisors} hypervisors; "
          f"median of {args.repeat}")  # fmt: skip
    print("| measure | " + " | ".join(f"N={r['n']}" for r in results) + " | growth |")
    print("|---|" + "---|" * len(results) + "---|")
    for label, key in rows:
        vals = [r[key] for r in results]
        g = growth(results[0], results[-1], (key,))  # fleet.py's classes
        print(f"| {label} | " + " | ".join(f"{v:g}" for v in vals) + f" | {g} |")
    out = json.dumps({"args": vars(args) | {"json": str(args.json)}, "sizes": results}, indent=1)
    if args.json:
        args.json.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
