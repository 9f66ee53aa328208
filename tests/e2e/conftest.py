"""The whole stack as a user runs it: ``memdump serve`` (Prefect server + runner + API)
against the lab, on free loopback ports, with its data in a temp dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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

    def wait_status(self, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = self.call("GET", "/api/memory-dumps/status")
            if body["status"] not in ("in_progress", "idle"):
                return dict(body)
            time.sleep(0.5)
        raise AssertionError(f"status still {body} after {timeout}s")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not inv:
        pytest.fail("the lab is not up: run lab/up and source .lab/env (scripts/test does)")
    data = tmp_path_factory.mktemp("stack")
    api_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        MEMDUMP_DATA_DIR=str(data),
        MEMDUMP_DUMP_DIR=str(data / "dumps"),
        MEMDUMP_INVENTORY_FILE=inv,
        MEMDUMP_API_PORT=str(api_port),
        MEMDUMP_PREFECT_PORT=str(prefect_port),
        # One capture at a time per hypervisor, so a test can see the limit hold.
        MEMDUMP_MAX_CAPTURES_PER_HYPERVISOR="1",
        MEMDUMP_CAPTURE_RETRY_DELAY_SEC="1",
    )
    log = open(data / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "memdump.cli", "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    st = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prefect_port}/api", data, env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (data / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(st.api + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError((data / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield st
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
