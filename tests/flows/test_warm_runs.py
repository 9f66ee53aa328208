"""deployments.warm: the runner's flow runs forked from a forkserver that has imported
Prefect and memdump already, each still in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import prefect.flow_engine as flow_engine

from deployments import warm
from tests.helpers.warm_flow import where_am_i


def test_a_flow_run_is_a_fork_of_the_warm_forkserver(warm_runs: int, tmp_path: Path) -> None:
    assert warm.installed()
    seen = []
    for i in range(2):  # each run a process of its own, both children of the forkserver
        out = tmp_path / f"run{i}.json"
        proc = flow_engine.run_flow_in_subprocess(
            where_am_i, parameters={"out": str(out), "module": "memdump.pipeline"}
        )
        proc.join(120)
        assert proc.exitcode == 0
        seen.append(json.loads(out.read_text()))
    assert [s["ppid"] for s in seen] == [warm_runs, warm_runs]
    assert seen[0]["pid"] != seen[1]["pid"] and os.getpid() not in (seen[0]["pid"], warm_runs)
    # Imported by the forkserver before the fork, never by the flow run itself.
    assert all(s["preloaded"] for s in seen)


def test_the_preloaded_modules_start_no_thread_at_import() -> None:
    # A thread running in the forkserver when it forks would leave its locks held in
    # every flow run (the reason multiprocessing's fork is unsafe with threads).
    code = (
        "import importlib, os, sys, threading\n"
        f"for m in {list(warm.PRELOAD)!r}: importlib.import_module(m)\n"
        "print(threading.active_count(), len(os.listdir('/proc/self/task')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["1", "1"], out.stderr


def test_what_a_capture_run_imports_after_the_fork_is_preloaded() -> None:
    # What a capture flow run imported on its own although PRELOAD was imported (strace of
    # a run, 2026-11-30: 0.5 s of every run's start): the runner's main module, which
    # multiprocessing runs again in each child, the SSH transport, the drivers, the live
    # converter, Prefect's graphviz and anyio backend. After PRELOAD they add nothing but
    # deployments.serve itself (and its small sibling warm, which imports the forkserver).
    lazy = [
        "deployments.serve",
        "memdump.transport.ssh",
        "memdump.hypervisors.libvirt",
        "memdump.hypervisors.qemu",
        "memdump.hypervisors.proxmox",
        "memdump.livecore",
        "prefect.utilities.visualization",
        "anyio._backends._asyncio",
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(warm.PRELOAD)!r}: importlib.import_module(m)\n"
        "before = set(sys.modules)\n"
        f"for m in {lazy!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    # multiprocessing's forkserver modules are the forkserver's own: there before any run.
    new = {m for m in json.loads(out.stdout) if not m.startswith("multiprocessing.")}
    assert new <= {"deployments.serve", "deployments.warm", "runpy", "_posixshmem"}


def test_the_runner_ends_its_flow_runs_at_exit_but_not_the_resource_tracker() -> None:
    # multiprocessing's resource tracker (started with the forkserver) ignores SIGTERM and
    # ends by itself when the runner exits: ending the runner's children must leave it
    # alone, or every stop of `memdump serve` waits ORPHAN_GRACE_SEC, then SIGKILLs it.
    code = (
        "import json, subprocess\n"
        "from deployments import serve, warm\n"
        "if __name__ == '__main__':\n"
        "    warm.install(['memdump.pipeline'])\n"
        "    (tracker,) = warm.helper_pids()\n"
        "    left = subprocess.Popen(['sleep', '300'])  # a flow run Prefect left\n"
        "    ended = serve.end_flow_runs()\n"
        "    print(json.dumps({'tracker': tracker, 'left': left.pid, 'ended': ended}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    seen = json.loads(out.stdout)
    assert seen["left"] in seen["ended"]
    assert seen["tracker"] not in seen["ended"], seen
