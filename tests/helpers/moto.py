"""A real moto S3 server in a subprocess (``moto_server``), for tests that need a live
S3 endpoint over HTTP rather than moto's in-process mock.

    with running_moto() as endpoint_url:
        boto3.client("s3", endpoint_url=endpoint_url, ...)

The server listens on 127.0.0.1 on a free port and is stopped (exactly that process, by
its PID) when the block ends.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

START_TIMEOUT_SEC = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _command(port: int) -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/moto-api/")
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop this one server process (by its PID) and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def running_moto_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like :func:`running_moto`, also yielding the process (to stop it mid-test)."""
    deadline = time.monotonic() + START_TIMEOUT_SEC
    with tempfile.TemporaryFile() as log:
        while True:
            port = _free_port()
            proc = subprocess.Popen(
                _command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            try:
                while proc.poll() is None and not _answers(port):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"moto_server did not answer in {START_TIMEOUT_SEC}s")
                    time.sleep(0.1)
            except BaseException:
                stop(proc)
                raise
            if proc.poll() is None:
                break
            # it exited (the port was taken meanwhile?): try another port while time is left
            if time.monotonic() > deadline:
                log.seek(0)
                out = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{out}")
        try:
            yield f"http://127.0.0.1:{port}", proc
        finally:
            stop(proc)


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """Start ``moto_server`` on a free port, wait (< 15 s) until it answers, yield its
    endpoint URL and stop that process at exit."""
    with running_moto_process() as (url, _):
        yield url


def new_bucket(endpoint_url: str, prefix: str) -> tuple[Any, str]:
    """A boto3 S3 client for the moto server and a new bucket of a unique name there."""
    import uuid

    import boto3

    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    client.create_bucket(Bucket=bucket)
    return client, bucket
