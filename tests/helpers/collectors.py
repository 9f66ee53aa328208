"""The production set-up of tests/e2e/test_collectors.py as context managers, for
benchmarks/fleet.py --collectors: Debian's PostgreSQL in a private cluster, a Prefect
server on it, the work pool "memdump" with prefect.yaml's deployments, two workers
(``python -m deployments.worker``) and the API as processes of their own, each leading its
own session and stopped by its pid (tests/helpers/services.py), with
MEMDUMP_ORCHESTRATION__FANOUT=deployments (a flow run per part of a trigger's VMs, any worker takes
it).

test_collectors.py keeps its own fixtures (a second sshd, its QEMU VMs, its crash tests);
the steps here are the same, over any inventory and settings.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.services import start, stop, wait_http
from tests.helpers.stack import REPO, _env_var, free_port

PREFECT = str(Path(sys.executable).parent / "prefect")


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300, **kw)


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (scripts/bootstrap installs it)")
    return found[-1].parent


@contextmanager
def postgres(base: Path) -> Iterator[tuple[str, int]]:
    """A private PostgreSQL cluster under ``base`` (which the postgres user must reach) on
    a free loopback port: (the Prefect database URL, the postmaster's pid)."""
    pg = pg_bin()
    data, sock = base / "pg", base / "pg-sock"
    for d in (data, sock):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    password = secrets.token_hex(16)
    pwfile = base / "pg-password"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, "postgres")
    pwfile.chmod(0o600)
    as_pg = ["runuser", "-u", "postgres", "--"]
    _run([*as_pg, str(pg / "initdb"), "-D", str(data), "-U", "prefect", "--pwfile", str(pwfile),
          "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"])  # fmt: skip
    pwfile.unlink()
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sock} -c fsync=off"
    _run([*as_pg, str(pg / "pg_ctl"), "-D", str(data), "-l", str(sock / "pg.log"), "-w",
          "-t", "120", "-o", opts, "start"])  # fmt: skip
    try:
        env = {**os.environ, "PGPASSWORD": password}
        _run([*as_pg, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
              "prefect"], env=env)  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect", pid
    finally:
        subprocess.run(
            [*as_pg, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            check=False,
            capture_output=True,
            timeout=120,
        )


@dataclass
class CollectorStack:
    api: str
    prefect_api: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]  # "prefect server", "api", each worker


@contextmanager
def collector_stack(
    base: Path,
    database_url: str,
    inventory: Path,
    settings: dict[str, str],
    workers: tuple[str, ...] = ("collector-a", "collector-b"),
    limit: int = 3,
) -> Iterator[CollectorStack]:
    """Prefect server on ``database_url``, the pool and its deployments, ``workers``
    (``--limit`` flow runs each; a run waiting for a capture slot holds a place, so keep
    it above the per-hypervisor cap) and the API, over ``inventory``, with the MEMDUMP_*
    ``settings`` by their flat names (as tests/helpers/stack.py running_stack takes them);
    every process stopped on exit."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        prefect_port, api_port = free_port(), free_port()
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEMDUMP_"))}
        env.update(
            PREFECT_HOME=str(base / "prefect-home"),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        log = base / "prefect-server.log"
        procs["prefect server"] = start(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            log,
            env=env,
        )
        wait_http(f"{prefect_api}/health", procs["prefect server"], log)
        env = {k: v for k, v in env.items() if not k.startswith("PREFECT_SERVER_")}
        env.update(
            PREFECT_API_URL=prefect_api,
            MEMDUMP_HOME=str(REPO),
            MEMDUMP_DATA_DIR=str(base / "data"),
            MEMDUMP_DUMP_DIR=str(base / "data" / "dumps"),
            MEMDUMP_INVENTORY_FILE=str(inventory),
            MEMDUMP_ORCHESTRATION__FANOUT="deployments",
            MEMDUMP_API__TRIGGER_MIN_INTERVAL_SEC="0",
            MEMDUMP_API__PORT=str(api_port),
        )
        env.update({_env_var(k): v for k, v in settings.items()})
        _run([PREFECT, "work-pool", "create", "memdump", "--type", "process"], env=env, cwd=REPO)
        _run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO)
        for name in workers:
            procs[name] = start(
                [sys.executable, "-m", "deployments.worker", "--pool", "memdump",
                 "--name", name, "--limit", str(limit)],
                base / f"{name}.log", cwd=REPO, env=env,
            )  # fmt: skip
        log = base / "api.log"
        procs["api"] = start(
            [sys.executable, "-m", "uvicorn", "api.main:app",
             "--host", "127.0.0.1", "--port", str(api_port)],
            log, cwd=REPO, env=env,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{api_port}/health", procs["api"], log)
        deadline = time.monotonic() + 120  # every worker polls the pool before a trigger
        while True:
            r = httpx.post(f"{prefect_api}/work_pools/memdump/workers/filter", json={}, timeout=10)
            if {w["name"] for w in r.json()} >= set(workers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not polling after 120 s: {r.text}")
            time.sleep(0.5)
        yield CollectorStack(f"http://127.0.0.1:{api_port}", prefect_api, env, procs)
    finally:
        for proc in reversed(list(procs.values())):
            stop(proc)
