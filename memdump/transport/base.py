"""What a driver needs from a way of reaching the hypervisor.

Scripts are fixed texts run by ``sh -c SCRIPT sh ARG...``: values (VM ids, URIs) arrive
as positional parameters ``"$1"``, ``"$2"``, so request data is never pasted into the
script text; over SSH the whole command line is additionally shell-quoted.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


class ByteStream(Protocol):
    """A running remote command whose stdout is read as a byte stream."""

    def read(self) -> bytes:
        """The next chunk of stdout; b'' at the end. Raises TransportError subclasses."""
        ...

    def readinto(self, view: memoryview) -> int:
        """Like read(), into the start of ``view``; 0 at the end."""
        ...

    def finish(self, timeout: float) -> CommandResult:
        """After EOF: wait for the exit status; returns it with the command's stderr."""
        ...

    def abort(self) -> None:
        """Stop reading and tear the command down (used on errors and deadlines)."""
        ...


class Transport(Protocol):
    description: str

    # ``stdin``: bytes written to the command's stdin, which is then closed. For secrets
    # (a dump's token): a command line is world-readable in /proc/PID/cmdline.
    def run(
        self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0, stdin: bytes = b""
    ) -> CommandResult: ...

    def stream(
        self, script: str, args: Sequence[str] = (), *, stdin: bytes = b""
    ) -> ByteStream: ...

    def host_key_fingerprint(self) -> str:
        """The verified host key of the hypervisor ("ssh-ed25519 SHA256:..."), "" if the
        transport has none (local). For the manifest: which host answered."""
        ...

    def close(self) -> None: ...


def sh_command(script: str, args: Sequence[str]) -> list[str]:
    """argv that runs ``script`` with ``args`` as "$1".. (for subprocess, no shell)."""
    return ["sh", "-c", script, "sh", *args]


def sh_command_line(script: str, args: Sequence[str]) -> str:
    """The same as one quoted command line, for an SSH exec request."""
    return shlex.join(sh_command(script, args))
