"""``memdump serve``: the whole stack on embedded defaults, as child processes.

A Prefect server on SQLite under ``<data_dir>/prefect`` (unless PREFECT_API_URL points
at one), the runner serving the deployments, and the API on 127.0.0.1:8000. Ctrl-C or
SIGTERM stops them in reverse order. The engine imports neither Prefect nor FastAPI:
they run in their own processes.
"""

from __future__ import annotations

import json
import os
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

from memdump.errors import ConfigError
from memdump.settings import Settings


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait_url(
    url: str,
    proc: subprocess.Popen[bytes],
    what: str,
    timeout: float,
    ready: Callable[[Any], bool] = lambda _body: True,
) -> None:
    """Wait for a 200 from ``url`` whose JSON body passes ``ready``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own URL
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


def prefect_env(settings: Settings) -> tuple[dict[str, str], bool]:
    """Environment for the children; True if we must start our own Prefect server."""
    env = dict(os.environ)
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", str(settings.runner_poll_sec))
    if env.get("PREFECT_API_URL"):
        return env, False
    home = (settings.data_dir / "prefect").resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home}/prefect.db"
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{settings.prefect_port}/api"
    return env, True


def serve(settings: Settings) -> int:
    env, own_server = prefect_env(settings)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stop = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(name: str, argv: list[str], nice: int = 0) -> subprocess.Popen[bytes]:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
        if nice:
            argv = ["nice", "-n", str(nice), *argv]  # nice(1) execs: the pid stays the child's
        p = subprocess.Popen(argv, env=env, start_new_session=True)  # noqa: S603 - fixed argv
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
                    str(settings.prefect_port),
                ],
            )
            _wait_url(env["PREFECT_API_URL"] + "/health", server, "Prefect server", 120)
        runner_started = datetime.now(UTC)
        runner = start(
            "runner",
            [sys.executable, "-m", "deployments.serve"] + (["--reset-slots"] if own_server else []),
        )
        # The API starts once this runner polls the deployment it triggers: the deployment
        # exists (a trigger never fails) and the runner's start-up clean-up of what a killed
        # capture left is done (a deployment kept from an earlier run would not say that).
        deployment_url = (
            f"{env['PREFECT_API_URL']}/deployments/name/{settings.flow_name}/{settings.deployment}"
        )
        _wait_url(deployment_url, runner, "runner", 120, lambda d: _polled_since(d, runner_started))
        start(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                settings.api_host,
                "--port",
                str(settings.api_port),
            ],
            # A paused guest is someone's downtime: on a shared machine its dump gets the
            # CPU before the API's readers do.
            nice=settings.api_nice,
        )
        print(
            f"memdump serve: API on http://{settings.api_host}:{settings.api_port}"
            f"/api/memory-dumps, Prefect UI at {env['PREFECT_API_URL'][:-4]}",
            flush=True,
        )
        while not stop:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"memdump serve: {name} exited with {p.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        for _name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
