"""The runner's doorbell (deployments.wake): the API's ring makes the runner look for
scheduled flow runs at once; rings that come together are one look; nothing but this
user's own socket is ever replaced."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from deployments.wake import Doorbell, ring, wake_path


async def _until(counted: list[int], n: int) -> None:
    """Until ``counted`` has ``n`` entries (at most 3 s: the assertions say what came)."""
    for _ in range(300):
        if len(counted) >= n:
            return
        await asyncio.sleep(0.01)


def _answering(bell: Doorbell, look: Any, script: Any) -> None:
    """``script()`` while the bell is answered with ``look``; the bell closed after."""

    async def main() -> None:
        answering = asyncio.create_task(bell.answer(look))
        try:
            await script()
        finally:
            answering.cancel()

    try:
        asyncio.run(main())
    finally:
        bell.close()


def test_nobody_listening_is_no_error(tmp_path: Path) -> None:
    assert ring(tmp_path / "runner.wake") is False
    assert ring(tmp_path / ("x" * 120)) is False  # longer than sun_path holds
    assert wake_path(tmp_path) == tmp_path.resolve() / "runner.wake"


def test_each_ring_is_a_look_and_rings_together_are_one(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path / "runner.wake")
    looks: list[int] = []

    async def look() -> None:
        looks.append(1)

    async def main() -> None:
        for _ in range(5):  # before anyone answers: taken as one
            assert ring(bell.path)
        answering = asyncio.create_task(bell.answer(look))
        for want in (1, 2, 3):
            for _ in range(200):
                await asyncio.sleep(0.01)
                if len(looks) == want:
                    break
            assert len(looks) == want
            assert ring(bell.path)
        await asyncio.sleep(0.2)
        answering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await answering

    try:
        asyncio.run(main())
    finally:
        bell.close()
    assert len(looks) == 4
    assert not (tmp_path / "runner.wake").exists()


def test_a_failed_look_is_logged_and_the_next_ring_still_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bell = Doorbell(tmp_path / "runner.wake")
    calls: list[int] = []

    async def look() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Prefect is away")

    async def script() -> None:
        ring(bell.path)
        await _until(calls, 1)
        ring(bell.path)
        await _until(calls, 2)

    _answering(bell, look, script)
    assert len(calls) == 2
    assert "Prefect is away" in caplog.text


def test_the_socket_is_the_owners_only_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "runner.wake"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))  # a runner killed before: its socket file is left
    stale.close()
    bell = Doorbell(path)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert ring(path)
    finally:
        bell.close()


@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_what_is_not_a_socket_is_never_replaced(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "runner.wake"
    target = tmp_path / "evidence.mem.gz"
    target.write_bytes(b"kept")
    if kind == "file":
        path.write_bytes(b"kept")
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()
    with pytest.raises(OSError, match="not replaced"):
        Doorbell(path)
    assert target.read_bytes() == b"kept"
    assert path.is_symlink() if kind == "symlink" else path.exists()


def test_a_ring_during_a_look_is_taken_at_once_not_left_to_wake_the_loop(
    tmp_path: Path,
) -> None:
    # Left unread while the look awaits Prefect, a ring keeps the socket readable, and the
    # event loop, woken by readiness again and again, spins for the whole look.
    bell = Doorbell(tmp_path / "runner.wake")
    looks: list[int] = []
    left: list[bool] = []

    def unread() -> bool:
        try:
            bell._sock.recv(64, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True

    async def look() -> None:
        looks.append(1)
        if len(looks) == 1:
            ring(bell.path)  # comes while this look waits for Prefect
            await asyncio.sleep(0.1)  # the loop runs meanwhile
            left.append(unread())

    async def script() -> None:
        ring(bell.path)
        await _until(looks, 2)

    _answering(bell, look, script)
    assert left == [False]
    assert len(looks) == 2  # the ring during the look is one more look
