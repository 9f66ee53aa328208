"""Start the whole stack as a user does (``memdump serve``) on free loopback ports with
its data in a given directory. Used by tests/e2e and benchmarks/trigger.py."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memdump.settings import LEGACY_NAMES, env_name
from tests.helpers.lab import lab_missing
from tests.helpers.services import start, stop, wait_http
from tests.helpers.signing import trust_local_key


def _env_var(name: str) -> str:
    """The environment variable of a setting given by its (flat) name."""
    if name in LEGACY_NAMES:
        return env_name(*LEGACY_NAMES[name])
    return f"MEMDUMP_{name.upper()}"


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    api: str
    prefect_api: str
    data_dir: Path
    env: dict[str, str]
    pid: int = 0  # of `memdump serve`
    # user:password of its Prefect server (memdump serve makes one under the data dir)
    prefect_auth: str = ""

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.api + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_status(self, timeout: float = 180, since: datetime | None = None) -> dict[str, Any]:
        """/status once final; with ``since`` (UTC), once the run it shows is due at or
        after it: a run started outside this API process (the scheduler, a flow run in
        the test's process) shows once the API's cache has read it (README "REST API")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = self.call("GET", "/api/memory-dumps/status")
            final = body["status"] not in ("in_progress", "idle")
            if final and (since is None or _due(body) >= since):
                return dict(body)
            time.sleep(0.2)
        raise AssertionError(f"status still {body} after {timeout}s")


def _due(status: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(status["timestamp"]).replace(tzinfo=UTC)


@functools.cache
def _prefect_template() -> Path:
    """The PREFECT_HOME of a Prefect server that has started once (its SQLite database
    migrated, its blocks registered) and stopped: made once per process. A new Prefect
    database spends about 15 s of a stack's start-up in migrations; a stack started on a
    copy of this one starts as `memdump serve` does on a machine where it ran before."""
    home = Path(tempfile.mkdtemp(prefix="memdump-prefect-template-"))
    atexit.register(shutil.rmtree, home, True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    prefect = str(Path(sys.executable).with_name("prefect"))
    log = home / "server.log"
    argv = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start(argv, log, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server, log)
    finally:
        stop(server)
    with sqlite3.connect(home / "prefect.db") as db:  # everything in the main file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return home


def seed_prefect_home(home: Path, db: Path | None = None) -> None:
    """``home`` (a Prefect server's PREFECT_HOME) and its database ``db`` (default
    home/prefect.db) as the template left them, if the database is new. A directory that
    does not exist yet is left for `memdump serve` to make (what a test of a first start
    checks): nothing is seeded then."""
    db = db or home / "prefect.db"
    if db.exists() or not home.parent.is_dir():
        return
    if db.parent != home and not db.parent.is_dir():
        return
    template = _prefect_template()
    home.mkdir(mode=0o700, exist_ok=True)
    dst = sqlite3.connect(db)
    try:
        with sqlite3.connect(template / "prefect.db") as src:
            src.backup(dst)
    finally:
        dst.close()
    db.chmod(0o600)
    memo = template / "memo_store.toml"  # the blocks registered: not registered again
    if memo.exists():
        shutil.copyfile(memo, home / "memo_store.toml")
        (home / "memo_store.toml").chmod(0o600)


@contextmanager
def running_stack(
    data: Path, inventory: str, *, seed_prefect: bool = True, **settings: str
) -> Iterator[Stack]:
    """``memdump serve`` with MEMDUMP_* ``settings``; stopped (SIGTERM) on exit.
    ``seed_prefect``: its own Prefect server starts on a copy of a database migrated
    once per process (seed_prefect_home); False: on a new one, as on a fresh machine."""
    api_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        MEMDUMP_DATA_DIR=str(data),
        MEMDUMP_DUMP_DIR=str(data / "dumps"),
        MEMDUMP_INVENTORY_FILE=inventory,
        MEMDUMP_API__PORT=str(api_port),
        MEMDUMP_ORCHESTRATION__PREFECT_PORT=str(prefect_port),
    )
    # Tests and benchmarks trigger back to back; the rate limit has its own tests.
    env["MEMDUMP_API__TRIGGER_MIN_INTERVAL_SEC"] = "0"
    # Grouped settings by their variables (MEMDUMP_API__PORT), not the old flat names.
    env.update({_env_var(k): v for k, v in settings.items()})
    data.mkdir(parents=True, exist_ok=True)
    if seed_prefect:
        seed_prefect_home(Path(env["MEMDUMP_DATA_DIR"]) / "prefect")
    # The stack's own collector key listed as trusted, as scripts/run does (issue 15).
    if "MEMDUMP_TRUSTED_KEYS" not in env:
        env["MEMDUMP_TRUSTED_KEYS"] = str(trust_local_key(data))
    logfile = data / "serve.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memdump.cli", "serve"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        st = Stack(
            f"http://127.0.0.1:{api_port}",
            f"http://127.0.0.1:{prefect_port}/api",
            data,
            env,
            proc.pid,
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("memdump serve exited:\n" + logfile.read_text()[-3000:])
                try:
                    urllib.request.urlopen(st.api + "/health", timeout=2).close()
                    auth = Path(env["MEMDUMP_DATA_DIR"]) / "prefect" / "auth-string"
                    st.prefect_auth = auth.read_text().strip()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            "memdump serve not up:\n" + logfile.read_text()[-3000:]
                        ) from None
                    time.sleep(0.3)
            yield st
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def lab_inventory() -> str:
    """The lab's inventory file; a missing lab fails the test (scripts/test brings it up)."""
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not inv:
        lab_missing()
    return inv
