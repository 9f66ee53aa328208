"""Issue 11 item 8, the production set-up: a Prefect server with basic auth
(PREFECT_SERVER_API_AUTH_STRING) refuses what comes without the credential, and a
trigger through the API completes on a worker when the API, the worker and the
deploying client have it (PREFECT_API_AUTH_STRING). A separate Prefect server (SQLite)
on a free loopback port, the process work pool with prefect.yaml's deployments, one
worker (`python -m deployments.worker`), the API as its own process; one small lab VM.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers.services import start, stop, wait_http
from tests.helpers.stack import REPO, free_port, lab_inventory, seed_prefect_home

pytestmark = pytest.mark.lab

PREFECT = str(Path(sys.executable).parent / "prefect")


def _basic(cred: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(cred.encode()).decode()}


@dataclass
class Secured:
    prefect_api: str
    api: str
    cred: str
    client_env: dict[str, str]  # a client's environment without the credential
    base: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("prefect-auth")
    cred = "memdump:" + secrets.token_urlsafe(32)
    prefect_port, api_port = free_port(), free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEMDUMP_"))}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # A database migrated once per test run (tests/helpers/stack.py): not 15 s of
        # migrations again; what is tested here is the credential.
        seed_prefect_home(base / "server-home", base / "prefect.db")
        log = base / "prefect-server.log"
        server = start(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            log,
            env={
                **clean,
                "PREFECT_HOME": str(base / "server-home"),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                    f"sqlite+aiosqlite:///{base / 'prefect.db'}"
                ),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_AUTH_STRING": cred,
            },
        )
        procs.append(server)
        wait_http(f"{prefect_api}/health", server, log)  # health is open, for probes
        client_env = {
            **clean,
            "PREFECT_HOME": str(base / "client-home"),
            "PREFECT_API_URL": prefect_api,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "MEMDUMP_HOME": str(REPO),
            "MEMDUMP_DATA_DIR": str(base / "data"),
            "MEMDUMP_DUMP_DIR": str(base / "data" / "dumps"),
            "MEMDUMP_INVENTORY_FILE": lab_inventory(),
            "MEMDUMP_ANALYSIS__ENABLED": "false",
            "MEMDUMP_API__TRIGGER_MIN_INTERVAL_SEC": "0",
        }
        env = {**client_env, "PREFECT_API_AUTH_STRING": cred}
        for argv in (
            [PREFECT, "work-pool", "create", "memdump", "--type", "process"],
            [PREFECT, "--no-prompt", "deploy", "--all"],
        ):
            subprocess.run(argv, env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
        log = base / "worker.log"
        worker = start(
            [sys.executable, "-m", "deployments.worker", "--pool", "memdump", "--name", "c1"],
            log,
            cwd=REPO,
            env=env,
        )
        procs.append(worker)
        log = base / "api.log"
        api = start(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
             str(api_port)],
            log,
            cwd=REPO,
            env=env,
        )  # fmt: skip
        procs.append(api)
        wait_http(f"http://127.0.0.1:{api_port}/health", api, log)
        deadline = time.monotonic() + 120
        while True:  # the worker polls the pool before the trigger
            r = httpx.post(
                f"{prefect_api}/work_pools/memdump/workers/filter",
                json={},
                headers=_basic(cred),
                timeout=10,
            )
            if r.status_code == 200 and any(w["name"] == "c1" for w in r.json()):
                break
            assert worker.poll() is None, (base / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"worker not polling: {r.text}"
            time.sleep(0.5)
        yield Secured(prefect_api, f"http://127.0.0.1:{api_port}", cred, client_env, base)
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_requests_without_the_credential_are_refused(secured: Secured) -> None:
    for method, path in (
        ("POST", "/deployments/filter"),
        ("POST", "/flow_runs/filter"),
        ("GET", "/work_pools/memdump"),
        ("GET", "/admin/settings"),
    ):
        url = secured.prefect_api + path
        body = {} if method == "POST" else None
        assert httpx.request(method, url, json=body, timeout=30).status_code == 401, path
        wrong = _basic("memdump:" + secrets.token_urlsafe(32))
        r = httpx.request(method, url, json=body, headers=wrong, timeout=30)
        assert r.status_code == 401, path
        r = httpx.request(method, url, json=body, headers=_basic(secured.cred), timeout=30)
        assert r.status_code == 200, (path, r.text)
    # Prefect's own client without the credential is refused too: no deployment edit,
    # no run started from a collector or a laptop that lacks it.
    out = subprocess.run(
        [PREFECT, "deployment", "run", "capture-vms/on-demand", "--param", 'vm_ids=["all"]'],
        env=secured.client_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "401" in out.stdout + out.stderr, out.stdout + out.stderr
    r = httpx.post(
        f"{secured.prefect_api}/flow_runs/filter",
        json={"deployments": {"name": {"any_": ["on-demand"]}}},
        headers=_basic(secured.cred),
    )
    assert r.status_code == 200 and r.json() == []  # nothing was started


def test_trigger_completes_on_a_worker_with_the_credential(secured: Secured) -> None:
    t0 = datetime.now(UTC).replace(tzinfo=None)
    r = httpx.post(
        f"{secured.api}/api/memory-dumps/trigger", json={"vm_ids": ["vm-web-01"]}, timeout=30
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 300
    while True:
        st = httpx.get(f"{secured.api}/api/memory-dumps/status", timeout=30).json()
        if st["status"] not in ("in_progress", "idle"):
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert st["status"] == "completed", st
    recs = httpx.get(f"{secured.api}/api/memory-dumps/records", timeout=30).json()["records"]
    new = [x for x in recs if datetime.fromisoformat(x["timestamp"]) >= t0]
    assert [x["vmid"] for x in new] == ["vm-web-01"]
    assert Path(new[0]["dump_path"]).is_file()
    # It ran on the worker, which reached the server with the credential.
    assert "submitting flow run" in (secured.base / "worker.log").read_text(errors="replace")
