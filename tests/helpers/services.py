"""Starting and stopping the stack's services as separate processes (a Prefect server, a
worker, the API), each leading its own session and stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx


def start(argv: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(  # noqa: S603 - the test's own argv
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw
        )


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    headers: dict[str, str] | None = None,
    timeout: float = 180,
) -> None:
    """Until ``url`` answers 2xx; fails with the log's tail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(url, headers=headers, timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not up:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.3)


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM its session (it leads one), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
