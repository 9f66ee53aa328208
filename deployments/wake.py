"""The runner's doorbell: under ``memdump serve`` the API rings it as soon as it has
created a trigger's flow run, and the runner (deployments.serve) asks Prefect for
scheduled runs at once instead of at its next poll (``runner_poll_sec``: 1 s with
Prefect's jitter, half a second of every trigger on average, measured 2026-11-30).

A ring is one datagram on an AF_UNIX socket in the data dir, mode 0600 (the owner only
can send to it). It carries nothing: whatever rings,
the runner only asks Prefect once more for what is due, and rings that come while it
asks are one more ask, not one each. The poll stays: a scheduled run (the weekly
deployment, a trigger's ``at``), a ring lost or a runner without the socket still start
at the next poll. Imports neither Prefect nor FastAPI: the API and the runner both use
it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

SOCKET_NAME = "runner.wake"
# sun_path holds 108 bytes with its NUL: a longer path cannot be bound or rung.
_MAX_PATH = 107

logger = logging.getLogger("memdump.runner")


def wake_path(data_dir: Path) -> Path:
    """Where the runner of the stack using ``data_dir`` listens."""
    return data_dir.resolve() / SOCKET_NAME


def ring(path: Path) -> bool:
    """Wake the runner listening at ``path``; never blocks. False if none listens (no
    socket: a worker set-up, or a runner of before), or its queue is full (it has
    rings enough to act on)."""
    try:  # a path too long for a socket is an OSError here too
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"\1", os.fsencode(path))
    except OSError:
        return False
    return True


class Doorbell:
    """The runner's end: bound at ``path`` (a stale socket of a runner killed before is
    replaced; anything else there is an error), removed by :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = os.fsencode(path)
        if len(raw) > _MAX_PATH:
            raise OSError(f"{path}: longer than an AF_UNIX socket path can be")
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(f"{path} exists and is not this user's socket: not replaced")
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(raw)
            # The owner only, whatever the umask (the runner's is 077 already).
            os.chmod(raw, 0o600)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    def _drain(self) -> int:
        n = 0
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return n
            n += 1

    async def answer(self, act: Callable[[], Awaitable[None]]) -> None:
        """Call ``act`` once after each ring, rings that came meanwhile taken as one;
        runs until cancelled. An error of ``act`` is logged, not raised: the poll is
        still there."""
        loop = asyncio.get_running_loop()
        rung = asyncio.Event()

        def readable() -> None:
            # Emptied here, not after ``act``: the loop's readiness is level-triggered, so a
            # ring left unread while ``act`` awaits would wake the loop again at once, for
            # as long as ``act`` takes.
            if self._drain():
                rung.set()

        loop.add_reader(self._sock.fileno(), readable)
        try:
            while True:
                await rung.wait()
                rung.clear()
                try:
                    await act()
                except Exception as exc:  # noqa: BLE001 - the next poll tries the same
                    logger.warning("looking for flow runs on a ring: %s", exc)
        finally:
            loop.remove_reader(self._sock.fileno())

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
