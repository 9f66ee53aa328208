"""A child process's stdout as a ByteStream: used by the local transport and by the
OpenSSH client transport for dump streams."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO

from memdump.errors import (
    CommandTimeoutError,
    OutputTooLargeError,
    StreamInterruptedError,
    StreamStalledError,
    TransportError,
)
from memdump.transport.base import CommandResult

_READ_SIZE = 4 << 20
# Linux pipes hold 64 KiB by default: every read would hand Python 64 KiB at most, and
# the per-chunk cost of the pipeline dominates. 1 MiB is the default pipe-max-size.
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# The most of a dump stream's stderr kept (its end).
STDERR_TAIL = 1 << 20

ExitCheck = Callable[[int, bytes], None]


def run_capped(
    argv: Sequence[str],
    *,
    timeout: float,
    max_stdout: int,
    max_stderr: int,
    what: str,
    stdin: bytes = b"",
) -> CommandResult:
    """Run ``argv`` to completion, as the SSH transport's run(): the deadline is checked on
    every turn and stdout/stderr are capped; past either the whole process group is
    killed and OutputTooLargeError / CommandTimeoutError raised."""
    try:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, values as separate arguments
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a runaway command's children go with it
        )
    except OSError as exc:
        raise TransportError(f"{what}: cannot run command: {exc}", op="run") from exc
    _feed(proc, stdin)
    assert proc.stdout is not None and proc.stderr is not None  # noqa: S101 - PIPEs
    out, err = bytearray(), bytearray()
    streams = {
        proc.stdout.fileno(): (out, "stdout", max_stdout),
        proc.stderr.fileno(): (err, "stderr", max_stderr),
    }
    poll = select.poll()
    for fd in streams:
        poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    open_fds = set(streams)
    deadline = time.monotonic() + timeout
    try:
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeoutError(
                    f"{what}: command did not finish within {timeout:.0f}s",
                    host=what,
                    op="run",
                    timeout=timeout,
                )
            for fd, _ev in poll.poll(min(remaining, 1.0) * 1000):
                buf, stream, cap = streams[fd]
                data = os.read(fd, max(1, min(1 << 20, cap + 1 - len(buf))))
                if not data:
                    poll.unregister(fd)
                    open_fds.discard(fd)
                    continue
                buf += data
                if len(buf) > cap:
                    raise OutputTooLargeError(
                        f"{what}: command wrote more than {cap} bytes to {stream}; stopped",
                        host=what,
                        op="run",
                        stream=stream,
                        limit=cap,
                    )
        rc = proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise CommandTimeoutError(
            f"{what}: command did not finish within {timeout:.0f}s",
            host=what,
            op="run",
            timeout=timeout,
        ) from exc
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    return CommandResult(rc, bytes(out), bytes(err))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    """Write ``data`` (a few bytes: it fits the pipe) to the child's stdin and close it."""
    if proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError):  # the child is gone: its exit says why
        proc.stdin.write(data)
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()


def start_stream(
    argv: Sequence[str],
    *,
    stall: float,
    what: str,
    check_exit: ExitCheck | None = None,
    stdin: bytes = b"",
) -> ProcessByteStream:
    err = tempfile.TemporaryFile()  # stderr to a file: a full stderr pipe cannot block it
    try:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, values as separate arguments
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # so abort() can signal the whole group
        )
    except OSError as exc:
        err.close()
        raise TransportError(f"{what}: cannot start {argv[0]}: {exc}", op="stream") from exc
    _feed(proc, stdin)
    return ProcessByteStream(proc, err, stall, what, check_exit)


class ProcessByteStream:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        err: IO[bytes],
        stall: float,
        what: str,
        check_exit: ExitCheck | None,
    ) -> None:
        self._proc = proc
        self._err = err
        self._stall = stall
        self._what = what
        self._check_exit = check_exit
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        self._fd = proc.stdout.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def _wait_readable(self) -> None:
        if not self._poll.poll(self._stall * 1000):
            raise StreamStalledError(f"{self._what}: no data for {self._stall:.0f}s", op="stream")

    def read(self) -> bytes:
        self._wait_readable()
        try:
            return os.read(self._fd, _READ_SIZE)
        except OSError as exc:
            raise StreamInterruptedError(f"{self._what}: read failed: {exc}", op="stream") from exc

    def readinto(self, view: memoryview) -> int:
        self._wait_readable()
        try:
            return os.readv(self._fd, [view])
        except (OSError, ValueError) as exc:  # ValueError: fd closed by abort()
            raise StreamInterruptedError(f"{self._what}: read failed: {exc}", op="stream") from exc

    def finish(self, timeout: float) -> CommandResult:
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.abort()
            raise StreamInterruptedError(
                f"{self._what}: command did not exit within {timeout:.0f}s after the stream ended",
                op="stream",
            ) from exc
        # Its tail only (what the scripts report comes last): a peer that floods stderr
        # during a dump must not fill the collector's memory.
        size = self._err.seek(0, os.SEEK_END)
        self._err.seek(max(0, size - STDERR_TAIL))
        stderr = self._err.read()
        self._close()
        if rc < 0:
            raise StreamInterruptedError(
                f"{self._what}: command killed by signal {-rc}",
                op="stream",
                stderr=stderr.decode("utf-8", "replace")[-2000:],
            )
        if self._check_exit is not None:
            self._check_exit(rc, stderr)
        return CommandResult(rc, b"", stderr)

    def abort(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._err.close()
