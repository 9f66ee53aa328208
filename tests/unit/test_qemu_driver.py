"""The plain-QEMU driver's hypervisor-side scripts and QMP client (remote/qmp.py), run
through the local transport (a real sh and python3) against fake QMP servers: the QMP
exchange, lookups, the check of who serves a socket (SO_PEERCRED pid, /proc/PID/exe), and
the dump handed to QEMU as a file descriptor (getfd, SCM_RIGHTS), never as a path."""

from __future__ import annotations

import array
import hashlib
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from memdump.errors import (
    ConfigError,
    DumpFailedError,
    HypervisorError,
    VMNotFoundError,
)
from memdump.hypervisors import open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.qemu import DEFAULT_QMP_DIR, QemuDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.local import LocalTransport
from tests.helpers.elfgen import make_core

# The fakes run in this process: the peer of their sockets is this python binary, which the
# drivers of these tests allow as if it were QEMU (the default qemu_binaries do not).
THIS_EXE = os.readlink("/proc/self/exe")


@pytest.fixture(autouse=True)
def _python3() -> None:
    # The QMP client runs with the "hypervisor's" python3: here the one on PATH.
    assert shutil.which("python3"), "python3 is missing"


UUID = "6f1c2a4e-0000-4000-8000-00000000abcd"


class FakeQemu(threading.Thread):
    """One QMP socket, one client at a time (as QEMU's). Keeps the descriptors it is sent
    (SCM_RIGHTS) by ``getfd`` name. ``dump``: "ok" writes ``core`` into the descriptor
    named by ``protocol: fd:NAME`` and closes it; "error" fails without taking it;
    "endless" writes until the write fails (an aborted dump)."""

    def __init__(self, path: Path, *, status: str = "running", name: str = "", core: bytes = b""):
        super().__init__(daemon=True)
        self.path, self.status, self.qname, self.core = path, status, name, core
        self.dump = "ok"
        self.commands: list[str] = []
        self.received_fds = 0
        self.fds: dict[str, int] = {}
        self.protocol: str | None = None
        self.fd_stat: os.stat_result | None = None
        self.fd_path = ""
        self.write_error: str | None = None
        self.writing = threading.Event()
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
                    pass  # the client went away (an abort)

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
                    self.received_fds += len(fds)
            if not data:
                return
            buf += data

    def _send(self, conn: socket.socket, doc: dict[str, Any]) -> None:
        conn.sendall(json.dumps(doc).encode() + b"\n")

    def _serve(self, conn: socket.socket) -> None:
        self._send(conn, {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}})
        pending: list[int] = []
        for line in self._lines(conn, pending):
            cmd = json.loads(line)
            ex, cid, args = cmd["execute"], cmd.get("id"), cmd.get("arguments", {})
            self.commands.append(ex)
            # An asynchronous event before every reply: the client must skip it.
            self._send(conn, {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NIC_RX"})
            ret: Any = {}
            err = ""
            if ex == "query-status":
                ret = {"status": self.status, "running": self.status == "running"}
            elif ex == "query-name":
                ret = {"name": self.qname} if self.qname else {}
            elif ex == "query-uuid":
                ret = {"UUID": UUID if self.qname else "00000000-0000-0000-0000-000000000000"}
            elif ex == "query-memory-size-summary":
                ret = {"base-memory": 256 << 20, "plugged-memory": 1 << 20}
            elif ex == "query-version":
                ret = {"qemu": {"major": 7, "minor": 2, "micro": 9}, "package": "fake"}
            elif ex == "getfd":  # as QEMU: the last descriptor received, under that name
                if not pending:
                    err = "No file descriptor supplied via SCM_RIGHTS"
                else:
                    self._close(args["fdname"])
                    self.fds[args["fdname"]] = pending.pop()
            elif ex == "closefd":
                if args["fdname"] not in self.fds:
                    err = f"File descriptor named '{args['fdname']}' not found"
                self._close(args["fdname"])
            elif ex == "dump-guest-memory":
                err = self._dump(args)
            if err:
                self._send(conn, {"id": cid, "error": {"class": "GenericError", "desc": err}})
            else:
                self._send(conn, {"return": ret, "id": cid})

    def _close(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _dump(self, args: dict[str, Any]) -> str:
        assert args == {"paging": False, "protocol": args["protocol"], "format": "elf"}
        self.protocol = args["protocol"]
        if self.dump == "error":
            return "dump: boom"
        if not self.protocol.startswith("fd:") or self.protocol[3:] not in self.fds:
            return f"fake: no descriptor for protocol {self.protocol}"
        fd = self.fds.pop(self.protocol[3:])
        self.fd_stat = os.fstat(fd)
        self.fd_path = os.readlink(f"/proc/self/fd/{fd}")
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                self.writing.set()
                out.write(self.core)
                while self.dump == "endless":
                    out.write(bytes(1 << 16))
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
            return f"dump: failed to write elf header: {exc.strerror}"
        return ""

    def stop(self) -> None:
        self.srv.close()
        for name in list(self.fds):
            self._close(name)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short plain paths: the socket path goes into sun_path and the scripts' arguments.
    base = Path(tempfile.mkdtemp(prefix="mdq", dir="/tmp"))
    (base / "qmp").mkdir()
    (base / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(base / "tmp"))
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(base / "tmp"))  # the scripts' root-only base
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def core() -> bytes:
    return make_core([(0, os.urandom(300_000)), (1 << 20, bytes(2_000_000))])


@pytest.fixture
def vms(env: Path, core: bytes) -> Iterator[dict[str, FakeQemu]]:
    q = env / "qmp"
    fakes = {
        "vm-a": FakeQemu(q / "vm-a.qmp", name="guest-a", core=core),
        "vm-b": FakeQemu(q / "vm-b.qmp", status="paused"),
        "vm-c": FakeQemu(q / "vm-c.qmp", status="shutdown"),
    }
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(q / "vm-stale.qmp"))  # a socket file nobody listens on
    stale.close()
    (q / "vm-a.pid").write_text("1\n")  # not a socket: ignored
    yield fakes
    for f in fakes.values():
        f.stop()


def _driver(env: Path, binaries: list[str] | None = None) -> QemuDriver:
    hv = HypervisorConfig(
        name="hv",
        driver="qemu",
        transport="local",
        qmp_dir=str(env / "qmp"),
        qemu_binaries=binaries or [THIS_EXE],
    )
    return QemuDriver(hv, LocalTransport(stall_timeout=20))


def _wait_empty(d: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(d.iterdir())


def test_settings_accept_qemu_and_check_qmp_dir_and_binaries() -> None:
    hv = HypervisorConfig(name="q", driver="qemu", transport="local", qmp_dir="/run/x-1/q_2")
    assert isinstance(open_driver(hv, Settings().ssh), QemuDriver)
    assert HypervisorConfig(name="q", driver="qemu").qmp_dir is None  # driver: DEFAULT_QMP_DIR
    assert DEFAULT_QMP_DIR == "/run/memdump-qemu"
    for bad in ("run/q", "/run/a,b", "/run/a:b", "/run/a b", "/run/../etc", "/" + "a" * 90):
        with pytest.raises(ValidationError):
            HypervisorConfig(name="q", driver="qemu", qmp_dir=bad)
    # Only QEMU's usual install paths by default: not any program named qemu-something.
    assert hv.qemu_binaries == [
        "/usr/bin/qemu-system-*",
        "/usr/libexec/qemu-kvm",
        "/usr/local/bin/qemu-system-*",
    ]
    # One line each (they reach the hypervisor newline-separated), absolute, some.
    for bad_bins in ([], ["qemu-system-*"], ["/usr/bin/qemu\n/tmp/*"], ["/x\x00"]):
        with pytest.raises(ValidationError):
            HypervisorConfig(name="q", driver="qemu", qemu_binaries=bad_bins)


def test_lists_answering_running_and_paused_vms(env: Path, vms: dict[str, FakeQemu]) -> None:
    refs = _driver(env).list_vms()
    assert refs == [VMRef("hv", "vm-a", "vm-a"), VMRef("hv", "vm-b", "vm-b")]
    # Each got the capabilities handshake, then its queries, on one connection.
    want = ["qmp_capabilities", "query-status", "query-name", "query-uuid"]
    assert vms["vm-a"].commands[:4] == want


def test_resolve_by_socket_name_qemu_name_and_uuid(env: Path, vms: dict[str, FakeQemu]) -> None:
    d = _driver(env)
    want = VMRef("hv", "vm-a", "vm-a")
    assert d.resolve("vm-a") == d.resolve("guest-a") == d.resolve(UUID) == want
    assert d.resolve(UUID.upper()) == want
    assert d.resolve("vm-b") == VMRef("hv", "vm-b", "vm-b")
    for missing in ("vm-zz", "vm-stale", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(VMNotFoundError):
            d.resolve(missing)


def test_snapshot_names_the_process_serving_the_socket(env: Path, vms: dict[str, FakeQemu]) -> None:
    info = _driver(env).snapshot(VMRef("hv", "vm-a", "vm-a"))
    assert info.state == "running" and info.running
    assert info.uuid == UUID and info.memory_bytes == (256 << 20) + (1 << 20)
    assert info.versions == {"hypervisor": "QEMU 7.2.9", "qemu_package": "fake"}
    assert info.hypervisor_host == os.uname().nodename and info.host_key == ""
    # The pid is the socket's peer (SO_PEERCRED: this process, where the fake listens),
    # not a process found by its name, and the digest is of that pid's command line.
    assert info.domain_id == str(os.getpid())
    cmdline = Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
    assert info.domain_xml_sha256 == hashlib.sha256(cmdline).hexdigest()
    assert _driver(env).snapshot(VMRef("hv", "vm-c", "vm-c")).running is False


def test_unreadable_dir_is_an_error(env: Path) -> None:
    d = QemuDriver(
        HypervisorConfig(name="hv", driver="qemu", transport="local", qmp_dir=str(env / "nope")),
        LocalTransport(),
    )
    with pytest.raises(HypervisorError, match="no directory"):
        d.list_vms()


def test_dump_hands_qemu_a_descriptor_of_a_root_only_fifo(
    env: Path, vms: dict[str, FakeQemu], core: bytes, tmp_path: Path
) -> None:
    src = _driver(env).open_dump(VMRef("hv", "vm-a", "vm-a"))
    res = write_dump(src, tmp_path, "a.mem.gz")
    assert res.raw_bytes == len(core)
    assert src.pause_window is not None and src.pause_window[0] <= src.pause_window[1]
    assert src.staging == "fifo" and src.dump_format.startswith("ELF64 core: QMP")
    fake = vms["vm-a"]
    # QEMU got an open descriptor (getfd + fd:NAME), never a path to open.
    assert fake.commands == ["qmp_capabilities", "getfd", "dump-guest-memory"]
    assert fake.protocol == "fd:memdump" and fake.received_fds == 1
    assert fake.fd_stat is not None and stat.S_ISFIFO(fake.fd_stat.st_mode)
    # The FIFO it writes stayed the script's: 0600, in its 0700 dir, owned by its uid.
    fifo = Path(fake.fd_path)
    assert fifo.name == "mem" and fifo.parent.parent == env / "tmp"
    assert fake.fd_stat.st_uid == os.geteuid()
    assert stat.S_IMODE(fake.fd_stat.st_mode) == 0o600
    assert _wait_empty(env / "tmp") == []


def test_a_socket_not_served_by_qemu_is_refused(
    env: Path, vms: dict[str, FakeQemu], tmp_path: Path
) -> None:
    # The default qemu_binaries: the fakes' process (python) is no QEMU, whatever the
    # socket is called. Nothing is sent to it: no command, no descriptor.
    d = QemuDriver(
        HypervisorConfig(name="hv", driver="qemu", transport="local", qmp_dir=str(env / "qmp")),
        LocalTransport(stall_timeout=20),
    )
    assert d.list_vms() == []
    with pytest.raises(HypervisorError) as ei:
        d.snapshot(VMRef("hv", "vm-a", "vm-a"))
    assert type(ei.value) is HypervisorError and not ei.value.retryable
    assert "not served by an allowed QEMU" in str(ei.value) and THIS_EXE in str(ei.value)
    with pytest.raises(HypervisorError) as ei:
        write_dump(d.open_dump(VMRef("hv", "vm-a", "vm-a")), tmp_path, "a.mem.gz")
    assert type(ei.value) is HypervisorError and not ei.value.retryable
    assert "not served by an allowed QEMU" in str(ei.value)
    assert list(tmp_path.iterdir()) == []
    for fake in vms.values():
        assert fake.commands == [] and fake.received_fds == 0 and fake.protocol is None
    assert _wait_empty(env / "tmp") == []


_LISTENER = """import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(1)
print("up", flush=True)
time.sleep(120)
"""


def test_a_qemu_named_binary_others_could_replace_is_refused(env: Path) -> None:
    # A program that matches qemu_binaries but lives where a non-root user could have
    # put it (under /tmp, writable by all) is not trusted as QEMU.
    bindir = env / "bin"
    bindir.mkdir(mode=0o755)
    exe = bindir / "qemu-system-x86_64"
    shutil.copy2(os.path.realpath(sys.executable), exe)
    sock = env / "qmp" / "vm-x.qmp"
    proc = subprocess.Popen(
        [str(exe), "-c", _LISTENER, str(sock)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert os.readlink(f"/proc/{proc.pid}/exe") == str(exe)
        d = _driver(env, [str(exe)])
        with pytest.raises(HypervisorError) as ei:
            d.snapshot(VMRef("hv", "vm-x", "vm-x"))
        assert not ei.value.retryable
        assert "/tmp is writable by group or others" in str(ei.value)
        assert d.list_vms() == []
    finally:
        proc.kill()
        proc.wait()


def test_python3_missing_is_a_clear_non_retryable_error(
    env: Path, vms: dict[str, FakeQemu], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hypervisor with sh but no python3 (Debian's qemu-system does not depend on it).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    monkeypatch.setenv("PATH", str(bindir))
    d = _driver(env)
    for call in (
        d.list_vms,
        lambda: d.snapshot(VMRef("hv", "vm-a", "vm-a")),
        lambda: write_dump(d.open_dump(VMRef("hv", "vm-a", "vm-a")), tmp_path, "a.gz"),
    ):
        with pytest.raises(HypervisorError) as ei:
            call()
        assert type(ei.value) is HypervisorError and not ei.value.retryable
        assert "python3 on the hypervisor is missing" in str(ei.value)
    assert vms["vm-a"].commands == []


# A python3 without json, as Debian's python3-minimal alone: the client, run by the
# wrapper below exactly as the scripts run it, cannot import it.
_NO_JSON = (
    'import sys; sys.modules["json"] = None; '
    'exec(compile(sys.stdin.read(), "qmp.py", "exec"), {"__name__": "__main__"})'
)


def test_python3_without_its_stdlib_is_a_clear_non_retryable_error(
    env: Path, vms: dict[str, FakeQemu], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "python3"
    wrapper.write_text(
        "#!/bin/sh\n"
        'while [ "$1" != - ]; do shift; done; shift\n'  # drop "-I -S -": -c below
        f'exec {shlex.quote(THIS_EXE)} -I -S -c {shlex.quote(_NO_JSON)} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    d = _driver(env)
    for call in (
        d.list_vms,
        lambda: d.snapshot(VMRef("hv", "vm-a", "vm-a")),
        lambda: write_dump(d.open_dump(VMRef("hv", "vm-a", "vm-a")), tmp_path, "a.gz"),
    ):
        with pytest.raises(HypervisorError) as ei:
            call()
        assert type(ei.value) is HypervisorError and not ei.value.retryable
        assert "python3 on the hypervisor cannot run the QMP client" in str(ei.value)
        assert "lacks json" in str(ei.value)
    assert vms["vm-a"].commands == []
    assert _wait_empty(env / "tmp") == []


def test_qmp_error_fails_fast_frees_the_reader_and_the_descriptor(
    env: Path, vms: dict[str, FakeQemu], tmp_path: Path
) -> None:
    fake = vms["vm-a"]
    fake.dump = "error"
    t0 = time.monotonic()
    with pytest.raises(DumpFailedError, match="dump: boom") as ei:
        write_dump(_driver(env).open_dump(VMRef("hv", "vm-a", "vm-a")), tmp_path, "a.mem.gz")
    assert time.monotonic() - t0 < 10 and ei.value.fields["exit_code"] != 0
    assert list(tmp_path.iterdir()) == []
    # QEMU did not take the descriptor: the client closed it (closefd), so nothing holds
    # the FIFO's write end.
    assert fake.commands[-1] == "closefd" and fake.fds == {}
    assert _wait_empty(env / "tmp") == []


def test_missing_and_stale_sockets(env: Path, vms: dict[str, FakeQemu], tmp_path: Path) -> None:
    d = _driver(env)
    with pytest.raises(VMNotFoundError):
        write_dump(d.open_dump(VMRef("hv", "vm-zz", "vm-zz")), tmp_path, "z.mem.gz")
    with pytest.raises(DumpFailedError, match="(?i)refused"):
        write_dump(d.open_dump(VMRef("hv", "vm-stale", "vm-stale")), tmp_path, "s.mem.gz")
    assert _wait_empty(env / "tmp") == []


def test_file_staging_is_refused(env: Path) -> None:
    with pytest.raises(ConfigError, match="only staging 'fifo'"):
        _driver(env).open_dump(VMRef("hv", "vm-a", "vm-a"), staging="file")


def test_abort_breaks_qemus_writes_and_leaves_nothing(env: Path, vms: dict[str, FakeQemu]) -> None:
    fake = vms["vm-a"]
    fake.dump = "endless"
    src = _driver(env).open_dump(VMRef("hv", "vm-a", "vm-a"))
    assert src.readinto(memoryview(bytearray(1 << 16))) > 0
    assert fake.writing.wait(10)
    src.abort()
    deadline = time.monotonic() + 10
    while fake.write_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.write_error is not None and "pipe" in fake.write_error.lower()
    assert _wait_empty(env / "tmp") == []
