"""Finding processes of the lab and of a running stack through /proc, by parentage, so a
fault test kills exactly the process it means to (never by name across the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
    return comm, ppid


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parent(pid: int) -> int | None:
    st = _stat(pid)
    return st[1] if st else None


def descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in pids():
        st = _stat(p)
        if st:
            kids.setdefault(st[1], []).append(p)
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2]


def freeze(root: int) -> list[int]:
    """SIGSTOP ``root`` and all its descendants, also those forked while this runs: once
    it returns, the whole tree does nothing more (no request, no fork) until a SIGCONT or
    SIGKILL (signal_all). Returns the stopped pids."""
    stopped: list[int] = []
    while True:
        new = [p for p in [root, *descendants(root)] if p not in stopped]
        if not new:
            return stopped
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        # Stopped for real (state T; gone or a zombie is as good) before the tree is
        # listed again: a fork under way when the signal came shows in that listing.
        deadline = time.monotonic() + 10
        while any(_state(p) not in (None, "T", "t", "Z", "X") for p in stopped):
            assert time.monotonic() < deadline, "a process did not stop on SIGSTOP"
            time.sleep(0.01)


def signal_all(pids: list[int], sig: int) -> None:
    """``sig`` to each of ``pids``; one that has ended meanwhile is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def ancestor_below(pid: int, top: int) -> int | None:
    """The ancestor of ``pid`` whose parent is ``top`` (e.g. sshd's per-connection child)."""
    cur: int | None = pid
    while cur is not None and cur > 1:
        up = parent(cur)
        if up == top:
            return cur
        cur = up
    return None


def holders(path: Path) -> list[int]:
    """Processes with ``path`` open."""
    out = []
    for p in pids():
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}") == str(path):
                    out.append(p)
                    break
            except OSError:
                continue
    return out


def lab_sshd_pid() -> int:
    lab = Path(os.environ["MEMDUMP_LAB_DIR"])
    return int((lab / "ssh" / "sshd.pid").read_text().strip())


def forkserver_below(root: int) -> int:
    """The multiprocessing forkserver under ``root`` (deployments.warm's, in a stack).
    Its forks (the flow runs) carry its command line too: it is the one whose parent
    is not one of them."""
    marked = {p for p in descendants(root) if "multiprocessing.forkserver" in cmdline(p)}
    found = [p for p in marked if parent(p) not in marked]
    if len(found) != 1:
        raise AssertionError(f"expected one forkserver below {root}, found {found}")
    return found[0]


def reaped_children_cpu_ticks(pid: int) -> int:
    """CPU time (clock ticks, user + system) of the children ``pid`` has waited for: it
    grows once a child of it has run and ended (proc(5): cutime, cstime)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[13]) + int(fields[14])


def wait_for(check: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    """True once ``check()`` is, False if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
