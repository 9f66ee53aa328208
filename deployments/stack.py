"""``memdump serve``: the whole stack on embedded defaults, as child processes.

Process supervision of the layers above the engine lives here, not in memdump/: the
engine names nothing above it. The ``memdump`` CLI finds this command through the
``memdump.commands`` entry-point group (pyproject.toml).

A Prefect server on SQLite under ``<data_dir>/prefect`` bound to 127.0.0.1 with basic
auth (unless PREFECT_API_URL points at one), the runner serving the deployments, and the
API on 127.0.0.1:8000. Ctrl-C or SIGTERM stops them in reverse order, each within a
bounded time (STOP_GRACE_SEC). This module imports neither Prefect nor FastAPI (the CLI
loads it for every command): they run in their own processes.

Children die with this process even when it is SIGKILLed (the OOM killer, a
supervisor's timeout): each gets SIGTERM from the kernel (PR_SET_PDEATHSIG, see
memdump.children), so no orphaned Prefect server keeps the port for the next start.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from memdump.children import (
    become_subreaper,
    check_port_free,
    end_adopted,
    popen_dying_with_parent,
    reap_adopted,
)
from memdump.errors import ConfigError
from memdump.fsperm import private_dir, private_umask
from memdump.settings import Settings
from memdump.targets import require_hypervisors

# Seconds each child gets after SIGTERM before SIGKILL, in stop order. The runner's is
# the long one: on SIGTERM Prefect's runner cancels its in-flight flow runs one after the
# other (SIGTERM to each run's process group, then polling every 3 s for it to go, up to
# 30 s each, Prefect 3.9), so N runs in flight take N x (up to 3 s) and one stuck run 30
# s; past this the runner is killed and the flow runs it leaves (they become ours, as a
# subreaper) get SIGTERM, then SIGKILL after ORPHAN_GRACE_SEC. A stop is thus bounded by
# the sum: 10 + 45 + 10 + 5 = 70 s.
STOP_GRACE_SEC = {"api": 10.0, "runner": 45.0, "prefect server": 10.0}
ORPHAN_GRACE_SEC = 5.0
AUTH_FILE = "auth-string"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _auth_header(env: dict[str, str]) -> dict[str, str]:
    auth = env.get("PREFECT_API_AUTH_STRING")
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def _wait_url(
    url: str,
    proc: subprocess.Popen[bytes],
    what: str,
    timeout: float,
    ready: Callable[[Any], bool] = lambda _body: True,
    headers: dict[str, str] | None = None,
) -> None:
    """Wait for a 200 from ``url`` whose JSON body passes ``ready``."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - our own URL
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - our own URL
                if resp.status == 200 and ready(json.loads(resp.read() or b"null")):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise ConfigError(f"{what} not ready at {url} after {timeout:.0f}s")


def _polled_since(deployment: Any, since: datetime) -> bool:
    polled = deployment.get("last_polled") if isinstance(deployment, dict) else None
    if not polled:
        return False
    return datetime.fromisoformat(str(polled).replace("Z", "+00:00")) >= since


def own_auth_string(home: Path) -> str:
    """The basic-auth credential of the Prefect server we start: kept in
    ``<home>/auth-string`` (0600), made once (``memdump:`` + 256 random bits)."""
    path = home / AUTH_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if not value:
            raise ConfigError(f"{path} is empty: remove it to get a new credential") from None
        return value
    value = "memdump:" + secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def prefect_env(settings: Settings) -> tuple[dict[str, str], bool]:
    """Environment for the children; True if we must start our own Prefect server."""
    env = dict(os.environ)
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", str(settings.orchestration.runner_poll_sec))
    if env.get("PREFECT_API_URL"):
        return env, False
    home = private_dir(settings.data_dir / "prefect").resolve()
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home}/prefect.db"
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{settings.orchestration.prefect_port}/api"
    # Even on loopback the server needs a credential: any local user reaching the port
    # could edit a deployment (its pull steps run commands) or start retention. One
    # given by the operator wins; else ours, kept under the data dir.
    auth = (
        env.get("PREFECT_API_AUTH_STRING")
        or env.get("PREFECT_SERVER_API_AUTH_STRING")
        or own_auth_string(home)
    )
    env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"] = auth
    return env, True


def serve(settings: Settings) -> int:
    private_umask()
    settings.check_api_exposure()  # before anything starts: no token off loopback
    # Before anything starts: an empty inventory would make every capture an empty one.
    require_hypervisors(settings, "memdump serve refuses to start without one")
    env, own_server = prefect_env(settings)
    # A busy port is named with its holder now, not as "prefect server exited with 1"
    # after a minute of start-up.
    if own_server:
        check_port_free(
            "127.0.0.1",
            settings.orchestration.prefect_port,
            "Prefect server",
            "MEMDUMP_ORCHESTRATION__PREFECT_PORT",
        )
    check_port_free(settings.api.host, settings.api.port, "API", "MEMDUMP_API__PORT")
    become_subreaper()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stop = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(name: str, argv: list[str], nice: int = 0) -> subprocess.Popen[bytes]:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
        # PDEATHSIG: they get SIGTERM if we die without stopping them.
        if nice:
            argv = ["nice", "-n", str(nice), *argv]  # nice(1) execs: the pid stays the child's
        p = popen_dying_with_parent(argv, env=env, start_new_session=True)
        procs.append((name, p))
        print(f"memdump serve: started {name} (pid {p.pid})", flush=True)
        return p

    try:
        if own_server:
            server = start(
                "prefect server",
                [
                    _bin("prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(settings.orchestration.prefect_port),
                ],
            )
        runner_started = datetime.now(UTC)
        # Beside the server, not after it: the runner's imports and its clean-up (SSH) run
        # while the server starts; it waits for the server's API itself before using it.
        runner = start(
            "runner",
            [sys.executable, "-m", "deployments.serve", "--exit-with-parent"]
            + (["--reset-slots"] if own_server else []),
        )
        if own_server:
            _wait_url(env["PREFECT_API_URL"] + "/health", server, "Prefect server", 120)
        # The API starts once this runner polls the deployment it triggers: the deployment
        # exists (a trigger never fails) and the runner's start-up clean-up of what a killed
        # capture left is done (a deployment kept from an earlier run would not say that).
        orch = settings.orchestration
        deployment_url = (
            f"{env['PREFECT_API_URL']}/deployments/name/{orch.flow_name}/{orch.deployment}"
        )
        _wait_url(
            deployment_url,
            runner,
            "runner",
            120,
            lambda d: _polled_since(d, runner_started),
            headers=_auth_header(env),
        )
        start(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                settings.api.host,
                "--port",
                str(settings.api.port),
            ],
            # A paused guest is someone's downtime: on a shared machine its dump gets the
            # CPU before the API's readers do.
            nice=settings.api.nice,
        )
        ui = env["PREFECT_API_URL"][:-4]
        if own_server:
            ui += f" (user:password in {Path(env['PREFECT_HOME']) / AUTH_FILE})"
        print(
            f"memdump serve: API on http://{settings.api.host}:{settings.api.port}"
            f"/api/memory-dumps, Prefect UI at {ui}",
            flush=True,
        )
        ours = {p.pid for _, p in procs}
        while not stop:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"memdump serve: {name} exited with {p.returncode}", file=sys.stderr)
                    return 1
            reap_adopted(ours)
            time.sleep(0.5)
        return 0
    finally:
        for name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(STOP_GRACE_SEC.get(name, 10.0))
                except subprocess.TimeoutExpired:
                    print(f"memdump serve: {name} still running, killed", file=sys.stderr)
                    p.kill()
                    p.wait()
        # Flow runs of a runner that was killed, or anything else left to us.
        left = end_adopted(set(), ORPHAN_GRACE_SEC)
        if left:
            print(f"memdump serve: ended {len(left)} leftover process(es)", file=sys.stderr)


def cmd_serve(settings: Settings, _args: argparse.Namespace) -> int:
    return serve(settings)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``memdump serve``: a ``memdump.commands`` entry point of the ``memdump`` CLI."""
    sub.add_parser(
        "serve", help="run Prefect server + runner + API (embedded defaults)"
    ).set_defaults(handler=cmd_serve)
