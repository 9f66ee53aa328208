"""Local transport: the same scripts through a subprocess, for a collector that runs on
the hypervisor itself. No shell parses request data: values are positional arguments."""

from __future__ import annotations

from collections.abc import Sequence

from memdump.transport.base import CommandResult, sh_command
from memdump.transport.process import ProcessByteStream, run_capped, start_stream


class LocalTransport:
    description = "local"

    def __init__(
        self,
        stall_timeout: float = 120.0,
        *,
        max_stdout: int = 16 << 20,
        max_stderr: int = 1 << 20,
    ) -> None:
        self._stall = stall_timeout
        self._max_stdout = max_stdout
        self._max_stderr = max_stderr

    def run(
        self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0, stdin: bytes = b""
    ) -> CommandResult:
        # Capped and deadline-checked like the SSH transport's run().
        return run_capped(
            sh_command(script, args),
            timeout=timeout,
            max_stdout=self._max_stdout,
            max_stderr=self._max_stderr,
            what="local",
            stdin=stdin,
        )

    def stream(
        self, script: str, args: Sequence[str] = (), *, stdin: bytes = b""
    ) -> ProcessByteStream:
        return start_stream(sh_command(script, args), stall=self._stall, what="local", stdin=stdin)

    def host_key_fingerprint(self) -> str:
        return ""

    def close(self) -> None:
        pass
