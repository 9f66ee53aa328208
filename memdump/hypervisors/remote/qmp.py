# This file runs on the hypervisor's python3, which may be as old as 3.6: %-formatting
# (f-strings would not even parse before 3.6), socket.timeout (an OSError, not
# TimeoutError, before 3.10) and a version check this project's 3.11 would not need.
# ruff: noqa: UP031, UP036, UP041
"""memdump's QMP client on a hypervisor, for the ``qemu`` driver (memdump/hypervisors/qemu.py).

memdump never imports this file: the driver's scripts run its text as a fixed program,
``python3 -I -S - MODE ARG...`` with the text on stdin (a quoted here-document), every
value a positional argument. Only the standard library of Python 3.6 or later is used, and
only syntax such a Python parses (no f-strings, no variable annotations), so an older
python3 still reaches the version check below and fails with a clear message.

Before this client sends anything on a QMP socket it checks who serves it: the peer
credentials of the connection (SO_PEERCRED: pid, uid and gid of the process that listens
on the socket) and that process's executable, ``/proc/PID/exe``, whose real path must
match one of the allowed QEMU binaries (the hypervisor's ``qemu_binaries``) and which,
like every directory above it, must belong to root and be writable by root only. A
process that is merely named like QEMU, or that mentions the socket in its command line,
is never taken for QEMU.

A dump never gives QEMU a path: this client opens the FIFO for writing (its reader is
already there), hands the open descriptor to QEMU over the socket (``getfd``, SCM_RIGHTS)
and runs ``dump-guest-memory`` with ``protocol: fd:memdump``. The FIFO stays root's, 0600,
in a 0700 directory, whatever uid QEMU runs as.

Modes (output on stdout, one record per line; JSON is re-serialised on one line):
  query TIMEOUT COMMANDS BINARIES SOCKET...
      For each SOCKET: ``memdump-sock SOCKET``; then either ``memdump-peer PID UID GID
      CMDLINE_SHA256 EXE`` (CMDLINE_SHA256: of /proc/PID/cmdline as it reads, NUL
      separated) followed by ``memdump-qmp-reply JSON`` for each command of COMMANDS (one
      JSON object per line, each with its own "id"), or ``memdump-error CODE MESSAGE``.
      TIMEOUT (seconds) bounds the whole exchange with one socket. Exit 0.
  dump SOCKET FIFO BINARIES READER_PID
      The peer line, the replies to ``getfd`` and ``dump-guest-memory``. No timeout once
      the dump is asked for: QEMU answers when the dump has ended (or failed).
BINARIES: fnmatch patterns ("*" also matches "/"), one per line.

Exit codes (dump): 0 done; 1 QEMU answered with an error; 70 usage; 71 no greeting; 72 not
a QMP greeting; 73 the connection closed or timed out; 74 the socket is not served by an
allowed QEMU; 75 cannot connect; 76 the FIFO has no reader; 95 Python too old or
without a module it needs (query mode too).
"""

import sys

try:
    import array
    import errno
    import fcntl
    import fnmatch
    import hashlib
    import json
    import os
    import socket
    import stat
    import struct
    import time
except ImportError as exc:  # e.g. Debian's python3-minimal alone: no json
    sys.stdout.write("memdump-error 95 python3 on the hypervisor lacks %s\n" % exc.name)
    sys.exit(95)

MAX_LINE = 1 << 20  # a QMP reply longer than this is not QEMU's: refused, not buffered
FDNAME = "memdump"


class Fail(Exception):
    def __init__(self, code: "int", message: "str") -> None:
        Exception.__init__(self, message)
        self.code = code
        self.message = message


def out(*words: "str") -> None:
    sys.stdout.write(" ".join(words) + "\n")
    sys.stdout.flush()


def root_only(path: "str", st: "os.stat_result") -> "str":
    """Why ``path`` (stat ``st``) could be changed by someone other than root; "" if not."""
    if st.st_uid != 0:
        return "%s belongs to uid %d, not root" % (path, st.st_uid)
    if st.st_mode & 0o022:
        return "%s is writable by group or others (mode %o)" % (path, stat.S_IMODE(st.st_mode))
    return ""


def check_qemu(pid: "int", patterns: "list[str]") -> "str":
    """The executable of ``pid`` if it is an allowed QEMU binary; raises Fail(74) if not."""
    if pid <= 0:
        raise Fail(74, "the socket's peer has no pid")
    link = "/proc/%d/exe" % pid
    try:
        exe = os.readlink(link)
        st = os.stat(link)  # the running file itself, even if replaced since (an upgrade)
    except OSError as exc:
        raise Fail(74, "cannot read the executable of pid %d: %s" % (pid, exc.strerror)) from None
    path = exe[: -len(" (deleted)")] if exe.endswith(" (deleted)") else exe
    if not any(fnmatch.fnmatchcase(path, p) for p in patterns if p):
        raise Fail(
            74,
            "the socket is served by pid %d running %s, which is not a QEMU binary "
            "allowed by qemu_binaries" % (pid, exe),
        )
    why = "" if stat.S_ISREG(st.st_mode) else "%s is not a regular file" % path
    why = why or root_only(path, st)
    d = os.path.dirname(path)
    while not why:
        try:
            dst = os.lstat(d)
        except OSError as exc:
            why = "cannot check %s: %s" % (d, exc.strerror)
            break
        if not stat.S_ISDIR(dst.st_mode):
            why = "%s is not a directory" % d
        else:
            why = root_only(d, dst)
        if d == "/":
            break
        d = os.path.dirname(d)
    if why:
        raise Fail(74, "the socket is served by pid %d running %s, refused: %s" % (pid, exe, why))
    return exe


def peer_line(sock: "socket.socket", patterns: "list[str]") -> "list[str]":
    """The checked peer: [pid, uid, gid, sha256 of its command line, exe]."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    exe = check_qemu(pid, patterns)
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        raise Fail(74, "cannot read the command line of pid %d: %s" % (pid, exc.strerror)) from None
    return [str(pid), str(uid), str(gid), digest, exe]


class Qmp:
    """One QMP connection; replies matched by id, asynchronous events skipped."""

    def __init__(self, sock: "socket.socket", deadline: "float | None") -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def _recv(self) -> "bytes":
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Fail(73, "no answer in time")
            self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        except socket.timeout:
            raise Fail(73, "no answer in time") from None
        except OSError as exc:
            raise Fail(73, "connection lost: %s" % (exc.strerror or exc)) from None

    def line(self) -> "bytes":
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise Fail(73, "a QMP message longer than %d bytes" % MAX_LINE)
            data = self._recv()
            if not data:
                raise Fail(73, "the connection closed before the reply")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        if len(line) > MAX_LINE:
            raise Fail(73, "a QMP message longer than %d bytes" % MAX_LINE)
        return line

    def doc(self) -> "object":
        try:
            return json.loads(self.line().decode("utf-8", "replace"))
        except ValueError:
            return None

    def send(self, doc: "dict[str, object]", fds: "list[int] | None" = None) -> None:
        data = json.dumps(doc).encode() + b"\n"
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], anc)
                data = data[sent:]
            self.sock.sendall(data)
        except socket.timeout:
            raise Fail(73, "cannot send in time") from None
        except OSError as exc:
            raise Fail(73, "connection lost: %s" % (exc.strerror or exc)) from None

    def reply(self, cid: "str") -> "dict[str, object]":
        while True:
            doc = self.doc()
            if isinstance(doc, dict) and doc.get("id") == cid:
                out("memdump-qmp-reply", json.dumps(doc))
                return doc

    def greet(self) -> None:
        try:
            first = self.doc()
        except Fail as exc:
            raise Fail(71, "no QMP greeting: %s" % exc.message) from None
        if not isinstance(first, dict) or "QMP" not in first:
            raise Fail(72, "not a QMP greeting")
        self.send({"execute": "qmp_capabilities", "id": "memdump-0"})
        if "return" not in self.reply("memdump-0"):
            raise Fail(72, "qmp_capabilities refused")


def connect(path: "str", timeout: "float") -> "socket.socket":
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except socket.timeout:
        sock.close()
        raise Fail(75, "cannot connect to %s: timed out" % path) from None
    except OSError as exc:
        sock.close()
        raise Fail(75, "cannot connect to %s: %s" % (path, exc.strerror or exc)) from None
    return sock


def query(timeout: "float", commands: "str", patterns: "list[str]", sockets: "list[str]") -> int:
    cmds = [c for c in commands.split("\n") if c.strip()]
    for path in sockets:
        out("memdump-sock", path)
        try:
            sock = connect(path, max(0.1, timeout))
            try:
                out("memdump-peer", *peer_line(sock, patterns))
                q = Qmp(sock, time.monotonic() + timeout)
                q.greet()
                for cmd in cmds:
                    doc = json.loads(cmd)
                    q.send(doc)
                    q.reply(str(doc.get("id")))
            finally:
                sock.close()
        except Fail as exc:
            out("memdump-error", str(exc.code), " ".join(exc.message.split()))
    return 0


def open_writer(fifo: "str", reader: "int", wait: "float" = 30.0) -> int:
    """The FIFO's write end, opened without blocking: its reader (pid ``reader``) was
    started first, and a reader gone (killed by an abort) must fail the dump, not hang it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            break
        except OSError as exc:
            # ENXIO: no reader yet; the reader, just started, may not have opened it.
            gone = not os.path.exists("/proc/%d" % reader)
            if exc.errno != errno.ENXIO or gone or time.monotonic() > deadline:
                why = "its reader is gone" if gone else exc.strerror
                raise Fail(76, "cannot open the FIFO for writing: %s" % why) from None
            time.sleep(0.01)
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise Fail(76, "%s is not this script's FIFO" % fifo)
    # QEMU writes with blocking semantics: the flag is shared with the descriptor it gets.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def dump(path: "str", fifo: "str", patterns: "list[str]", reader: "int") -> int:
    sock = connect(path, 30.0)
    try:
        out("memdump-peer", *peer_line(sock, patterns))
        q = Qmp(sock, time.monotonic() + 30.0)
        q.greet()
        fd = open_writer(fifo, reader)
        try:
            q.send({"execute": "getfd", "arguments": {"fdname": FDNAME}, "id": "memdump-1"}, [fd])
            got = q.reply("memdump-1")
        finally:
            # QEMU has its own copy now: the reader's end of file must come when QEMU
            # closes it at the end of the dump, not wait for this process.
            os.close(fd)
        if "return" not in got:
            return 1
        q.deadline = None  # the dump takes as long as it takes; QEMU answers at its end
        sock.settimeout(None)
        args = {"paging": False, "protocol": "fd:" + FDNAME, "format": "elf"}
        q.send({"execute": "dump-guest-memory", "arguments": args, "id": "memdump-2"})
        if "return" in q.reply("memdump-2"):
            return 0
        # The dump may have failed before QEMU took the descriptor: do not leave it
        # open in QEMU (it would hold the FIFO's write end). Best effort.
        q.deadline = time.monotonic() + 10.0
        try:
            q.send({"execute": "closefd", "arguments": {"fdname": FDNAME}, "id": "memdump-3"})
            q.reply("memdump-3")
        except Fail:
            pass
        return 1
    finally:
        sock.close()


def main(argv: "list[str]") -> int:
    if sys.version_info < (3, 6):
        out("memdump-error", "95", "python3 on the hypervisor is older than 3.6")
        return 95
    try:
        if len(argv) >= 5 and argv[0] == "query":
            return query(float(argv[1]), argv[2], argv[3].split("\n"), argv[4:])
        if len(argv) == 5 and argv[0] == "dump" and argv[4].isdigit():
            return dump(argv[1], argv[2], argv[3].split("\n"), int(argv[4]))
    except Fail as exc:
        out("memdump-error", str(exc.code), " ".join(exc.message.split()))
        return exc.code
    out("memdump-error", "70", "usage: query TIMEOUT COMMANDS BINARIES SOCKET... | dump ...")
    return 70


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
