"""Bounded concurrent load on the read routes while a capture runs (loopback only).

    . .lab/env && .venv/bin/python benchmarks/load.py [--clients 50] [--duration 60]

Starts ``memdump serve`` against the lab (the store seeded with 5000 records) and a
1 GiB lab VM (``--vm``, brought up with ``lab/up --vm`` and removed afterwards when this
script started it). Then:

  1. idle: ``--captures`` sequential captures of the VM with no API load; the baseline;
  2. load: ``--clients`` concurrent keep-alive clients for ``--duration`` seconds, each
     looping over GET /status, GET /records?limit=1000 and GET /stats, while captures of
     the same VM run back to back.

Reports per route: requests, errors (any non-200 or transport error; target 0), p50,
p99 and max latency; and the capture's throughput (VM memory / record duration) idle
and under load, with their ratio. Client, server and capture share this machine's
cores, so the ratio includes the clients' own CPU use; compare ratios, not absolute
numbers, across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.api import pct, seed  # noqa: E402
from tests.helpers.stack import Stack, running_stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = "/api/memory-dumps"
ROUTES = [f"{BASE}/status", f"{BASE}/records?limit=1000", f"{BASE}/stats"]


def capture_once(stack: Stack, vm: str, vm_bytes: int) -> float:
    """One capture through the API; its throughput in MB/s (memory / record duration)."""
    code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": [vm]})
    assert code == 200, body
    status = stack.wait_status(timeout=600)
    assert status["status"] == "completed", status
    _, recs = stack.call("GET", f"{BASE}/records?limit=1")
    rec = recs["records"][0]
    assert rec["vmid"] == vm, rec
    return vm_bytes / rec["duration_sec"] / 1e6


async def client_loop(
    client: httpx.AsyncClient,
    offset: int,
    stop_at: float,
    out: dict[str, list[float]],
    errors: dict[str, int],
) -> None:
    i = offset
    while time.monotonic() < stop_at:
        route = ROUTES[i % len(ROUTES)]
        i += 1
        t0 = time.perf_counter()
        try:
            resp = await client.get(route)
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            out[route].append(time.perf_counter() - t0)
        else:
            errors[route] += 1


async def load(
    api: str, clients: int, duration: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    out: dict[str, list[float]] = {r: [] for r in ROUTES}
    errors = {r: 0 for r in ROUTES}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    stop_at = time.monotonic() + duration
    async with httpx.AsyncClient(base_url=api, limits=limits, timeout=30.0) as client:
        await asyncio.gather(
            *(client_loop(client, k, stop_at, out, errors) for k in range(clients))
        )
    return out, errors


def measure(stack: Stack, args: argparse.Namespace) -> None:
    vm_bytes = args.mib << 20
    idle = [capture_once(stack, args.vm, vm_bytes) for _ in range(args.captures)]

    busy: list[float] = []
    stop = threading.Event()

    def captures() -> None:
        while not stop.is_set():
            busy.append(capture_once(stack, args.vm, vm_bytes))

    worker = threading.Thread(target=captures, name="captures")
    worker.start()
    time.sleep(2)  # the first capture is under way before the clients start
    t0 = time.monotonic()
    out, errors = asyncio.run(load(stack.api, args.clients, args.duration))
    wall = time.monotonic() - t0
    stop.set()
    worker.join()

    total = sum(len(v) for v in out.values())
    print(
        f"{args.clients} clients, {wall:.0f} s, {total} requests ({total / wall:.0f}/s), "
        f"captures of {args.vm} ({args.mib} MiB) running throughout"
    )
    print("| route | requests | errors | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for route in ROUTES:
        v = out[route] or [float("nan")]
        print(
            f"| GET {route.removeprefix(BASE)} | {len(out[route])} | {errors[route]} | "
            f"{pct(v, 0.5) * 1000:.0f} | {pct(v, 0.99) * 1000:.0f} | {max(v) * 1000:.0f} |"
        )
    mi, mb = statistics.median(idle), statistics.median(busy)
    print(
        f"capture throughput: idle API {mi:.0f} MB/s (median of {len(idle)}), under load "
        f"{mb:.0f} MB/s (median of {len(busy)}): ratio {mb / mi:.2f}"
    )
    print(f"errors: {sum(errors.values())} (target 0)")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--captures", type=int, default=3, help="idle captures (baseline)")
    ap.add_argument("--vm", default="vm-load-01")
    ap.add_argument("--mib", type=int, default=1024, help="memory of --vm")
    args = ap.parse_args()
    if not 1 <= args.clients <= 200 or not 0 < args.duration <= 600:
        ap.error("bounded load only: 1-200 clients, at most 600 s")
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not inv:
        print("source .lab/env first (lab/up)", file=sys.stderr)
        return 2
    up = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domstate", args.vm], capture_output=True, check=False
    )
    started_vm = up.returncode != 0
    if started_vm:
        subprocess.run([str(REPO / "lab/up"), "--vm", f"{args.vm}:{args.mib}"], check=True)
    try:
        with tempfile.TemporaryDirectory(prefix="memdump-load-") as tmp:
            seed(Path(tmp) / "records.db", 5000)
            with running_stack(Path(tmp), inv) as stack:
                measure(stack, args)
    finally:
        if started_vm:
            subprocess.run([str(REPO / "lab/down"), "--vm", args.vm], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
