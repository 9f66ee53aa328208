"""The hypervisor-side temp directory every dump script uses, and its clean-up.

A dump script (sh/*/dump*.sh, live.sh: ``memdump_start`` of sh/lib.sh) makes
``<base>/memdump.XXXXXXXXXX`` (mktemp -d: 0700, owned by the script's
user) holding ``mem``, the FIFO QEMU writes into (or, for a file-staged dump, the 0600 file
QEMU writes first), and removes it on every exit path it can see (an EXIT trap). The base
is the root-only run directory ``/run/memdump`` (RUN_DIR; made 0700 if missing, used only
when it is a real directory owned by the script's user), else ``${TMPDIR:-/tmp}``; a
file-staged dump uses the hypervisor's ``staging_dir``, else ``${TMPDIR:-/tmp}`` (a whole
memory image does not belong in the RAM-backed /run).

Scripts run as root in directories other users can write (/tmp), so nothing is found by
name: the script's first line on stdout is ``memdump-dir <its exact directory>``, read and
checked by DirStream before any dump byte, and an abort acts on that directory only, and
only after ``memdump_enter`` (sh/lib.sh) has checked it from the inside (owner, mode, no
symlink). The token that ties the directory to this dump reaches the script on stdin,
never on a command line (``/proc/PID/cmdline`` is world-readable).

A script killed outright (SIGKILL, an OOM kill, a hypervisor-side crash) leaves its
directory behind, possibly with the FIFO's reader still blocked in ``open()``. So each
script holds a lock on ``<dir>/lock`` for as long as it lives (fd 8, not passed on to its
children) and notes the pid of the child working on ``mem`` (the reader; virsh or cat for
a staged file); the clean-up (sh/clean.sh, in the run directory and ``${TMPDIR:-/tmp}``, or
a staging dir) removes only directories that pass the same checks and whose lock is free,
and kills that child only when its command line names that directory's ``mem`` (a reused
pid is left alone).
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Literal, NoReturn, Self

from memdump.errors import ConfigError, HypervisorError, MemdumpError
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.scripts import RUN_DIR as RUN_DIR  # where tests and tools look
from memdump.hypervisors.scripts import load
from memdump.transport.base import ByteStream, CommandResult, Transport

# $1 = the dump's directory, stdin: its token (sh/abort-fifo.sh).
ABORT_FIFO = load("abort-fifo.sh")
# Puts back a userfaultfd window a killed script left open (sh/uffd-restore.sh).
UFFD_RESTORE = load("uffd-restore.sh")
# $1 = minimum age in seconds, $2 = directory (sh/clean.sh).
_CLEAN = load("clean.sh")

# The first line of every dump script's stdout: its exact temp directory.
_DIR_LINE = re.compile(rb"memdump-dir (/(?:[A-Za-z0-9._-]+/)*memdump\.[A-Za-z0-9]{10})")
_DIR_LINE_MAX = 4096


_WINDOW = re.compile(r"^memdump-pause-window (\d+(?:\.\d+)?) (\d+(?:\.\d+)?)$", re.M)


def pause_window(stderr: str) -> tuple[str, tuple[datetime, datetime] | None]:
    """Split a dump script's stderr into the dump tool's own messages and the window the
    script measured around it (``memdump-pause-window T0 T1``, hypervisor clock): the
    guest is paused within it, so it bounds the guest's downtime from outside."""
    m = _WINDOW.search(stderr)
    if m is None:
        return stderr.strip(), None
    rest = (stderr[: m.start()] + stderr[m.end() :]).strip()
    t0, t1 = (datetime.fromtimestamp(float(x), UTC) for x in m.groups())
    return rest, (t0, t1)


def clean_stale(
    transport: Transport, hypervisor: str, min_age_sec: float = 60.0, directory: str | None = None
) -> list[str]:
    """Remove temp dirs left on the hypervisor by dump scripts that are gone (in
    ``directory``, default the run directory and the remote shell's ``${TMPDIR:-/tmp}``).
    Only directories of the remote user that nobody else can write are considered."""
    args = (str(int(min_age_sec)),) if directory is None else (str(int(min_age_sec)), directory)
    res = transport.run(_CLEAN, args, timeout=60.0)
    if res.returncode != 0:
        raise HypervisorError(
            f"{hypervisor}: clean-up of stale dump directories failed: {res.stderr_text}",
            hypervisor=hypervisor,
            retryable=True,
        )
    return [line for line in res.stdout.decode("utf-8", "replace").splitlines() if line]


def restore_userfaultfd(transport: Transport, hypervisor: str) -> list[str]:
    """Run UFFD_RESTORE: a userfaultfd window a killed script left open is closed."""
    res = transport.run(UFFD_RESTORE, (), timeout=60.0)
    if res.returncode != 0:
        raise HypervisorError(
            f"{hypervisor}: restoring vm.unprivileged_userfaultfd failed: {res.stderr_text}",
            hypervisor=hypervisor,
            retryable=True,
        )
    return [line for line in res.stdout.decode("utf-8", "replace").splitlines() if line]


def new_token() -> str:
    """A dump's token (ties its temp dir to it for the abort); sent on stdin only."""
    return secrets.token_hex(16)


def token_stdin(token: str) -> bytes:
    return f"{token}\n".encode()


class DirStream:
    """A dump script's stdout with its first line, ``memdump-dir <dir>``, taken off: the
    exact temp directory the script made, for its abort. Read by ``read_dir`` (before any
    dump byte; the drivers call it in open_dump) or by the first ``readinto``. A script
    that ends before that line (it failed early) gives ``dir`` None and an empty stream:
    its exit code says why. Anything else first is refused."""

    def __init__(self, stream: ByteStream, hypervisor: str) -> None:
        self._s = stream
        self._hv = hypervisor
        self._pending = b""
        self._read = False
        self._eof = False
        self.dir: str | None = None
        self.aborted = False

    def read_dir(self) -> str | None:
        if self._read:
            return self.dir
        buf = bytearray()
        chunk = memoryview(bytearray(_DIR_LINE_MAX))
        while b"\n" not in buf:
            if len(buf) >= _DIR_LINE_MAX:
                self._refuse(bytes(buf))
            n = self._s.readinto(chunk[: _DIR_LINE_MAX - len(buf)])
            if n == 0:
                if buf:
                    self._refuse(bytes(buf))
                self._read = self._eof = True
                return None
            buf += chunk[:n]
        line, _, rest = bytes(buf).partition(b"\n")
        m = _DIR_LINE.fullmatch(line)
        if m is None or b"/../" in line or b"/./" in line:
            self._refuse(line)
        self._pending = rest
        self._read = True
        self.dir = m.group(1).decode()
        return self.dir

    def _refuse(self, got: bytes) -> NoReturn:
        self._s.abort()
        raise HypervisorError(
            f"{self._hv}: the dump script did not start with its temp directory "
            f"(memdump-dir line); got {got[:200]!r}",
            hypervisor=self._hv,
        )

    def readinto(self, view: memoryview) -> int:
        if not self._read:
            self.read_dir()
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        if self._eof:
            return 0
        return self._s.readinto(view)

    def read(self) -> bytes:
        buf = bytearray(1 << 20)
        n = self.readinto(memoryview(buf))
        return bytes(buf[:n])

    def finish(self, timeout: float) -> CommandResult:
        return self._s.finish(timeout)

    def abort(self) -> bool:
        """Close the stream. True the first time only: what an abort does on the
        hypervisor besides (stopping the dump in the script's directory) is done once."""
        if self.aborted:
            return False
        self.aborted = True
        self._s.abort()
        return True


def start_dump(
    transport: Transport, script: str, args: tuple[str, ...], hypervisor: str
) -> tuple[DirStream, str]:
    """Start a dump script (one that calls memdump_start) with a new token on its stdin and read its
    directory line; returns the stream and the token."""
    token = new_token()
    stream = DirStream(transport.stream(script, args, stdin=token_stdin(token)), hypervisor)
    try:
        stream.read_dir()
    except BaseException:
        stream.abort()
        raise
    return stream, token


def fifo_only(hypervisor: str, driver: str, staging: str, why: str) -> None:
    """Drivers whose dump cannot be cancelled refuse file staging: once QEMU writes a
    file, nothing could stop it."""
    if staging != "fifo":
        raise ConfigError(
            f"hypervisor {hypervisor} (driver {driver}) supports only staging 'fifo', not "
            f"{staging!r}: {why}",
            hypervisor=hypervisor,
        )


class TokenFifoDump:
    """A running dump script whose QEMU writes into the script's private FIFO and that
    only breaking the FIFO stops (QMP and HMP dump-guest-memory cannot be cancelled):
    aborting closes the stream and runs ABORT_FIFO on the script's own directory (its
    memdump-dir line) with the script's token on stdin. Start one with ``start``
    (the token goes on the script's stdin; the script's args carry no secret).
    Subclasses set ``dump_format`` and read the script's exit in ``close_ok`` via
    ``finish``."""

    dump_format = ""
    # Run with the script's directory ($1) and token (stdin) on abort.
    abort_script = ABORT_FIFO
    abort_timeout = 15.0

    def __init__(
        self,
        stream: ByteStream | DirStream,
        transport: Transport,
        hypervisor: str,
        ref: VMRef,
        token: str,
    ) -> None:
        self._s = stream if isinstance(stream, DirStream) else DirStream(stream, hypervisor)
        self._t = transport
        self._hv = hypervisor
        self._ref = ref
        self._token = token
        self.pause_window: tuple[datetime, datetime] | None = None
        self.staging: Literal["fifo", "file"] = "fifo"

    @classmethod
    def start(
        cls, transport: Transport, script: str, args: tuple[str, ...], hypervisor: str, ref: VMRef
    ) -> Self:
        """Run ``script`` (one that calls memdump_start) with ``args`` and a new token on stdin."""
        stream, token = start_dump(transport, script, args, hypervisor)
        return cls(stream, transport, hypervisor, ref, token)

    @property
    def directory(self) -> str | None:
        """The script's temp directory, once its first line was read."""
        return self._s.dir

    def readinto(self, view: memoryview) -> int:
        return self._s.readinto(view)

    def finish(self) -> tuple[int, str]:
        """The script's exit code and stderr, its pause window taken out (and kept)."""
        res = self._s.finish(timeout=60.0)
        stderr, self.pause_window = pause_window(res.stderr_text)
        return res.returncode, stderr

    def abort(self) -> None:
        if not self._s.abort():
            return  # aborted already
        d = self._s.dir
        if d is None:
            return  # the script never made its directory (or was never read): nothing to stop
        try:
            self._t.run(
                self.abort_script, (d,), timeout=self.abort_timeout, stdin=token_stdin(self._token)
            )
        except MemdumpError:
            pass  # best effort: closing the stream already broke the FIFO
