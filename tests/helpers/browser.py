"""A real browser with no network beyond loopback, for tests of what the API shows a
person (its /docs): Debian's ``chromium`` headless (scripts/bootstrap installs it), run
in a network namespace of its own, shared only with the API it looks at.

The namespace has nothing but ``lo``: no route, no DNS, so a page that reaches for a
CDN gets nothing, as on a forensic network without internet access. On top of that the
browser is told to resolve no name and to send anything that is not loopback to a
closed proxy port, so even outside a namespace nothing would leave the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.stack import REPO

CHROMIUM = "chromium"
BROWSER_TIMEOUT_SEC = 90.0  # a hung browser is killed (its process group) past this
START_TIMEOUT_SEC = 60.0
API_PORT = 8000  # the namespace is ours: the default port is free there

# What keeps the browser on loopback, beyond the namespace: no name resolves (but the
# loopback address), and whatever is not loopback goes to a closed port as its proxy.
OFFLINE_FLAGS = (
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
# Headless, as root (no sandbox then), and none of the browser's own background traffic.
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)


def chromium() -> str:
    """Debian's chromium; missing is a failure (scripts/bootstrap installs it)."""
    import pytest

    found = shutil.which(CHROMIUM)
    if found is None:
        pytest.fail("chromium is not installed: run scripts/bootstrap (scripts/test does)")
    return found


@dataclass
class OfflineAPI:
    """``uvicorn api.main:app`` alone in a network namespace with only loopback."""

    pid: int  # the API process; its namespace is the one the browser joins
    url: str
    log: Path

    def dump_dom(self, path: str, profile: Path, budget_ms: int = 20000) -> str:
        """The page's DOM once its scripts have run (``--dump-dom`` after
        ``budget_ms`` of virtual time), loaded by chromium inside this namespace."""
        argv = [
            "nsenter",
            f"--net=/proc/{self.pid}/ns/net",
            "--",
            chromium(),
            *BROWSER_FLAGS,
            *OFFLINE_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            self.url + path,
        ]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: ended with all its children
        )
        try:
            out, err = proc.communicate(timeout=BROWSER_TIMEOUT_SEC)
        finally:
            end_group(proc)
        if proc.returncode != 0:
            raise AssertionError(f"chromium exited {proc.returncode}: {err.decode()[-2000:]}")
        return out.decode()


def end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of ``proc``'s process group (it leads one: start_new_session),
    by its pid: the browser's renderer and helper processes go with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def offline_api(data: Path, **env: str) -> Iterator[OfflineAPI]:
    """The API (``uvicorn api.main:app``, as ``memdump serve`` starts it) in a new network
    namespace whose only interface is loopback; stopped by its pid on exit."""
    data.mkdir(parents=True, exist_ok=True)
    log = data / "api.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMDUMP_", "PREFECT_"))}
    child_env.update(MEMDUMP_DATA_DIR=str(data), MEMDUMP_DUMP_DIR=str(data / "dumps"), **env)
    # unshare execs the shell, which brings lo up and execs uvicorn: one pid throughout.
    argv = [
        "unshare",
        "--net",
        "--",
        "sh",
        "-c",
        'ip link set lo up && exec "$@"',
        "sh",
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(API_PORT),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Outside the namespace nothing can reach it: uvicorn's own line says it listens.
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while "Uvicorn running on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.2)
        yield OfflineAPI(proc.pid, f"http://127.0.0.1:{API_PORT}", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
