"""A real ``memdump serve`` on the lab (issue 11 items 8, 13, 16): its own Prefect server
listens on 127.0.0.1 only and refuses requests without its credential; everything it
creates under a data dir whose parents do not exist yet is private (directories 0700,
files 0600) though it was started under umask 022; SIGKILLed, its children (Prefect
server, runner, API) die with it and free their ports; a port already held is reported
with the port and the holder's pid before anything starts.

One stack for the module (one small lab VM captured once); the SIGKILL test runs last
and ends it.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers.lab import virsh
from tests.helpers.listeners import hold_port, listening, port_free, socket_owners
from tests.helpers.procs import cmdline, descendants
from tests.helpers.stack import REPO, Stack, free_port, lab_inventory, running_stack

pytestmark = pytest.mark.lab

BASE = "/api/memory-dumps"


@dataclass
class Served:
    stack: Stack
    created: Path  # the first directory memdump serve had to create
    prefect_port: int
    api_port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("serve-lifecycle")
    data = base / "srv" / "var" / "memdump"  # none of these exist yet
    old = os.umask(0o022)  # a shell's or a service manager's: memdump must not rely on it
    try:
        cm = running_stack(
            base / "harness",
            lab_inventory(),
            seed_prefect=False,  # a first start: memdump serve makes every directory
            data_dir=str(data),
            dump_dir=str(data / "dumps"),
            analysis="false",
        )
        st = cm.__enter__()
    finally:
        os.umask(old)
    try:
        yield Served(
            st,
            base / "srv",
            int(urlsplit(st.prefect_api).port or 0),
            int(urlsplit(st.api).port or 0),
        )
    finally:
        cm.__exit__(None, None, None)


def _basic(cred: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(cred.encode()).decode()}


def test_own_prefect_server_listens_on_loopback_only(served: Served) -> None:
    socks = listening(served.prefect_port)
    assert socks and {addr for addr, _ in socks} == {"127.0.0.1"}, socks
    tree = set(descendants(served.stack.pid))
    for _, inode in socks:
        owners = socket_owners(inode)
        assert owners and set(owners) <= tree, (owners, [cmdline(p) for p in owners])
        assert any("prefect" in cmdline(p) and "server" in cmdline(p) for p in owners)


def test_own_prefect_server_refuses_requests_without_its_credential(served: Served) -> None:
    url = served.stack.prefect_api + "/deployments/filter"
    assert httpx.post(url, json={}, timeout=30).status_code == 401
    wrong = _basic("memdump:" + "x" * 43)
    assert httpx.post(url, json={}, headers=wrong, timeout=30).status_code == 401
    ok = httpx.post(url, json={}, headers=_basic(served.stack.prefect_auth), timeout=30)
    assert ok.status_code == 200 and ok.json(), ok.text
    cred = served.created / "var" / "memdump" / "prefect" / "auth-string"
    assert cred.read_text().strip() == served.stack.prefect_auth
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600


def test_everything_created_is_private_after_a_capture(served: Served) -> None:
    st = served.stack
    code, body = st.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01"]})
    assert code == 200, body
    status = st.wait_status()
    assert status["status"] == "completed", status
    data = served.created / "var" / "memdump"
    dumps = sorted((data / "dumps").rglob("*.mem.gz"))
    manifests = sorted((data / "dumps").rglob("*.manifest.json"))
    named = [data / "records.db", data / "outbox.db", *dumps, *manifests]
    assert dumps and manifests, sorted(data.rglob("*"))
    for f in named:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    # Every directory memdump serve (or Prefect under it) created, from the first
    # missing parent down, is 0700; no file anywhere is readable by group or others.
    seen = [served.created, *served.created.rglob("*")]
    for p in seen:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if p.is_dir():
            assert mode == 0o700, (p, oct(mode))
        else:
            assert mode & 0o077 == 0, (p, oct(mode))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _runner(serve_pid: int) -> int:
    found = [p for p in descendants(serve_pid) if "deployments.serve" in cmdline(p)]
    assert len(found) == 1, found
    return found[0]


def test_sigkilled_serve_takes_its_children_and_frees_the_ports(served: Served) -> None:
    pid = served.stack.pid
    # With a capture in flight: its flow-run process (the runner's child, in a session
    # of its own) must go too.
    runner = _runner(pid)
    code, body = served.stack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01"]})
    assert code == 200, body
    deadline = time.monotonic() + 120
    while not descendants(runner):
        assert time.monotonic() < deadline, "no flow-run process started"
        time.sleep(0.05)
    children = descendants(pid)
    names = " | ".join(cmdline(p) for p in children)
    assert "prefect server start" in names and "deployments.serve" in names, names
    assert "api.main:app" in names, names
    os.kill(pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + 60  # a bound for a failing run, not a measurement
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [(p, cmdline(p)) for p in children if _alive(p)]
        assert left == [], f"orphans of a SIGKILLed memdump serve: {left}"
        assert port_free(served.prefect_port) and port_free(served.api_port)
        # The guest whose dump was cut runs again.
        deadline = time.monotonic() + 60
        while virsh("domstate", "vm-web-01").strip() != "running":
            assert time.monotonic() < deadline, virsh("domstate", "vm-web-01")
            time.sleep(0.2)
    finally:
        for p in children:  # this test's own leftovers, by pid, so later tests start clean
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _serve_env(data: Path, prefect_port: int, api_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        MEMDUMP_DATA_DIR=str(data),
        MEMDUMP_DUMP_DIR=str(data / "dumps"),
        MEMDUMP_INVENTORY_FILE=lab_inventory(),
        MEMDUMP_API__PORT=str(api_port),
        MEMDUMP_ORCHESTRATION__PREFECT_PORT=str(prefect_port),
    )
    return env


@pytest.mark.parametrize("busy", ["prefect", "api"])
def test_busy_port_is_reported_with_its_holder_before_starting(busy: str, tmp_path: Path) -> None:
    prefect_port, api_port = free_port(), free_port()
    held = prefect_port if busy == "prefect" else api_port
    holder = hold_port(held)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memdump.cli", "serve"],
            cwd=REPO,
            env=_serve_env(tmp_path / "data", prefect_port, api_port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = (out + err).decode(errors="replace")
        assert proc.returncode != 0, text
        assert f"port {held}" in text and f"pid {holder.pid}" in text, text
        # Reported before starting anything: no child was started.
        assert "started" not in text, text
    finally:
        holder.kill()
        holder.wait()
