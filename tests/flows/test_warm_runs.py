"""deployments.warm: the runner's flow runs forked from a forkserver that has imported
Prefect and memdump already, each still in a process of its own."""

from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import prefect.flow_engine as flow_engine
import pytest

from deployments import warm
from tests.helpers.warm_flow import where_am_i


@pytest.fixture
def warm_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(flow_engine, "multiprocessing", flow_engine.multiprocessing)
    pid = warm.install(["prefect.flow_engine", "tests.helpers.warm_flow", "memdump.pipeline"])
    try:
        yield pid
    finally:
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]


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
