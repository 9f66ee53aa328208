"""Local transport: the same scripts through a subprocess, for a collector that runs on
the hypervisor itself. No shell parses request data: values are positional arguments."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO

from memdump.errors import StreamInterruptedError, StreamStalledError, TransportError
from memdump.transport.base import CommandResult, sh_command

_READ_SIZE = 4 << 20


class LocalTransport:
    description = "local"

    def __init__(self, stall_timeout: float = 120.0) -> None:
        self._stall = stall_timeout

    def run(self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0) -> CommandResult:
        try:
            proc = subprocess.run(  # noqa: S603 - fixed script, values as argv, no shell parsing
                sh_command(script, args),
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"local command did not finish within {timeout:.0f}s", op="run"
            ) from exc
        except OSError as exc:
            raise TransportError(f"cannot run local command: {exc}", op="run") from exc
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def stream(self, script: str, args: Sequence[str] = ()) -> _LocalByteStream:
        err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the stream
        try:
            proc = subprocess.Popen(  # noqa: S603 - fixed script, values as argv
                sh_command(script, args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # so abort() can signal the whole group
            )
        except OSError as exc:
            err.close()
            raise TransportError(f"cannot run local command: {exc}", op="stream") from exc
        return _LocalByteStream(proc, err, self._stall)

    def close(self) -> None:
        pass


class _LocalByteStream:
    def __init__(self, proc: subprocess.Popen[bytes], err: IO[bytes], stall: float) -> None:
        self._proc = proc
        self._err = err
        self._stall = stall
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        self._fd = proc.stdout.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def read(self) -> bytes:
        if not self._poll.poll(self._stall * 1000):
            raise StreamStalledError(f"local: no data for {self._stall:.0f}s", op="stream")
        try:
            return os.read(self._fd, _READ_SIZE)
        except OSError as exc:
            raise StreamInterruptedError(f"local: read failed: {exc}", op="stream") from exc

    def finish(self, timeout: float) -> CommandResult:
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.abort()
            raise StreamInterruptedError(
                f"local: command did not exit within {timeout:.0f}s after the stream ended",
                op="stream",
            ) from exc
        self._err.seek(0)
        stderr = self._err.read()
        self._close()
        if rc < 0:
            raise StreamInterruptedError(
                f"local: command killed by signal {-rc}",
                op="stream",
                stderr=stderr.decode("utf-8", "replace")[-2000:],
            )
        return CommandResult(rc, b"", stderr)

    def abort(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
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
