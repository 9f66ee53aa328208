"""A fake QEMU QMP socket that knows the commands of a live capture (background-snapshot
migration into a descriptor passed with getfd), for the plain-QEMU driver's unit tests:
the real hypervisor-side client (memdump/hypervisors/remote/qmp.py) talks to it through
the driver's real scripts. One client at a time, as QEMU; events STOP and RESUME on the
connection that asked for ``migrate``."""

from __future__ import annotations

import array
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 64


class FakeLiveQemu(threading.Thread):
    """``cap_error``: migrate-set-capabilities refuses the capability with this desc;
    ``cap_sticks``: whether a capability set to true reads back true; ``plain``: the
    migrate acts as an ordinary migration whatever the capability says, and leaves the
    guest "postmigrate" at its end (the trap of issue 12); ``outcome``: "completed" or
    "failed"; ``version``: QEMU's (major, minor); ``endless_mib``: after STREAM, write this
    many MiB more (a guest's RAM: an abort comes while it runs), stopping early at a
    migrate_cancel. ``max_bandwidth``: the migration parameter (QEMU 7.2's default
    128 MiB/s); ``bandwidth_at_migrate`` and ``bandwidth_at_end``: its value when
    ``migrate`` came and when the migration ended (the one in force while it ran: QEMU's
    snapshot thread ignores the value set before it starts); ``wait_for_bandwidth``: the
    migration does not end before max-bandwidth is this (up to 10 s, or until a set was
    refused);
    ``bandwidth_error``: migrate-set-parameters refuses with this desc;
    ``migrate_reply_gate``: the reply to ``migrate`` waits for this event (up to 30 s)
    while the migration already writes (a client slow to read it, as under load)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.status = "running"
        self.migration = "none"
        self.cap = False
        self.cap_error = ""
        self.cap_sticks = True
        self.plain = False
        self.outcome = "completed"
        self.version = (7, 2)
        self.endless_mib = 0
        self.written = 0
        self.commands: list[str] = []
        self.cap_at_migrate: bool | None = None
        self.max_bandwidth = 128 << 20
        self.bandwidth_at_migrate: int | None = None
        self.bandwidth_at_end: int | None = None
        self.wait_for_bandwidth: int | None = None
        self.bandwidth_error = ""
        self.bandwidth_refused = 0
        self.bandwidth_sets: list[int] = []
        self.migrate_reply_gate: threading.Event | None = None
        self.fds: dict[str, int] = {}
        self.hmp: dict[str, str] = {}  # HMP command line -> its text
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                try:
                    self._serve(conn)
                except (OSError, ValueError):
                    pass

    def stop(self) -> None:
        self.srv.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _lines(self, conn: socket.socket, pending: list[int]) -> Iterator[bytes]:
        buf = b""
        while True:
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                yield line
            data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                    pending.extend(fds)
            if not data:
                return
            buf += data

    @staticmethod
    def _send(conn: socket.socket, doc: dict[str, Any]) -> None:
        conn.sendall(json.dumps(doc).encode() + b"\n")

    def _event(self, conn: socket.socket, name: str) -> None:
        t = time.time()
        ts = {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}
        self._send(conn, {"timestamp": ts, "event": name})

    def _serve(self, conn: socket.socket) -> None:
        self._send(conn, {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
        pending: list[int] = []
        for line in self._lines(conn, pending):
            cmd = json.loads(line)
            ex, cid, args = cmd["execute"], cmd.get("id"), cmd.get("arguments", {})
            self.commands.append(ex)
            ret: Any = {}
            err = ""
            after = None
            if ex == "query-version":
                major, minor = self.version
                ret = {"qemu": {"major": major, "minor": minor, "micro": 0}, "package": "fake"}
            elif ex == "query-status":
                ret = {"status": self.status, "running": self.status == "running"}
            elif ex == "query-migrate":
                ret = {} if self.migration == "none" else {"status": self.migration}
                if self.migration == "completed":
                    ret.update({"downtime": 4, "setup-time": 1, "total-time": 20})
                if self.migration == "failed":
                    ret["error-desc"] = "Unable to write to file"
            elif ex == "query-migrate-capabilities":
                ret = [
                    {"capability": "xbzrle", "state": False},
                    {"capability": "background-snapshot", "state": self.cap},
                ]
            elif ex == "query-migrate-parameters":
                ret = {"downtime-limit": 300, "max-bandwidth": self.max_bandwidth}
            elif ex == "migrate-set-parameters":
                if self.bandwidth_error:
                    err = self.bandwidth_error
                    self.bandwidth_refused += 1
                elif "max-bandwidth" in args:
                    self.max_bandwidth = args["max-bandwidth"]
                    self.bandwidth_sets.append(self.max_bandwidth)
            elif ex == "qom-list":
                ret = [{"name": "type", "type": "string"}]
            elif ex == "human-monitor-command":
                ret = self.hmp.get(args["command-line"], "")
            elif ex == "getfd":
                self.fds[args["fdname"]] = pending.pop()
            elif ex == "closefd":
                fd = self.fds.pop(args["fdname"], None)
                if fd is None:
                    err = f"File descriptor named '{args['fdname']}' not found"
                else:
                    os.close(fd)
            elif ex == "migrate-set-capabilities":
                want = args["capabilities"][0]["state"]
                if self.migration in ("setup", "active"):
                    err = "There's a migration process in progress"
                elif want and self.cap_error:
                    err = self.cap_error
                else:
                    self.cap = want and self.cap_sticks
            elif ex == "migrate":
                self.cap_at_migrate = self.cap
                self.bandwidth_at_migrate = self.max_bandwidth
                fd = self.fds.pop(args["uri"].removeprefix("fd:"))
                self.migration = "active"
                after = fd
            elif ex == "migrate_cancel":
                if self.migration in ("setup", "active"):
                    self.migration = "cancelled"
            elif ex == "cont":
                self.status = "running"
            if after is not None and self.migrate_reply_gate is not None:
                self._migrate(conn, after)  # QEMU's migration thread runs before the reply is read
                self.migrate_reply_gate.wait(30)
                self._send(conn, {"return": ret, "id": cid})
                continue
            if err:
                self._send(conn, {"id": cid, "error": {"class": "GenericError", "desc": err}})
            else:
                self._send(conn, {"return": ret, "id": cid})
            if after is not None:
                self._migrate(conn, after)

    def _migrate(self, conn: socket.socket, fd: int) -> None:
        self._event(conn, "STOP")
        self._event(conn, "RESUME")

        def write() -> None:
            try:
                with os.fdopen(fd, "wb", buffering=0) as out:
                    out.write(STREAM)
                    chunk = bytes(1 << 20)
                    for _ in range(self.endless_mib):
                        if self.migration == "cancelled":
                            return
                        out.write(chunk)
                        self.written += len(chunk)
            except OSError:
                # A write that fails after migrate_cancel (the client closed its spare read
                # end once the migration read "cancelled") ends a cancelled migration in
                # QEMU, not a failed one.
                if self.migration != "cancelled":
                    self.migration = "failed"
                return
            deadline = time.monotonic() + 10
            while self.wait_for_bandwidth not in (None, self.max_bandwidth):
                if self.bandwidth_refused:
                    break  # asked for and refused: it will not come
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            self.bandwidth_at_end = self.max_bandwidth
            if self.plain or not self.cap_at_migrate:
                self.status = "postmigrate"  # an ordinary migration pauses the guest at its end
            self.migration = self.outcome

        threading.Thread(target=write, daemon=True).start()
