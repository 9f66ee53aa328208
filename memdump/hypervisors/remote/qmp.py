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
  preflight SOCKET BINARIES
      What a live capture needs to know, nothing changed: the peer line, the replies to
      PREFLIGHT (version, status, migration, capabilities, devices, ``info mtree -f``,
      ``info registers``),
      then ``memdump-uffd VALUE`` (/proc/sys/vm/unprivileged_userfaultfd, "" if absent).
  live SOCKET FIFO BINARIES READER_PID UFFD RUN_DIR SYSCTL [BANDWIDTH [HUGEPAGES]]
      A live capture (migration capability ``background-snapshot``) into the FIFO, see
      ``live`` below. UFFD: the hypervisor's live_userfaultfd ("none" or "sysctl-window").
      BANDWIDTH: a cap (bytes/s) on the snapshot: QEMU's migration max-bandwidth, set
      once the snapshot runs (QEMU's snapshot thread disables the rate limit as it
      starts, so a value set before ``migrate`` does nothing), the previous value put
      back afterwards (``memdump-live-bandwidth OLD NEW`` is printed before it is set, so
      a repair after a kill knows it); absent or "": no cap, max-bandwidth untouched.
      HUGEPAGES: the text of sh/hugepages.pl: the guest RAM on huge pages is noted before
      ``migrate`` and put back on them once the migration has completed
      (``memdump-live-hugepages REGIONS RESTORED FAILED MS [ERROR]``, or ``unavailable
      WHY``); absent or "": not done.
  uffd-restore RUN_DIR
      Puts back vm.unprivileged_userfaultfd from RUN_DIR/userfaultfd.restore if a window
      was left open by a client killed outright (its lock is free); prints what it did.
  repair SOCKET BINARIES PID FIFO [OLD NEW]
      After a live client killed outright: if the QEMU on SOCKET is still pid PID and has
      background-snapshot on, end its migration (drained through FIFO) and turn the
      capability off; and if its max-bandwidth is still the client's NEW, put OLD back.
BINARIES: fnmatch patterns ("*" also matches "/"), one per line.

Exit codes: the EXIT_* constants below, memdump/hypervisors/exitcodes.py's table (a test
checks that they agree): 0 done; EXIT_FAILED QEMU answered with an error; EXIT_NO_GREETING
... EXIT_FIFO_NO_READER the socket, its peer or the FIFO; EXIT_NO_PYTHON Python too old or
without a module it needs (any mode). Live only: EXIT_LIVE_UNSUPPORTED a live capture
cannot run on this VM, found before ``migrate`` (``memdump-unsupported REASON``; the
guest untouched); EXIT_MIGRATION_FAILED the migration ended failed or cancelled;
EXIT_LEFT_PAUSED the guest was left paused and was resumed (``cont``): a failure;
EXIT_STOPPED stopped (a signal, the stream's reader gone: the migration cancelled) or
QEMU could not be put right after it; EXIT_NO_RUN_DIR the userfaultfd window cannot be
used.
"""

import sys

# The exit codes (memdump/hypervisors/exitcodes.py; they must stay the same numbers).
EXIT_FAILED = 1
EXIT_NO_GREETING = 71
EXIT_NOT_QMP = 72
EXIT_QMP_LOST = 73
EXIT_NOT_QEMU = 74
EXIT_NO_CONNECT = 75
EXIT_FIFO_NO_READER = 76
EXIT_LIVE_UNSUPPORTED = 77
EXIT_MIGRATION_FAILED = 78
EXIT_LEFT_PAUSED = 79
EXIT_STOPPED = 80
EXIT_NO_RUN_DIR = 83
EXIT_NO_PYTHON = 95
EXIT_BAD_ARGUMENT = 97

try:
    import array
    import errno
    import fcntl
    import fnmatch
    import hashlib
    import json
    import os
    import select
    import signal
    import socket
    import stat
    import struct
    import subprocess  # noqa: S404 - perl with memdump's own program, argument lists only
    import time
except ImportError as exc:  # e.g. Debian's python3-minimal alone: no json
    sys.stdout.write("memdump-error 95 python3 on the hypervisor lacks %s\n" % exc.name)
    sys.exit(EXIT_NO_PYTHON)

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
    """The executable of ``pid`` if it is an allowed QEMU binary; raises
    Fail(EXIT_NOT_QEMU) if not."""
    if pid <= 0:
        raise Fail(EXIT_NOT_QEMU, "the socket's peer has no pid")
    link = "/proc/%d/exe" % pid
    try:
        exe = os.readlink(link)
        st = os.stat(link)  # the running file itself, even if replaced since (an upgrade)
    except OSError as exc:
        raise Fail(
            EXIT_NOT_QEMU, "cannot read the executable of pid %d: %s" % (pid, exc.strerror)
        ) from None
    path = exe[: -len(" (deleted)")] if exe.endswith(" (deleted)") else exe
    if not any(fnmatch.fnmatchcase(path, p) for p in patterns if p):
        raise Fail(
            EXIT_NOT_QEMU,
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
        raise Fail(
            EXIT_NOT_QEMU,
            "the socket is served by pid %d running %s, refused: %s" % (pid, exe, why),
        )
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
        raise Fail(
            EXIT_NOT_QEMU, "cannot read the command line of pid %d: %s" % (pid, exc.strerror)
        ) from None
    return [str(pid), str(uid), str(gid), digest, exe]


class Qmp:
    """One QMP connection; replies matched by id, asynchronous events skipped."""

    def __init__(self, sock: "socket.socket", deadline: "float | None") -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.events = []  # type: list[dict[str, object]]

    def _recv(self) -> "bytes":
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Fail(EXIT_QMP_LOST, "no answer in time")
            self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        except socket.timeout:
            raise Fail(EXIT_QMP_LOST, "no answer in time") from None
        except OSError as exc:
            raise Fail(EXIT_QMP_LOST, "connection lost: %s" % (exc.strerror or exc)) from None

    def line(self) -> "bytes":
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise Fail(EXIT_QMP_LOST, "a QMP message longer than %d bytes" % MAX_LINE)
            data = self._recv()
            if not data:
                raise Fail(EXIT_QMP_LOST, "the connection closed before the reply")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        if len(line) > MAX_LINE:
            raise Fail(EXIT_QMP_LOST, "a QMP message longer than %d bytes" % MAX_LINE)
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
            raise Fail(EXIT_QMP_LOST, "cannot send in time") from None
        except OSError as exc:
            raise Fail(EXIT_QMP_LOST, "connection lost: %s" % (exc.strerror or exc)) from None

    def reply(self, cid: "str", show: "bool" = True) -> "dict[str, object]":
        while True:
            doc = self.doc()
            if isinstance(doc, dict) and doc.get("id") == cid:
                if show:
                    out("memdump-qmp-reply", json.dumps(doc))
                return doc
            if isinstance(doc, dict) and isinstance(doc.get("event"), str):
                self.events.append(doc)  # STOP/RESUME time a live capture's pause

    def ask(
        self,
        execute: "str",
        arguments: "dict[str, object] | None" = None,
        show: "bool" = True,
        fds: "list[int] | None" = None,
    ) -> "dict[str, object]":
        """One command (``fds`` passed with it), its reply (printed unless ``show`` is
        false)."""
        self.n = getattr(self, "n", 100) + 1
        cid = "memdump-%d" % self.n
        doc = {"execute": execute, "id": cid}  # type: dict[str, object]
        if arguments is not None:
            doc["arguments"] = arguments
        self.send(doc, fds)
        return self.reply(cid, show)

    def greet_quiet(self) -> None:
        first = self.doc()
        if not isinstance(first, dict) or "QMP" not in first:
            raise Fail(EXIT_NOT_QMP, "not a QMP greeting")
        self.send({"execute": "qmp_capabilities", "id": "memdump-0"})
        if "return" not in self.reply("memdump-0", False):
            raise Fail(EXIT_NOT_QMP, "qmp_capabilities refused")

    def greet(self) -> None:
        try:
            first = self.doc()
        except Fail as exc:
            raise Fail(EXIT_NO_GREETING, "no QMP greeting: %s" % exc.message) from None
        if not isinstance(first, dict) or "QMP" not in first:
            raise Fail(EXIT_NOT_QMP, "not a QMP greeting")
        self.send({"execute": "qmp_capabilities", "id": "memdump-0"})
        if "return" not in self.reply("memdump-0"):
            raise Fail(EXIT_NOT_QMP, "qmp_capabilities refused")


def connect(path: "str", timeout: "float") -> "socket.socket":
    # QEMU serves one QMP client at a time and listens with a backlog of 1: while the
    # queue is full a connect fails at once with EAGAIN, so it is tried again.
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect(path)
            return sock
        except socket.timeout:
            sock.close()
            raise Fail(EXIT_NO_CONNECT, "cannot connect to %s: timed out" % path) from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EAGAIN and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise Fail(
                EXIT_NO_CONNECT, "cannot connect to %s: %s" % (path, exc.strerror or exc)
            ) from None


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
                raise Fail(
                    EXIT_FIFO_NO_READER, "cannot open the FIFO for writing: %s" % why
                ) from None
            time.sleep(0.01)
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise Fail(EXIT_FIFO_NO_READER, "%s is not this script's FIFO" % fifo)
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


# -- live capture (migration capability background-snapshot) ----------------------------

# What a live capture needs to know (preflight; nothing changes on the VM). The devices
# under /machine/peripheral(-anon) are every -device; their QOM type "child<vfio-...>"
# marks a VFIO device.
PREFLIGHT = [
    ("query-version", None),
    ("query-status", None),
    ("query-migrate", None),
    ("query-migrate-capabilities", None),
    ("qom-list", {"path": "/machine/peripheral"}),
    ("qom-list", {"path": "/machine/peripheral-anon"}),
    ("human-monitor-command", {"command-line": "info mtree -f"}),
    ("human-monitor-command", {"command-line": "info registers"}),  # the core's e_machine
]
# query-migrate states after which no migration runs ("none", or no status at all: never).
IDLE = ("none", "completed", "failed", "cancelled")
CAP = "background-snapshot"


class Unsupported(Fail):
    def __init__(self, reason: "str") -> None:
        Fail.__init__(self, EXIT_LIVE_UNSUPPORTED, reason)


class Stop(Exception):
    """A signal (SIGTERM, SIGHUP, SIGINT, SIGPIPE) asked the client to stop, or the
    stream's reader is gone."""


def alive(pid: "int") -> bool:
    """``pid`` runs (a zombie does not: the reader is the script's child, reaped late)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def read_sysctl(path: "str") -> "str":
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def write_sysctl(path: "str", value: "str") -> None:
    with open(path, "w") as f:
        f.write(value + "\n")
    if read_sysctl(path) != value:
        raise OSError(errno.EIO, "%s reads back %r, not %r" % (path, read_sysctl(path), value))


def run_dir_fd(run_dir: "str") -> "str":
    """Why RUN_DIR cannot hold the window's lock and restore file ("" if it can): it must
    be a real directory of ours (root), 0700, as the dump scripts' memdump_start makes it."""
    try:
        st = os.lstat(run_dir)
    except OSError as exc:
        return "%s: %s" % (run_dir, exc.strerror)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return "%s is not a directory of uid %d with mode 0700" % (run_dir, os.geteuid())
    return ""


def lock_file(path: "str") -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def restore_left(sysctl: "str", restore: "str") -> "str":
    """Under the window lock: put back a value a killed client left in ``restore``; the
    value put back, "" if there was none."""
    try:
        fd = os.open(restore, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        value = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not value.isdigit():
        raise Fail(EXIT_NO_RUN_DIR, "%s holds %r, not a sysctl value" % (restore, value))
    write_sysctl(sysctl, value)
    os.unlink(restore)
    return value


class Window:
    """vm.unprivileged_userfaultfd set to 1 only while QEMU (not root) creates its
    userfaultfd for write tracking: the descriptor stays valid after the sysctl is put
    back. Serialised by a lock on RUN_DIR/userfaultfd.lock for the whole window; the old
    value waits in RUN_DIR/userfaultfd.restore until it is back, so a client killed
    outright is repaired by the next window or by the driver's clean-up (uffd-restore)."""

    def __init__(self, run_dir: "str", sysctl: "str") -> None:
        self.sysctl = sysctl
        self.lock = os.path.join(run_dir, "userfaultfd.lock")
        self.restore = os.path.join(run_dir, "userfaultfd.restore")
        self.run_dir = run_dir
        self.fd = -1
        self.old = ""
        self.t0 = 0.0
        self.length = 0.0

    def open(self, wait: "float" = 120.0) -> None:
        why = run_dir_fd(self.run_dir)
        if why:
            raise Unsupported("the userfaultfd window needs the run directory: %s" % why)
        fd = lock_file(self.lock)
        deadline = time.monotonic() + wait
        while True:  # another capture's window: they last milliseconds to seconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    os.close(fd)
                    raise Fail(
                        EXIT_NO_RUN_DIR, "cannot lock %s: %s" % (self.lock, exc.strerror)
                    ) from None
                time.sleep(0.02)
        self.fd = fd
        restore_left(self.sysctl, self.restore)
        old = read_sysctl(self.sysctl)
        if not old.isdigit():
            raise Unsupported("cannot read %s" % self.sysctl)
        rfd = os.open(self.restore, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(rfd, (old + "\n").encode())
            os.fsync(rfd)
        finally:
            os.close(rfd)
        self.old = old
        self.t0 = time.monotonic()
        write_sysctl(self.sysctl, "1")

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.old:
                write_sysctl(self.sysctl, self.old)
                os.unlink(self.restore)
                self.length = time.monotonic() - self.t0
                self.old = ""
        finally:
            os.close(self.fd)  # releases the lock
            self.fd = -1


def uffd_restore(run_dir: "str", sysctl: "str") -> int:
    lock = os.path.join(run_dir, "userfaultfd.lock")
    restore = os.path.join(run_dir, "userfaultfd.restore")
    if run_dir_fd(run_dir) or not os.path.lexists(restore):
        return 0
    fd = lock_file(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # a window is open: its client puts the value back
        value = restore_left(sysctl, restore)
        if value:
            out("memdump-uffd-restored", value)
    finally:
        os.close(fd)
    return 0


def ret(doc: "dict[str, object]") -> "dict[str, object]":
    r = doc.get("return")
    return r if isinstance(r, dict) else {}


def listed(v: "object") -> "list[object]":
    return v if isinstance(v, list) else []


def desc(doc: "dict[str, object]") -> "str":
    err = doc.get("error")
    if isinstance(err, dict):
        return str(err.get("desc") or err.get("class") or err)
    return ""


class Session:
    """QMP connections to one QEMU, the same pid each time (checked by peer_line)."""

    def __init__(self, path: "str", patterns: "list[str]", pid: "int" = 0) -> None:
        self.path = path
        self.patterns = patterns
        self.pid = pid
        self.q = None  # type: Qmp | None
        self.events = []  # type: list[dict[str, object]]

    def get(self, timeout: "float" = 30.0) -> "Qmp":
        if self.q is not None:
            self.q.deadline = time.monotonic() + timeout
            return self.q
        sock = connect(self.path, timeout)
        try:
            peer = peer_line(sock, self.patterns)
            if not self.pid:
                out("memdump-peer", *peer)
                self.pid = int(peer[0])
            elif int(peer[0]) != self.pid:
                raise Fail(
                    EXIT_NOT_QEMU,
                    "the socket is now served by pid %s, not %d" % (peer[0], self.pid),
                )
            q = Qmp(sock, time.monotonic() + timeout)
            q.greet_quiet()
        except BaseException:
            sock.close()
            raise
        self.q = q
        return q

    def release(self) -> None:
        """Close the connection: QEMU serves one QMP client at a time, and others (a
        listing, an operator) must get their turn while the snapshot runs."""
        if self.q is not None:
            self.events += self.q.events
            self.q.sock.close()
            self.q = None

    def ask(
        self,
        execute: "str",
        arguments: "dict[str, object] | None" = None,
        show: "bool" = True,
        fds: "list[int] | None" = None,
    ) -> "dict[str, object]":
        return self.get().ask(execute, arguments, show, fds)


def migration_status(s: "Session") -> "str":
    return str(ret(s.ask("query-migrate", show=False)).get("status", "none"))


def wait_idle(s: "Session", wait: "float") -> "str":
    deadline = time.monotonic() + wait
    st = migration_status(s)
    while st not in IDLE and time.monotonic() < deadline:
        time.sleep(0.05)
        st = migration_status(s)
    return st


def qemu_uid(pid: "int") -> int:
    """QEMU's effective uid now: the peer credentials are those of when it began to
    listen, before -runas (or libvirt's set-up) dropped root."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    raise Fail(EXIT_NOT_QEMU, "cannot read the uid of pid %d" % pid)


def checks(s: "Session", policy: "str", sysctl: "str") -> "tuple[str, tuple[int, int]]":
    """Refuse (Unsupported) what cannot run live, before anything changes; the
    userfaultfd method ("root", "unprivileged-allowed" or "sysctl-window") and QEMU's
    (major, minor) version."""
    qv = ret(s.ask("query-version")).get("qemu")
    try:
        version = (int(qv["major"]), int(qv["minor"]))  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise Unsupported("QEMU did not report its version") from None
    if version < (6, 0):
        raise Unsupported("QEMU %d.%d is older than 6.0 (no background-snapshot)" % version)
    st = ret(s.ask("query-status")).get("status")
    if st != "running":
        raise Unsupported("the guest is %s, not running" % st)
    mig = ret(s.ask("query-migrate"))
    if str(mig.get("status", "none")) not in IDLE:
        raise Unsupported("another migration is in progress (status %s)" % mig.get("status"))
    blocked = mig.get("blocked-reasons")
    if blocked:
        raise Unsupported("migration is blocked: %s" % "; ".join(str(b) for b in listed(blocked)))
    caps = listed(s.ask("query-migrate-capabilities").get("return"))
    if not any(isinstance(c, dict) and c.get("capability") == CAP for c in caps):
        raise Unsupported("this QEMU has no migration capability %s (QEMU 6.0 or later)" % CAP)
    for path in ("/machine/peripheral", "/machine/peripheral-anon"):
        for dev in listed(s.ask("qom-list", {"path": path}).get("return")):
            if isinstance(dev, dict) and str(dev.get("type", "")).startswith("child<vfio"):
                raise Unsupported("VFIO device %s cannot be snapshotted live" % dev.get("name"))
    uid = qemu_uid(s.pid)
    if uid == 0:
        return "root", version
    # With the window allowed it is always taken: a 1 read here may be another capture's
    # window, closed again by the time QEMU checks.
    if policy == "sysctl-window":
        return "sysctl-window", version
    value = read_sysctl(sysctl)
    if value == "1":
        return "unprivileged-allowed", version
    raise Unsupported(
        "QEMU runs as uid %d and vm.unprivileged_userfaultfd is %s: QEMU cannot create the "
        "userfaultfd write tracking needs (set the hypervisor's live_userfaultfd: "
        "sysctl-window to allow it for the set-up of each capture)" % (uid, value or "absent")
    )


SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE}


def on_signal(signum: "int", frame: "object") -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # once: the clean-up must not be cut short
    raise Stop()


def live(
    path: "str",
    fifo: "str",
    patterns: "list[str]",
    reader: "int",
    policy: "str",
    run_dir: "str",
    sysctl: "str",
    bandwidth: "int | None" = None,
    hugepages: "str" = "",
) -> int:
    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    s = Session(path, patterns)
    window = Window(run_dir, sysctl)
    started = False  # a migrate of ours was accepted
    touched = False  # the capability may be on
    final = {}  # type: dict[str, object]
    code = 0
    spare = -1
    version = (0, 0)
    uffd_before = 0
    bw = None  # type: tuple[int, int] | None
    try:
        try:
            s.get()
            method, version = checks(s, policy, sysctl)
            uffd_before = uffds(s.pid)
            # Which guest RAM is on huge pages, before the snapshot splits them; a failure
            # costs the restore only, never the capture.
            huge = huge_scan(hugepages, s.pid) if hugepages else None
            fd = open_writer(fifo, reader)
            try:
                # A read end of our own: QEMU's write never fails for want of a reader
                # (a failed background snapshot leaves QEMU < 8.1 write-protecting the
                # guest's memory for good), and an abort can drain the rest (see repair).
                spare = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
                a, b = os.fstat(fd), os.fstat(spare)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    raise Fail(EXIT_FIFO_NO_READER, "%s changed under us" % fifo)
                got = s.ask("getfd", {"fdname": FDNAME}, fds=[fd])
            finally:
                os.close(fd)  # QEMU has its copy: the reader's end of file is QEMU's close
            if "return" not in got:
                return 1
            if method == "sysctl-window":
                old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
                try:  # a signal in the middle would leave a restore file for nothing
                    window.open()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            touched = True
            got = s.ask(
                "migrate-set-capabilities", {"capabilities": [{"capability": CAP, "state": True}]}
            )
            if "return" not in got:
                raise Unsupported(desc(got))
            # A migrate without the capability in force is an ordinary migration, which
            # leaves the guest paused at its end: check it right before.
            caps = listed(s.ask("query-migrate-capabilities").get("return"))
            if not any(
                isinstance(c, dict) and c.get("capability") == CAP and c.get("state") is True
                for c in caps
            ):
                raise Unsupported("QEMU did not turn %s on" % CAP)
            t0 = time.time()
            # Signals held off until ``started`` says whether QEMU took the migrate: one
            # that came while its reply was on the way (QEMU already writing) would leave
            # the snapshot running, unrepaired (the capability on; before 8.1, with the
            # reader gone, the guest's memory write-protected for good).
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                got = s.ask("migrate", {"uri": "fd:" + FDNAME})
                started = "return" in got
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if not started:
                raise Unsupported("migrate refused: %s" % desc(got))
            # QEMU stops the guest, saves the devices, write-protects RAM with a new
            # userfaultfd (the window may close once QEMU holds it) and resumes the guest
            # (RESUME, which also ends the pause), unless the migration ends first.
            st = "setup"
            q = s.get()
            deadline = time.monotonic() + 120.0

            def resumed() -> bool:
                return any(e.get("event") == "RESUME" for e in q.events)

            while not resumed() and uffds(s.pid) <= uffd_before:
                st = migration_status(s)
                if st in IDLE or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            window.close()
            deadline = time.monotonic() + 10.0
            while not resumed() and st not in IDLE and time.monotonic() < deadline:
                st = migration_status(s)  # for the RESUME event: it times the pause
                time.sleep(0.005)
            t1 = time.time()
            out("memdump-pause-window", "%.6f" % t0, "%.6f" % t1)
            if bandwidth is not None and st not in IDLE:
                bw = bandwidth_before(s, bandwidth)  # from here repair() puts it back
                got = s.ask("migrate-set-parameters", {"max-bandwidth": bandwidth})
                if "return" not in got:
                    raise Fail(
                        EXIT_FAILED, "QEMU refused max-bandwidth %d: %s" % (bandwidth, desc(got))
                    )
            s.release()
            while st not in IDLE:
                time.sleep(0.1)
                final = ret(s.ask("query-migrate", show=False))
                st = str(final.get("status", "none"))
                s.release()
                if st not in IDLE and not alive(reader):
                    out("memdump-error", str(EXIT_STOPPED), "the stream's reader is gone")
                    raise Stop()
            if not final:
                final = ret(s.ask("query-migrate", show=False))
            out("memdump-live-stats", json.dumps(final))
            out("memdump-live-uffd", method, "%.6f" % window.length)
            if final.get("status") != "completed":
                code = EXIT_MIGRATION_FAILED
            if huge is not None:
                out("memdump-live-hugepages", huge_restore(hugepages, s.pid, huge, code == 0))
        except Stop:
            code = EXIT_STOPPED
            out("memdump-error", str(EXIT_STOPPED), "stopped by a signal")
    finally:
        # Every exit path: signals held off while QEMU and the sysctl are put right, and
        # ignored after (the client ends here anyway).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            code = repair(s, window, started, touched, final, code, spare, version, uffd_before, bw)
        finally:
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return code


def perl(program: "str", args: "list[str]", stdin: "bytes" = b"") -> "tuple[int, str]":
    """``perl -e PROGRAM ARGS...``: (exit status, stdout); 127: no perl."""
    try:
        p = subprocess.run(  # noqa: S603, S607 - fixed program, arguments as a list
            ["perl", "-e", program] + args,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    except OSError:
        return 127, ""
    except subprocess.TimeoutExpired:
        return 124, ""
    return p.returncode, p.stdout.decode("ascii", "replace")


def huge_scan(program: "str", pid: "int") -> "tuple[str, str]":
    """(hugepages.pl's scan of QEMU ``pid``, "") or ("", why it failed)."""
    rc, text = perl(program, ["scan", str(pid)])
    if rc == 127:
        return "", "unavailable no-perl"
    if rc != 0:
        return "", "unavailable scan-%d" % rc
    return text, ""


def huge_restore(program: "str", pid: "int", scan: "tuple[str, str]", completed: "bool") -> "str":
    """The memdump-live-hugepages line's value: the collapse's result, or why not."""
    text, failed = scan
    if failed:
        return failed
    if not completed:
        return "unavailable not-completed"
    rc, result = perl(program, ["collapse", str(pid)], text.encode("ascii"))
    if rc != 0:
        return "unavailable collapse-%d" % rc
    return result.strip()


def bandwidth_before(s: "Session", bandwidth: "int") -> "tuple[int, int]":
    """(QEMU's max-bandwidth now, ``bandwidth``), printed before the cap is set (a repair
    after a kill reads it). The cap is set once the snapshot runs: QEMU's snapshot thread
    disables the rate limit when it starts, so a max-bandwidth set before ``migrate`` is
    ignored; a parameter set while a migration runs applies to it."""
    old = ret(s.ask("query-migrate-parameters", show=False)).get("max-bandwidth")
    if not isinstance(old, int) or isinstance(old, bool) or old < 0:
        raise Fail(EXIT_FAILED, "QEMU did not report its migration max-bandwidth")
    out("memdump-live-bandwidth", str(old), str(bandwidth))
    return (old, bandwidth)


def drain(s: "Session", spare: "int", wait: "float") -> "str":
    """Read the rest of the stream into nothing until the migration has ended; its
    last status. Woken by poll(2) as soon as QEMU writes: a sleep whenever the pipe was
    momentarily empty took ~64 KiB (a pipe's worth) per sleep, 13 MB/s, 19 s for a
    256 MiB guest, all of it with the guest's memory write-protected."""
    deadline = time.monotonic() + wait
    poller = select.poll()
    poller.register(spare, select.POLLIN)
    st = migration_status(s)
    while st not in IDLE and time.monotonic() < deadline:
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            if not poller.poll(max(1, int((end - time.monotonic()) * 1000))):
                continue  # nothing yet: QEMU between writes
            try:
                if not os.read(spare, 1 << 20):
                    break  # every writer is gone (QEMU closed the stream)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
        st = migration_status(s)
    return st


def repair(
    s: "Session",
    window: "Window",
    started: "bool",
    touched: "bool",
    final: "dict[str, object]",
    code: "int",
    spare: "int" = -1,
    version: "tuple[int, int]" = (0, 0),
    uffd_before: "int" = 0,
    bw: "tuple[int, int] | None" = None,
) -> int:
    errors = []
    try:
        window.close()
    except Exception as exc:
        errors.append("cannot put vm.unprivileged_userfaultfd back: %s" % exc)
    for e in s.events + (s.q.events if s.q is not None else []):
        out("memdump-qmp-event", json.dumps(e))
    try:
        if started and str(final.get("status")) not in IDLE:
            # QEMU before 8.1 stops write tracking only when a background snapshot
            # completes: a cancelled or failed one leaves the guest's memory
            # write-protected, its next write to a page not yet saved hangs. There the
            # snapshot is run to its end, into nothing; from 8.1 on it is cancelled
            # (the rest still drained: QEMU cannot shut a FIFO down under a write).
            if version >= (8, 1):
                s.ask("migrate_cancel")
            st = drain(s, spare, 3600.0) if spare >= 0 else wait_idle(s, 30.0)
            if st not in IDLE:
                errors.append("the migration is still %s" % st)
        if touched:
            got = s.ask(
                "migrate-set-capabilities", {"capabilities": [{"capability": CAP, "state": False}]}
            )
            if "return" not in got:
                errors.append("cannot turn %s off: %s" % (CAP, desc(got)))
        if bw is not None:
            got = s.ask("migrate-set-parameters", {"max-bandwidth": bw[0]})
            if "return" not in got:
                errors.append("cannot put max-bandwidth %d back: %s" % (bw[0], desc(got)))
        if started and uffds(s.pid) > uffd_before:
            errors.append(
                "QEMU still holds the snapshot's userfaultfd: the guest's memory may stay "
                "write-protected (QEMU before 8.1 keeps it after a snapshot that did not "
                "complete)"
            )
        if started:
            left = str(ret(s.ask("query-status")).get("status"))
            if left in ("postmigrate", "paused", "finish-migrate"):
                s.ask("cont")
                errors.append("the guest was left %s by the migration and was resumed" % left)
                code = EXIT_LEFT_PAUSED if code == 0 else code
        else:
            s.ask("closefd", {"fdname": FDNAME})  # harmless if QEMU has none by that name
    except Fail as exc:
        errors.append(exc.message)
    finally:
        s.release()
        if spare >= 0:
            os.close(spare)
    for problem in errors:
        out("memdump-error", str(EXIT_STOPPED), " ".join(problem.split()))
    if errors and code == 0:
        code = EXIT_STOPPED
    return code


def preflight(path: "str", patterns: "list[str]", sysctl: "str") -> int:
    sock = connect(path, 30.0)
    try:
        peer = peer_line(sock, patterns)
        out("memdump-peer", *peer)
        out("memdump-qemu-uid", str(qemu_uid(int(peer[0]))))
        q = Qmp(sock, time.monotonic() + 30.0)
        q.greet()
        for i, (execute, arguments) in enumerate(PREFLIGHT):
            doc = {"execute": execute, "id": "memdump-%d" % (i + 1)}  # type: dict[str, object]
            if arguments is not None:
                doc["arguments"] = arguments
            q.send(doc)
            q.reply("memdump-%d" % (i + 1))
    finally:
        sock.close()
    out("memdump-uffd", read_sysctl(sysctl))
    return 0


def uffds(pid: "int") -> int:
    """How many userfaultfds ``pid`` holds (write tracking holds one while it runs)."""
    n = 0
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:[userfaultfd]":
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


def open_spare(fifo: "str") -> int:
    """A read end of a dead live script's FIFO (ours: root's, a FIFO), -1 if none."""
    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        return -1
    return fd


def restore_bandwidth(s: "Session", bw: "tuple[int, int] | None") -> None:
    """A killed client's max-bandwidth ``bw`` = (OLD, NEW): OLD put back if NEW, the
    client's, is still in force (a value someone set since is left alone)."""
    if bw is None or bw[0] == bw[1]:
        return
    now = ret(s.ask("query-migrate-parameters", show=False)).get("max-bandwidth")
    if now == bw[1]:
        got = s.ask("migrate-set-parameters", {"max-bandwidth": bw[0]}, show=False)
        if "return" in got:
            out("memdump-repaired", "max-bandwidth", str(bw[0]))
        else:
            out(
                "memdump-repair-failed", "cannot put max-bandwidth %d back: %s" % (bw[0], desc(got))
            )


def repair_left(
    path: "str", patterns: "list[str]", pid: "int", fifo: "str", bw: "tuple[int, int] | None"
) -> int:
    """A live client killed outright: its QEMU (same pid) may still migrate with the
    capability on. Only then: end the migration (run into nothing through the dead
    script's FIFO, cancelled first from QEMU 8.1 on: see repair) and turn the capability
    off. A migration of someone else's, without background-snapshot, is left alone. The
    client's max-bandwidth ``bw`` is put back in either case (restore_bandwidth)."""
    s = Session(path, patterns, pid)
    spare = open_spare(fifo)
    try:
        caps = listed(s.ask("query-migrate-capabilities", show=False).get("return"))
        if not any(
            isinstance(c, dict) and c.get("capability") == CAP and c.get("state") is True
            for c in caps
        ):
            restore_bandwidth(s, bw)
            return 0
        if migration_status(s) not in IDLE:
            qv = ret(s.ask("query-version", show=False)).get("qemu")
            if isinstance(qv, dict) and (qv.get("major", 0), qv.get("minor", 0)) >= (8, 1):
                s.ask("migrate_cancel", show=False)
            st = drain(s, spare, 3600.0) if spare >= 0 else wait_idle(s, 30.0)
            out("memdump-repaired", "migration", st)
        s.ask(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": CAP, "state": False}]},
            show=False,
        )
        out("memdump-repaired", CAP, "off")
        restore_bandwidth(s, bw)
        if uffds(pid):
            out(
                "memdump-repair-failed",
                "QEMU pid %d still holds a userfaultfd: a background snapshot that did not "
                "complete left its write protection on (QEMU before 8.1); the guest's writes "
                "to the pages not saved hang until QEMU is restarted" % pid,
            )
    finally:
        s.release()
        if spare >= 0:
            os.close(spare)
    return 0


def digits(v: "str") -> bool:
    """ASCII digits only (str.isdigit also takes other scripts' digits)."""
    return v != "" and v.strip("0123456789") == ""


def main(argv: "list[str]") -> int:
    if sys.version_info < (3, 6):
        out("memdump-error", str(EXIT_NO_PYTHON), "python3 on the hypervisor is older than 3.6")
        return EXIT_NO_PYTHON
    try:
        if len(argv) >= 5 and argv[0] == "query":
            return query(float(argv[1]), argv[2], argv[3].split("\n"), argv[4:])
        if len(argv) == 5 and argv[0] == "dump" and argv[4].isdigit():
            return dump(argv[1], argv[2], argv[3].split("\n"), int(argv[4]))
        if len(argv) == 4 and argv[0] == "preflight":
            return preflight(argv[1], argv[2].split("\n"), argv[3])
        if len(argv) in (8, 9, 10) and argv[0] == "live" and argv[4].isdigit():
            a = argv
            bandwidth = None  # type: int | None
            if len(a) >= 9 and a[8] != "":
                if not digits(a[8]) or not 0 < int(a[8]) < 1 << 64:
                    out(
                        "memdump-error",
                        str(EXIT_BAD_ARGUMENT),
                        "BANDWIDTH must be 1 to 2**64-1 bytes/s",
                    )
                    return EXIT_BAD_ARGUMENT
                bandwidth = int(a[8])
            huge = a[9] if len(a) == 10 else ""
            return live(a[1], a[2], a[3].split("\n"), int(a[4]), a[5], a[6], a[7], bandwidth, huge)
        if len(argv) == 3 and argv[0] == "uffd-restore":
            return uffd_restore(argv[1], argv[2])
        if len(argv) in (5, 7) and argv[0] == "repair" and argv[3].isdigit():
            bw = None  # type: tuple[int, int] | None
            if len(argv) == 7 and digits(argv[5]) and digits(argv[6]):
                bw = (int(argv[5]), int(argv[6]))
            return repair_left(argv[1], argv[2].split("\n"), int(argv[3]), argv[4], bw)
    except Fail as exc:
        out("memdump-error", str(exc.code), " ".join(exc.message.split()))
        return exc.code
    usage = "usage: query TIMEOUT COMMANDS BINARIES SOCKET... | dump ..."
    out("memdump-error", str(EXIT_BAD_ARGUMENT), usage)
    return EXIT_BAD_ARGUMENT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
