"""QMP on the lab's QEMU processes for the live-capture tests (issue 12): one command per
connection, the guest's run state polled while a capture runs, and the checks that a live
capture left nothing behind (no migration, capability off, no userfaultfd left in QEMU,
sysctl unchanged, no temp dir, the window's lock free)."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memdump.hypervisors.fifo import RUN_DIR
from tests.helpers.lab import remote_temp_paths

SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
LOCK = Path(RUN_DIR) / "userfaultfd.lock"
RESTORE = Path(RUN_DIR) / "userfaultfd.restore"
IDLE = ("none", "completed", "failed", "cancelled")


def connect(sock: Path) -> socket.socket:
    """A connection to QEMU's QMP socket. QEMU serves one client at a time with a listen
    backlog of 1: while the capture's client and another wait, connect says EAGAIN."""
    deadline = time.monotonic() + 120
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        try:
            s.connect(str(sock))
            return s
        except BlockingIOError:
            s.close()
            assert time.monotonic() < deadline, f"cannot connect to {sock}"
            time.sleep(0.02)


def qmp(
    sock: Path, command: str, args: dict[str, Any] | None = None, fd: int | None = None
) -> dict[str, Any]:
    """One QMP command on its own connection (events skipped); the reply. ``fd``: handed
    to QEMU first (getfd, as "ref", for ``fd:ref``), on the same connection."""
    with connect(sock) as s, s.makefile("rwb") as f:

        def reply() -> dict[str, Any]:
            while True:
                line = f.readline()
                assert line, "QMP connection closed"
                doc: dict[str, Any] = json.loads(line)
                if "return" in doc or "error" in doc:
                    return doc

        assert "QMP" in json.loads(f.readline())
        f.write(b'{"execute":"qmp_capabilities"}\n')
        f.flush()
        reply()
        if fd is not None:
            getfd = b'{"execute":"getfd","arguments":{"fdname":"ref"}}\n'
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            assert s.sendmsg([getfd], anc) == len(getfd)
            assert reply() == {"return": {}}
        cmd: dict[str, Any] = {"execute": command, **({"arguments": args} if args else {})}
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        return reply()


def status(sock: Path) -> str:
    return str(qmp(sock, "query-status")["return"]["status"])


def migration(sock: Path) -> str:
    return str(qmp(sock, "query-migrate")["return"].get("status", "none"))


def capability(sock: Path) -> bool:
    caps = qmp(sock, "query-migrate-capabilities")["return"]
    return any(c["capability"] == "background-snapshot" and c["state"] for c in caps)


def lock_free() -> bool:
    fd = os.open(LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Poller(threading.Thread):
    """Polls the guest's run state (QMP query-status) until stopped."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.seen: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.seen.append(status(self.sock))
            time.sleep(0.02)

    def stop(self) -> list[str]:
        self.done.set()
        self.join(60)
        return self.seen


def userfaultfds(sock: Path) -> int:
    """How many userfaultfds the VM's QEMU holds: write tracking holds one, and QEMU
    before 8.1 keeps it (the guest's memory write-protected) after a background snapshot
    that did not complete."""
    pid = int(sock.with_suffix(".pid").read_text())
    fds = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            pass
    return links.count("anon_inode:[userfaultfd]")


def assert_clean(sock: Path, before_dirs: list[str], sysctl: str, timeout: float = 30.0) -> None:
    """The guest runs, no migration is active, the capability is off, no write
    protection is left (QEMU holds no userfaultfd), the sysctl is unchanged, no temp dir
    of a live script on this VM's socket and no restore file is left, the lock is free."""
    deadline = time.monotonic() + timeout

    def host_settled() -> bool:
        # Other captures on this host (other tests) open windows of their own, for
        # milliseconds: the sysctl, the restore file and the lock are host-wide.
        return SYSCTL.read_text().strip() == sysctl and not RESTORE.exists() and lock_free()

    def left() -> set[str]:
        """New temp dirs of live scripts on this VM's socket (other tests' come and go)."""
        out = set()
        for p in remote_temp_paths():
            if p.name in before_dirs:
                continue
            try:
                if (p / "qmp").read_text().strip() == str(sock):
                    out.add(p.name)
            except OSError:
                continue
        return out

    while time.monotonic() < deadline and (
        left() or migration(sock) not in IDLE or not host_settled()
    ):
        time.sleep(0.05)
    assert status(sock) == "running"
    assert migration(sock) in IDLE
    assert not capability(sock)
    assert userfaultfds(sock) == 0
    assert SYSCTL.read_text().strip() == sysctl
    assert left() == set()
    assert not RESTORE.exists()
    assert lock_free()


IDLE = ("none", "completed", "failed", "cancelled")


class QmpError(Exception):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class Qmp:
    """One QMP connection (unix socket): commands, optional descriptors (SCM_RIGHTS, for
    ``getfd``), and the events seen on the way, with QEMU's timestamps."""

    def __init__(self, sock: Path, timeout: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(sock))
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise AssertionError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(line)
        return doc

    def execute(
        self, command: str, args: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> Any:
        msg = json.dumps({"execute": command, **({"arguments": args} if args else {})}).encode()
        if fds:
            self.sock.sendmsg(
                [msg + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        else:
            self.sock.sendall(msg + b"\n")
        while True:
            doc = self._read()
            if "event" in doc:
                self.events.append(doc)
            elif "error" in doc:
                raise QmpError(command, doc["error"])
            elif "return" in doc:
                return doc["return"]

    def hmp(self, line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": line}))

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def migration(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.execute("query-migrate")
        return doc

    def capability(self, name: str = "background-snapshot") -> bool:
        caps = self.execute("query-migrate-capabilities")
        return any(c["capability"] == name and c["state"] for c in caps)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
