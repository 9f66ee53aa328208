"""Local transport: the same scripts through a subprocess, for a collector that runs on
the hypervisor itself. No shell parses request data: values are positional arguments."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from memdump.errors import TransportError
from memdump.transport.base import CommandResult, sh_command
from memdump.transport.process import ProcessByteStream, start_stream


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

    def stream(self, script: str, args: Sequence[str] = ()) -> ProcessByteStream:
        return start_stream(sh_command(script, args), stall=self._stall, what="local")

    def host_key_fingerprint(self) -> str:
        return ""

    def close(self) -> None:
        pass
