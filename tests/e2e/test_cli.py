"""Through ``memdump serve`` (the session stack) against the lab: /status's per-VM detail
(`vms`) during and after a real run, and the ``memdump`` REST client subcommands run as
a user runs them (a separate process, the service's own MEMDUMP_* environment)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from tests.helpers.stack import REPO, Stack, free_port

pytestmark = pytest.mark.lab

BASE = "/api/memory-dumps"
VM_KEYS = ["vm_id", "state", "progress", "bytes_done", "bytes_total", "error", "note"]


def memdump(stack: Stack, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "memdump.cli", *argv],
        cwd=REPO,
        env=stack.env,  # MEMDUMP_API__PORT etc.: the CLI finds the service from settings
        capture_output=True,
        timeout=timeout,
    )
    # Decoded as sent (no newline translation: the CSV's line ends are CRLF).
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def poll_run(stack: Stack, timeout: float = 180) -> list[dict[str, Any]]:
    """Every /status answer of the run just triggered, until it is final."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = stack.call("GET", f"{BASE}/status")
        assert code == 200, body
        seen.append(body)
        if body["status"] not in ("in_progress", "idle"):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"still {seen[-1]} after {timeout}s")


def test_status_shows_each_vm_of_a_run(stack: Stack) -> None:
    code, body = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01", "vm-db-01"]})
    assert code == 200, body
    seen = poll_run(stack)
    for s in seen:
        assert list(s)[-1] == "vms"  # after the contract's fields
        for vm in s["vms"]:
            assert list(vm) == VM_KEYS
    running = [s for s in seen if s["status"] == "in_progress"]
    assert running, "the run was never seen in progress"
    # While it runs, both VMs are listed (one waits: the stack allows 1 capture per
    # hypervisor), none yet "completed" at the first look.
    for s in running:
        assert s["vm_ids"] == ["vm-web-01", "vm-db-01"]
        assert sorted(v["vm_id"] for v in s["vms"]) == ["vm-db-01", "vm-web-01"]
    assert {v["state"] for v in running[0]["vms"]} <= {"pending", "running"}
    # A capture takes over a second, the run several: it is seen streaming.
    assert "running" in {v["state"] for s in running for v in s["vms"]}
    final = seen[-1]
    assert final["status"] == "completed", final
    _, recs = stack.call("GET", f"{BASE}/records?limit=2")
    size = {r["vmid"]: r["raw_size_bytes"] for r in recs["records"]}
    assert final["vms"] == [
        {"vm_id": vm, "state": "completed", "progress": 100.0, "bytes_done": size[vm],
         "bytes_total": size[vm], "error": None, "note": None}
        for vm in ("vm-web-01", "vm-db-01")
    ]  # fmt: skip


def test_status_names_the_vm_that_failed(stack: Stack) -> None:
    code, _ = stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["nope-01", "vm-web-01"]})
    assert code == 200
    final = poll_run(stack)[-1]
    assert final["status"] == "failed"
    # Prefect records a task run's state (its message) from the run's events, after the
    # task run's row: right at the run's end the failed VM may still read "Failed"
    # (api.runs._settled); /status shows the error once the state is in.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if {v["vm_id"]: v for v in final["vms"]}["nope-01"]["error"] != "Failed":
            break
        time.sleep(0.2)
        final = stack.call("GET", f"{BASE}/status")[1]
    assert final["status"] == "failed"
    by_vm = {v["vm_id"]: v for v in final["vms"]}
    assert [v["vm_id"] for v in final["vms"]] == ["nope-01", "vm-web-01"]
    assert by_vm["vm-web-01"]["state"] == "completed" and by_vm["vm-web-01"]["error"] is None
    assert by_vm["nope-01"]["state"] == "failed"
    assert "nope-01" in by_vm["nope-01"]["error"] and "Task run" not in by_vm["nope-01"]["error"]


def test_cli_trigger_wait_status_records_stats(stack: Stack) -> None:
    r = memdump(stack, "trigger", "vm-web-01", "--wait", "--interval", "0.2")
    assert r.returncode == 0, (r.stdout, r.stderr)
    answer = json.loads(r.stdout[: r.stdout.index("}") + 1])  # the trigger's response first
    assert answer["status"] == "scheduled" and answer["vm_ids"] == ["vm-web-01"]
    lines = r.stdout.splitlines()
    assert "vm-web-01: completed 100.0%" in lines and "run: completed" in lines
    result = r.stdout[r.stdout.index("Result") :]
    assert ["vm-web-01", "completed", "100.0%"] in [x.split() for x in result.splitlines()]
    assert "run completed in" in result
    assert "\x1b[" not in r.stdout  # not a terminal: plain text

    r = memdump(stack, "status")
    assert r.returncode == 0, r.stderr
    rows = [x.split() for x in r.stdout.splitlines()]
    assert ["status", "completed"] in rows and ["vm_ids", "vm-web-01"] in rows
    assert ["vm-web-01", "completed", "100.0%"] in rows
    r = memdump(stack, "status", "--json")
    _, live = stack.call("GET", f"{BASE}/status")
    assert r.returncode == 0 and json.loads(r.stdout) == live

    r = memdump(stack, "records", "--vmid", "vm-web-01", "--csv")
    assert r.returncode == 0, r.stderr
    table = list(csv.reader(io.StringIO(r.stdout)))
    assert table[0][:4] == ["timestamp", "dom", "vmid", "sha256"]
    assert len(table) >= 2 and {row[2] for row in table[1:]} == {"vm-web-01"}
    _, recs = stack.call("GET", f"{BASE}/records?vmid=vm-web-01&limit=1")
    newest = recs["records"][0]
    assert table[1][0] == newest["timestamp"] and table[1][3] == newest["sha256"]
    # Exactly the API's own CSV.
    with urllib.request.urlopen(f"{stack.api}{BASE}/records?vmid=vm-web-01&format=csv") as resp:
        assert r.stdout == resp.read().decode()

    r = memdump(stack, "records", "--vmid", "vm-web-01", "--limit", "1")
    assert r.returncode == 0, r.stderr
    assert newest["timestamp"] in r.stdout and "1 record(s) (limit 1)" in r.stdout

    r = memdump(stack, "stats")
    _, stats = stack.call("GET", f"{BASE}/stats")
    assert r.returncode == 0, r.stderr
    rows = [x.split() for x in r.stdout.splitlines()]
    assert ["total_dumps", str(stats["total_dumps"])] in rows
    assert ["last_dump", stats["last_dump"]] in rows
    r = memdump(stack, "stats", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == stats


def test_cli_failed_run_and_errors(stack: Stack) -> None:
    r = memdump(stack, "trigger", "nope-01", "--wait", "--interval", "0.2")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "run failed" in r.stdout and "nope-01" in r.stdout
    # The API's detail, exit 1.
    r = memdump(stack, "records", "--limit", "5000")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("memdump: ") and "(HTTP 400)" in r.stderr
    # Nothing there.
    port = free_port()
    r = memdump(stack, "status", "--api", f"http://127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"is `memdump serve` running at http://127.0.0.1:{port}?" in r.stderr
    assert "Traceback" not in r.stderr
