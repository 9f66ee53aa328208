"""The plain-QEMU driver's hypervisor-side scripts, run through the local transport (a
real sh and socat) against fake QMP servers: the QMP exchange, lookups, and the dump's
FIFO discipline, including a QEMU left blocked in open() on the FIFO."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from memdump.errors import ConfigError, DumpFailedError, HypervisorError, VMNotFoundError
from memdump.hypervisors import open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.qemu import DEFAULT_QMP_DIR, QemuDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.local import LocalTransport
from tests.elfgen import make_core


@pytest.fixture(autouse=True)
def _socat() -> None:
    # scripts/bootstrap installs socat: its absence is a broken setup, never a skip.
    assert shutil.which("socat"), "socat is missing (scripts/bootstrap installs it)"


UUID = "6f1c2a4e-0000-4000-8000-00000000abcd"


class FakeQemu(threading.Thread):
    """One QMP socket, one client at a time (as QEMU's). ``dump``: "ok" writes ``core``
    into the file named by the protocol, "error" fails without opening it, "stuck" kills
    the reader first (its pid from the dump dir) and then blocks in open() on the FIFO."""

    def __init__(self, path: Path, *, status: str = "running", name: str = "", core: bytes = b""):
        super().__init__(daemon=True)
        self.path, self.status, self.qname, self.core = path, status, name, core
        self.dump = "ok"
        self.commands: list[str] = []
        self.opening = threading.Event()
        self.opened = threading.Event()
        self.write_error: str | None = None
        self.fifo: str | None = None
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
            try:
                with conn, conn.makefile("rwb") as f:
                    self._serve(f)
            except (OSError, ValueError):
                pass  # the client went away (an abort)

    def _send(self, f: Any, doc: dict[str, Any]) -> None:
        f.write(json.dumps(doc).encode() + b"\n")
        f.flush()

    def _serve(self, f: Any) -> None:
        self._send(f, {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}})
        for line in f:
            cmd = json.loads(line)
            ex, cid = cmd["execute"], cmd.get("id")
            self.commands.append(ex)
            # An asynchronous event before every reply: the client must skip it.
            self._send(f, {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NIC_RX"})
            ret: Any = {}
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
            elif ex == "dump-guest-memory":
                err = self._dump(cmd["arguments"])
                if err:
                    self._send(f, {"id": cid, "error": {"class": "GenericError", "desc": err}})
                    continue
            self._send(f, {"return": ret, "id": cid})

    def _dump(self, args: dict[str, Any]) -> str:
        assert args == {"paging": False, "protocol": args["protocol"], "format": "elf"}
        path = args["protocol"].removeprefix("file:")
        self.fifo = path
        if self.dump == "error":
            return "dump: boom"
        if self.dump == "stuck":
            reader = int(Path(path).with_name("reader").read_text())
            os.kill(reader, signal.SIGKILL)
            time.sleep(0.2)
        self.opening.set()
        try:
            fd = os.open(path, os.O_WRONLY)  # blocks until the FIFO has a reader
        except OSError as exc:
            self.write_error = str(exc)
            return f"dump: {exc}"
        self.opened.set()
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.core)
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
            return f"dump: failed to write elf header: {exc.strerror}"
        return ""

    def stop(self) -> None:
        self.srv.close()
        if self.fifo and self.opening.is_set() and not self.opened.is_set():
            with contextlib.suppress(OSError):  # never leave a thread blocked
                os.close(os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short plain paths: the socket path goes into a socat address and sun_path.
    base = Path(tempfile.mkdtemp(prefix="mdq", dir="/tmp"))
    (base / "qmp").mkdir()
    (base / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(base / "tmp"))
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


def _driver(env: Path) -> QemuDriver:
    hv = HypervisorConfig(name="hv", driver="qemu", transport="local", qmp_dir=str(env / "qmp"))
    return QemuDriver(hv, LocalTransport(stall_timeout=20))


def _wait_empty(d: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(d.iterdir())


def test_settings_accept_qemu_and_check_qmp_dir() -> None:
    hv = HypervisorConfig(name="q", driver="qemu", transport="local", qmp_dir="/run/x-1/q_2")
    assert isinstance(open_driver(hv, Settings().ssh), QemuDriver)
    assert HypervisorConfig(name="q", driver="qemu").qmp_dir is None  # driver: DEFAULT_QMP_DIR
    assert DEFAULT_QMP_DIR == "/run/memdump-qemu"
    for bad in ("run/q", "/run/a,b", "/run/a:b", "/run/a b", "/run/../etc", "/" + "a" * 90):
        with pytest.raises(ValidationError):
            HypervisorConfig(name="q", driver="qemu", qmp_dir=bad)


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


def test_snapshot(env: Path, vms: dict[str, FakeQemu]) -> None:
    info = _driver(env).snapshot(VMRef("hv", "vm-a", "vm-a"))
    assert info.state == "running" and info.running
    assert info.uuid == UUID and info.memory_bytes == (256 << 20) + (1 << 20)
    assert info.versions == {"hypervisor": "QEMU 7.2.9", "qemu_package": "fake"}
    assert info.hypervisor_host == os.uname().nodename and info.host_key == ""
    # The fake is no QEMU process: no pid, no command line digest.
    assert info.domain_id is None and info.domain_xml_sha256 == ""
    assert _driver(env).snapshot(VMRef("hv", "vm-c", "vm-c")).running is False


def test_unreadable_dir_is_an_error(env: Path) -> None:
    d = QemuDriver(
        HypervisorConfig(name="hv", driver="qemu", transport="local", qmp_dir=str(env / "nope")),
        LocalTransport(),
    )
    with pytest.raises(HypervisorError, match="no directory"):
        d.list_vms()


def test_dump_streams_qemus_bytes_and_leaves_nothing(
    env: Path, vms: dict[str, FakeQemu], core: bytes, tmp_path: Path
) -> None:
    src = _driver(env).open_dump(VMRef("hv", "vm-a", "vm-a"))
    res = write_dump(src, tmp_path, "a.mem.gz")
    assert res.raw_bytes == len(core)
    assert src.pause_window is not None and src.pause_window[0] <= src.pause_window[1]
    assert src.staging == "fifo" and src.dump_format.startswith("ELF64 core: QMP")
    fifo = Path(vms["vm-a"].fifo or "")
    assert fifo.name == "mem" and fifo.parent.parent == env / "tmp"
    assert _wait_empty(env / "tmp") == []


def test_qmp_error_fails_fast_and_frees_the_reader(
    env: Path, vms: dict[str, FakeQemu], tmp_path: Path
) -> None:
    vms["vm-a"].dump = "error"
    t0 = time.monotonic()
    with pytest.raises(DumpFailedError, match="dump: boom") as ei:
        write_dump(_driver(env).open_dump(VMRef("hv", "vm-a", "vm-a")), tmp_path, "a.mem.gz")
    assert time.monotonic() - t0 < 10 and ei.value.fields["exit_code"] != 0
    assert list(tmp_path.iterdir()) == []
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


def test_abort_unblocks_a_qemu_stuck_opening_the_fifo(env: Path, vms: dict[str, FakeQemu]) -> None:
    # The reader is gone before QEMU opened the FIFO: QEMU would block in open() for
    # ever (in its main loop). The script's exit, here by an abort, must let it go on.
    fake = vms["vm-a"]
    fake.dump = "stuck"
    src = _driver(env).open_dump(VMRef("hv", "vm-a", "vm-a"))
    assert fake.opening.wait(10)
    time.sleep(0.3)
    assert not fake.opened.is_set()  # blocked in open()
    src.abort()
    assert fake.opened.wait(10), "QEMU's open() of the FIFO was never released"
    deadline = time.monotonic() + 10
    while fake.write_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.write_error is not None and "pipe" in fake.write_error.lower()
    assert _wait_empty(env / "tmp") == []
