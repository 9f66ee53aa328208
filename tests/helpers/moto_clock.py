"""A real moto S3 server (``moto.server``, in a subprocess, over HTTP) whose clock can be
moved forward: S3 Object Lock's retain-until dates are checked by moto against
``moto.core.utils.utcnow`` as ``moto.s3.models`` reads it, and a lock of whole days cannot
be waited out in a test. The server reads the offset (seconds) from a file on every
call, so a test moves S3's clock with :func:`advance`, not by sleeping; memdump is then
given the same moved clock (retention's ``now``), so both sides agree on the time.

    with moto_with_clock(tmp_path) as (endpoint_url, clock):
        advance(clock, days=2)
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from tests.helpers.moto import START_TIMEOUT_SEC, _answers, _free_port, stop

# Runs in the server process: moto's S3 clock = the real one + the file's offset.
_SERVER = """
import datetime, sys
from pathlib import Path
import moto.s3.models as models
from moto.core.utils import utcnow as real_utcnow
clock = Path(sys.argv.pop(1))
def utcnow():
    text = clock.read_text().strip() if clock.exists() else ""
    return real_utcnow() + datetime.timedelta(seconds=float(text or 0))
models.utcnow = utcnow
from moto.server import main
main(sys.argv[1:])
"""


def advance(clock: Path, *, days: float) -> None:
    """Move the server's clock to the real time + ``days`` (not cumulative)."""
    clock.write_text(str(timedelta(days=days).total_seconds()))


@contextlib.contextmanager
def moto_with_clock(tmp: Path) -> Iterator[tuple[str, Path]]:
    """Start the server on a free port on 127.0.0.1 (its clock file in ``tmp``), yield
    (endpoint URL, clock file), stop exactly that process at exit."""
    clock = tmp / "moto-clock"
    clock.write_text("0")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(clock), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start (exit {proc.poll()})")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", clock
    finally:
        stop(proc)
