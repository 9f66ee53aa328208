"""Faults injected into real flow runs on the stack's Prefect server, against the lab:
an SSH session killed mid-stream, a hypervisor whose sshd is gone, and a flow-run
process killed mid-dump (then a restart that cleans up after it)."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.lab import assert_hypervisor_clean, extra_lab_vm, virsh
from tests.helpers.libvirt_live import live_dirs
from tests.helpers.procs import ancestor_below, cmdline, descendants, holders, lab_sshd_pid
from tests.helpers.stack import Stack, lab_inventory, running_stack

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
BASE = "/api/memory-dumps"


def _wait_for(what: Callable[[], Any], timeout: float, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _raw_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _kill_dump_session(vm: str) -> tuple[int, bool]:
    """SIGKILL the lab sshd's per-connection child that serves the dump of ``vm``: its pid,
    and whether that dump was a live capture (the script arms background-snapshot)."""
    master = lab_sshd_pid()
    for pid in descendants(master):
        line = cmdline(pid)
        if "mkfifo" in line and vm in line:
            session = ancestor_below(pid, master)
            assert session is not None
            os.kill(session, signal.SIGKILL)
            return session, "background-snapshot" in line
    raise AssertionError(f"no SSH session is dumping {vm}")


def _records(stack: Stack, vm: str) -> list[dict[str, Any]]:
    _, body = stack.call("GET", f"{BASE}/records?limit=1000")
    return [r for r in body["records"] if r["vmid"] == vm]


def test_ssh_session_killed_mid_stream_is_retried(
    flow_on_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memdump.chain as task_module
    from flows.capture import capture_vms

    vm, real_capture = "vm-db-01", task_module.capture
    attempts: list[int] = []

    def capture_with_a_cut(
        driver: Any, ref: Any, settings: Any, progress: Any = None, **kw: Any
    ) -> Any:
        attempts.append(1)

        def hook(done: int, total: int | None) -> None:
            if len(attempts) == 1 and done and not killed:
                killed.append(_kill_dump_session(vm))  # mid-stream: bytes arrived, more due
            if progress:
                progress(done, total)

        return real_capture(driver, ref, settings, progress=hook, **kw)

    killed: list[tuple[int, bool]] = []
    monkeypatch.setattr(task_module, "capture", capture_with_a_cut)
    dumps = flow_on_stack.data_dir / "dumps"
    before_files = set(dumps.glob("*")) if dumps.exists() else set()
    before_recs = _records(flow_on_stack, vm)

    state = capture_vms(vm_ids=[vm], source="test", return_state=True)

    assert killed and len(attempts) == 2, (killed, attempts)
    assert killed[0][1], "the lab captures live: the session cut was not a live capture's"
    assert state.is_completed(), state
    new_files = set(dumps.glob("*")) - before_files
    # One dump, its manifest, the manifest's signature and the custody log: no .part, no
    # second (truncated) dump. (The name's time has a "." too:
    # <hv>_<vmid>_<...>.123456Z_<random>.mem.gz; the signature's last two are json.sig.)
    suffixes = sorted(".".join(p.name.rsplit(".", 2)[1:]) for p in new_files)
    assert suffixes == ["custody.jsonl", "json.sig", "manifest.json", "mem.gz"]
    (path,) = [p for p in new_files if p.name.endswith(".mem.gz")]
    recs = _records(flow_on_stack, vm)
    assert len(recs) == len(before_recs) + 1
    (rec,) = [r for r in recs if r not in before_recs]
    assert rec["dump_path"] == str(path) and rec["sha256"] == _raw_sha256(path)
    assert (rec["capture_mode"], rec["live_fallback_reason"]) == ("live", "")
    assert_hypervisor_clean(vm)  # the cut capture's migration ended, nothing write-protected


def test_hypervisor_with_sshd_stopped_fails_after_bounded_retries(
    flow_on_stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import memdump.chain as task_module
    from flows.capture import capture_vms
    from tests.helpers.stack import free_port

    # The lab's hypervisor entry, on a port where no sshd listens any more: what a stopped
    # sshd looks like from the collector (connection refused).
    inv = Path(lab_inventory()).read_text()
    dead = re.sub(r"(?m)^(\s*port:\s*)\d+", rf"\g<1>{free_port()}", inv)
    assert dead != inv
    (tmp_path / "inventory.yaml").write_text(dead)
    monkeypatch.setenv("MEMDUMP_INVENTORY_FILE", str(tmp_path / "inventory.yaml"))
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__CAPTURE_RETRIES", "2")
    calls: list[int] = []
    real_open = task_module.open_driver

    def counting_open(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real_open(*a, **kw)

    monkeypatch.setattr(task_module, "open_driver", counting_open)
    t0 = time.monotonic()
    state = capture_vms(vm_ids=["vm-web-01"], source="test", return_state=True)
    elapsed = time.monotonic() - t0

    assert state.is_failed() and "1 of 1 VM(s) failed" in str(state.message), state
    assert len(calls) == 3  # the first try and two retries, no more
    assert elapsed < 90
    status = flow_on_stack.wait_status()
    assert status["status"] == "failed" and "cannot connect" in status["error"], status
    assert virsh("domstate", "vm-web-01").strip() == "running"  # never touched


CRASH_VM = "vm-crash-01"


@pytest.fixture
def crash_vm(lab_dir: Path) -> Iterator[str]:
    # 1 GiB: a few seconds of dump, time enough to kill the process that writes it.
    with extra_lab_vm(CRASH_VM, 1024) as name:
        yield name


def test_flow_run_killed_mid_dump_crashes_and_next_start_cleans(
    crash_vm: str, tmp_path: Path
) -> None:
    data, inv = tmp_path / "stack", lab_inventory()
    opts = {"capture_retries": "0", "cleanup_min_age_sec": "0"}
    with running_stack(data, inv, **opts) as st:
        code, _ = st.call("POST", f"{BASE}/trigger", {"vm_ids": [crash_vm]})
        assert code == 200
        part = _wait_for(lambda: next((data / "dumps").glob("*.part"), None), 120)
        writers = _wait_for(lambda: holders(part), 10)
        (writer,) = writers
        assert live_dirs(crash_vm), "the lab captures live: no live capture is running"
        assert writer in descendants(st.pid)  # the flow-run process of this stack
        os.kill(writer, signal.SIGKILL)
        status = st.wait_status()
        assert status["status"] == "error", status
        assert_hypervisor_clean(crash_vm)  # the SSH side went with the process
        assert part.exists()  # nobody was left to remove it
        assert _records(st, crash_vm) == []
    with running_stack(data, inv, **opts) as st:
        # Cleaned before the runner took any work; the service captures again at once.
        assert not part.exists() and list((data / "dumps").glob("*.part")) == []
        assert "left by a capture that never finished" in (data / "serve.log").read_text()
        code, _ = st.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01"]})
        assert code == 200
        assert st.wait_status()["status"] == "completed"
