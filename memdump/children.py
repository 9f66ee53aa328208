"""Child processes that die with their parent, and ports checked before a child binds them.

Linux only (as memdump is): ``prctl(2)`` through ctypes, ``/proc`` for port holders.

Why PR_SET_PDEATHSIG and not one process group: a group only helps when whoever kills
the parent signals the group, and the OOM killer and ``kill -9 PID`` do not. The kernel
sends the death signal itself whoever killed the parent. It fires when the *thread* that
forked the child ends, not the process: children are started from the main thread only
(``popen_dying_with_parent`` refuses another thread). The signal is armed by this
module run as a launcher, which then execs the command (see popen_dying_with_parent).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memdump.errors import ConfigError, PortInUseError
from memdump.fsperm import PRIVATE_UMASK

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _arm(parent: int, sig: int) -> None:
    """In the child: ask for ``sig`` when ``parent`` dies; exit if it already has."""
    os.umask(PRIVATE_UMASK)
    if _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    # The parent may have died before prctl: then no signal will ever come.
    if os.getppid() != parent:
        sys.exit(125)


def popen_dying_with_parent(
    argv: Sequence[str], *, sig: int = signal.SIGTERM, **kw: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` whose child gets ``sig`` when this process dies (also by
    SIGKILL). The death signal survives exec (not of a set-uid program).

    Not a ``preexec_fn``: that runs Python between fork and exec, unsafe once other
    threads exist (a worker's Prefect client and outbox threads). The child is this
    module (``python -m memdump.children PARENT SIG -- ARGV``), which arms the signal and
    execs ``argv``: same pid, so the caller's Popen is the command's.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start children from the main thread: PDEATHSIG follows the thread")
    launcher = [sys.executable, "-m", "memdump.children", str(os.getpid()), str(int(sig)), "--"]
    return subprocess.Popen([*launcher, *argv], **kw)  # noqa: S603 - fixed argv


def _launch(args: Sequence[str]) -> None:
    """``python -m memdump.children PARENT SIG -- ARGV...``: arm, then exec ARGV."""
    parent, sig, sep, *argv = args
    if sep != "--" or not argv:
        raise SystemExit("usage: python -m memdump.children PARENT SIG -- ARGV...")
    _arm(int(parent), int(sig))
    os.execvp(argv[0], argv)  # noqa: S606 - the caller's fixed argv


def become_subreaper() -> None:
    """Orphans of our descendants (a flow run whose runner was killed) become our children,
    so a stop can find and end them instead of leaving them to init."""
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def child_pids(parent: int | None = None) -> list[int]:
    """Live (not yet reaped) children of ``parent`` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[1]) == parent:
            out.append(int(entry))
    return out


def end_adopted(keep: set[int], grace: float) -> list[int]:
    """SIGTERM every child of ours not in ``keep`` (with its process group when it leads
    one), SIGKILL what is left after ``grace`` seconds, and reap them. Returns their pids."""
    ended: list[int] = []
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        pids = [p for p in child_pids() if p not in keep]
        for pid in pids:
            if pid not in ended:
                ended.append(pid)
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if not pids:
            return ended
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.2)


def reap_adopted(keep: set[int]) -> None:
    """Reap adopted children that have exited (never those in ``keep``: their Popen does)."""
    for pid in child_pids():
        if pid in keep:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


# -- ports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    pid: int
    cmdline: str


def _socket_inodes(port: int) -> list[str]:
    """Inodes of TCP sockets bound to ``port`` (listening ones first)."""
    listening: list[str] = []
    other: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or int(f[1].rsplit(":", 1)[1], 16) != port:
                continue
            (listening if f[3] == "0A" else other).append(f[9])
    return [i for i in listening + other if i != "0"]


def port_holders(port: int) -> list[Holder]:
    """Processes holding a TCP socket bound to ``port``: /proc/net/tcp{,6} give the
    socket's inode, /proc/*/fd the processes with it open (all of them when we are root,
    our own otherwise)."""
    wanted = {f"socket:[{i}]" for i in _socket_inodes(port)}
    found: list[Holder] = []
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link in wanted:
                try:
                    raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    raw = b""
                cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
                found.append(Holder(int(entry), cmd[:300]))
                break
    return found


def check_port_free(host: str, port: int, what: str, setting: str) -> None:
    """Raise PortInUseError naming ``port`` and its holders if ``host:port`` cannot be
    bound. SO_REUSEADDR as the servers set it: a TIME_WAIT left by our own last run is
    not "busy"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot bind the {what} to {host}:{port}: {exc.strerror} (set {setting})",
                    host=host,
                    port=port,
                ) from None
            holders = port_holders(port)
            by = "; ".join(f"pid {h.pid}: {h.cmdline}" for h in holders)
            raise PortInUseError(
                f"port {port} for the {what} ({host}) is already in use"
                + (f", held by {by}" if by else " (holder not visible to this user)")
                + f": stop it, or set {setting} to a free port",
                host=host,
                port=port,
                holders=[{"pid": h.pid, "cmdline": h.cmdline} for h in holders],
            ) from None


if __name__ == "__main__":
    _launch(sys.argv[1:])
