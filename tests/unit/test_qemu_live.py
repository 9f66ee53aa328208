"""Live capture in the plain-QEMU driver (issue 12), without a hypervisor: the preflight's
QMP replies -> the reason a VM cannot be captured live (or what it needs), the live
script's exit codes -> errors, its stats -> the manifest's ``live`` fields, open_dump
(mode="live") -> an ELF core through memdump.livecore, and the hypervisor-side client's
userfaultfd window (lock, restore file) on a stand-in sysctl file."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from isal import igzip

from memdump.elfcore import parse_core
from memdump.errors import (
    ConfigError,
    DumpFailedError,
    HypervisorError,
    LiveCaptureUnsupportedError,
    MigrationStreamError,
)
from memdump.hypervisors import qemu
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.qemu import QemuDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig
from memdump.transport.base import CommandResult
from memdump.transport.local import LocalTransport
from tests.helpers import migstream
from tests.helpers.fake_qmp_live import STREAM, FakeLiveQemu

REF = VMRef("hv", "vm-a", "vm-a")
MIB = 1 << 20
MTREE = migstream.mtree([(0, 2 * MIB, "ram", "pc.ram", 0)])
REGISTERS = "EAX=00000000 EBX=00000000\nEFER=0000000000000000\n"  # not long mode: EM_386
CAPS = [
    {"capability": "xbzrle", "state": False},
    {"capability": "background-snapshot", "state": False},
]


def preflight_text(
    *,
    version: tuple[int, int, int] = (7, 2, 0),
    status: str = "running",
    migrate: dict[str, Any] | None = None,
    caps: list[dict[str, Any]] | None = None,
    devices: list[dict[str, str]] | None = None,
    mtree: Any = MTREE,
    uid: int = 64055,
    uffd: str = "0",
) -> str:
    """What the client's preflight mode prints, from these replies."""
    replies: list[Any] = [
        {"qemu": dict(zip(("major", "minor", "micro"), version, strict=True))},
        {"status": status, "running": status == "running"},
        migrate if migrate is not None else {},
        caps if caps is not None else CAPS,
        [{"name": "type", "type": "string"}],
        [{"name": "type", "type": "string"}, *(devices or [])],
        mtree,
        REGISTERS,
    ]
    lines = [
        "memdump-peer 4242 0 0 " + "ab" * 32 + " /usr/bin/qemu-system-x86_64",
        f"memdump-qemu-uid {uid}",
        'memdump-qmp-reply {"return": {}, "id": "memdump-0"}',
    ]
    for i, r in enumerate(replies, 1):
        lines.append("memdump-qmp-reply " + json.dumps({"return": r, "id": f"memdump-{i}"}))
    lines.append(f"memdump-uffd {uffd}")
    return "\n".join(lines) + "\n"


def reason(text: str, policy: str = "sysctl-window") -> str:
    with pytest.raises(LiveCaptureUnsupportedError) as ei:
        qemu.judge_preflight(text, policy, "hv", "vm-a")
    assert not ei.value.retryable
    r: str = ei.value.fields["reason"]
    assert r in str(ei.value)
    return r


def test_preflight_reasons_name_what_is_missing() -> None:
    assert "older than 6.0" in reason(preflight_text(version=(5, 2, 0)))
    assert "does not know the capability background-snapshot" in reason(
        preflight_text(caps=[{"capability": "xbzrle", "state": False}])
    )
    assert "another migration is in progress (status active)" in reason(
        preflight_text(migrate={"status": "active"})
    )
    blocked = {"blocked-reasons": ["a device is not migratable"]}
    assert "migration is blocked: a device is not migratable" in reason(
        preflight_text(migrate=blocked)
    )
    vfio = [{"name": "gpu0", "type": "child<vfio-pci>"}]
    assert "VFIO device gpu0" in reason(preflight_text(devices=vfio))
    assert "the guest is paused, not running" in reason(preflight_text(status="paused"))
    r = reason(preflight_text(uid=64055, uffd="0"), policy="none")
    assert "uid 64055" in r and "vm.unprivileged_userfaultfd is 0" in r
    assert "live_userfaultfd: sysctl-window" in r
    assert "no memory layout" in reason(preflight_text(mtree={"not": "text"}))


def test_preflight_userfaultfd_method() -> None:
    def method(policy: str, **kw: Any) -> str:
        return qemu.judge_preflight(preflight_text(**kw), policy, "hv", "vm-a").userfaultfd

    assert method("none", uid=0) == "root"  # Proxmox: QEMU runs as root
    assert method("none", uid=64055, uffd="1") == "unprivileged-allowed"
    assert method("sysctl-window", uid=64055, uffd="0") == "sysctl-window"
    # A 1 read with the window allowed may be another capture's window: taken anyway.
    assert method("sysctl-window", uid=64055, uffd="1") == "sysctl-window"
    pre = qemu.judge_preflight(preflight_text(), "sysctl-window", "hv", "vm-a")
    assert pre.qemu_version == "7.2.0" and pre.mtree == MTREE and "EFER" in pre.registers
    # Past completed/failed/cancelled migrations are no obstacle.
    for done in ("completed", "failed", "cancelled", "none"):
        qemu.judge_preflight(preflight_text(migrate={"status": done}), "sysctl-window", "hv", "vm")


def test_preflight_without_answers_is_a_retryable_error() -> None:
    text = "memdump-error 75 cannot connect to /run/q/vm-a.qmp: Connection refused\n"
    with pytest.raises(HypervisorError) as ei:
        qemu.judge_preflight(text, "none", "hv", "vm-a")
    assert not isinstance(ei.value, LiveCaptureUnsupportedError) and ei.value.retryable


# -- the driver's side of a live capture, on a fake transport ------------------------------


class FakeStream:
    """A live script's stdout (its memdump-dir line, then the stream) and its exit."""

    def __init__(self, data: bytes, rc: int, stderr: str) -> None:
        self.data = b"memdump-dir /run/memdump/memdump.AbCdEfGhIj\n" + data
        self.rc = rc
        self.stderr = stderr
        self.aborted = False
        self.events: list[str] = []

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), 7000, len(self.data))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    def read(self) -> bytes:
        buf = bytearray(1 << 16)
        return bytes(buf[: self.readinto(memoryview(buf))])

    def finish(self, timeout: float) -> CommandResult:
        self.events.append("finish")
        return CommandResult(self.rc, b"", self.stderr.encode())

    def abort(self) -> None:
        self.aborted = True


class FakeTransport:
    description = "fake"

    def __init__(self, preflight: str, stream: FakeStream) -> None:
        self.preflight = preflight
        self.live = stream
        self.runs: list[tuple[str, tuple[str, ...]]] = []
        self.streams: list[tuple[str, tuple[str, ...]]] = []

    def run(
        self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0, stdin: bytes = b""
    ) -> CommandResult:
        self.runs.append((script, tuple(args)))
        if script == qemu._PREFLIGHT:
            return CommandResult(0, self.preflight.encode(), b"")
        return CommandResult(0, b"", b"")

    def stream(self, script: str, args: Sequence[str] = (), *, stdin: bytes = b"") -> FakeStream:
        self.streams.append((script, tuple(args)))
        assert script == qemu._LIVE
        return self.live

    def host_key_fingerprint(self) -> str:
        return ""

    def close(self) -> None:
        pass


STATS = {
    "status": "completed",
    "setup-time": 25,
    "downtime": 5,
    "total-time": 992,
    "ram": {"total": 2 * MIB, "transferred": 12345, "duplicate": 500, "normal": 12, "mbps": 9.5},
}
EVENTS = [
    {"timestamp": {"seconds": 1795926402, "microseconds": 515956}, "event": "STOP"},
    {"timestamp": {"seconds": 1795926402, "microseconds": 519010}, "event": "RESUME"},
]


def live_stderr(rc: int = 0, stats: dict[str, Any] | None = None, extra: str = "") -> str:
    lines = [
        "memdump-peer 4242 0 0 " + "ab" * 32 + " /usr/bin/qemu-system-x86_64",
        "memdump-pause-window 1795926402.468347 1795926402.526878",
        "memdump-live-stats " + json.dumps(stats if stats is not None else STATS),
        "memdump-live-uffd sysctl-window 0.063392",
        *("memdump-qmp-event " + json.dumps(e) for e in EVENTS),
    ]
    return "\n".join(lines) + "\n" + extra


def driver(t: FakeTransport) -> QemuDriver:
    hv = HypervisorConfig(
        name="hv",
        driver="qemu",
        transport="local",
        qmp_dir="/run/q",
        live_userfaultfd="sysctl-window",
    )
    return QemuDriver(hv, t)


def stream_of_2mib() -> bytes:
    return migstream.sweep([("pc.ram", 2 * MIB)], zero_pages=[("pc.ram", 4096)])


def test_open_dump_live_gives_the_elf_core_and_live_fields(tmp_path: Path) -> None:
    bandwidth = "memdump-live-bandwidth 134217728 536870912\n"
    t = FakeTransport(
        preflight_text(), FakeStream(stream_of_2mib(), 0, live_stderr(extra=bandwidth))
    )
    src = driver(t).open_dump(
        REF, mode="live", spill_dir=tmp_path, buffer_bytes=MIB, max_bandwidth=512 * MIB
    )
    # The script gets the VM, the hypervisor's live_userfaultfd and QEMU's migration
    # max-bandwidth for the snapshot as arguments.
    assert t.streams == [
        (
            qemu._LIVE,
            (
                "/run/q",
                "vm-a",
                "\n".join(HypervisorConfig(name="x", driver="qemu").qemu_binaries),
                "sysctl-window",
                "536870912",
                "keep",
            ),
        )
    ]
    result = write_dump(src, tmp_path, "d.mem.gz")
    core = igzip.decompress(result.path.read_bytes())
    lay = parse_core(core)
    assert lay is not None and lay.file_size == len(core)
    assert core[18] == 3  # e_machine EM_386: the first vCPU is not in long mode
    off = lay.offset_of(0x3000)
    assert off is not None and core[off : off + 4096] == migstream.pattern("pc.ram", 0x3000)
    live = src.live  # type: ignore[attr-defined]
    assert live["mode"] == "live"
    assert live["downtime_ms"] == 5 and live["setup_time_ms"] == 25
    assert live["total_time_ms"] == 992
    assert live["ram"] == {
        "total": 2 * MIB,
        "transferred": 12345,
        "duplicate": 500,
        "normal": 12,
        "mbps": 9.5,
    }
    assert live["userfaultfd"] == "sysctl-window" and live["userfaultfd_window_ms"] == 63.392
    assert live["pause_ms_events"] == 3.054
    assert live["snapshot_instant"] == "2026-11-29T04:26:42.515956+00:00"
    assert [e["event"] for e in live["events"]] == ["STOP", "RESUME"]
    assert live["qemu_version"] == "7.2.0"
    assert live["migration_status"] == "completed"
    assert live["max_bandwidth"] == 512 * MIB and live["max_bandwidth_before"] == 128 * MIB
    t0, t1 = src.pause_window  # type: ignore[attr-defined]
    assert (t1 - t0).total_seconds() == pytest.approx(0.058531)


def test_the_clients_end_is_waited_for_once_the_dump_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its tail (QEMU's state checked, the capability turned off) runs beside the
    # pipeline's last hashing, compression and fsync; its verdict still comes before the
    # file is committed.
    stream = FakeStream(stream_of_2mib(), 0, live_stderr())
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        stream.events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr("memdump.pipeline.os.fsync", fsync)
    src = driver(FakeTransport(preflight_text(), stream)).open_dump(
        REF, mode="live", spill_dir=tmp_path
    )
    res = write_dump(src, tmp_path / "out", "d.mem.gz")
    assert stream.events[:2] == ["fsync", "finish"]
    assert res.path.exists() and src.live["migration_status"] == "completed"


def test_unsupported_found_by_the_script_is_raised_by_open_dump(tmp_path: Path) -> None:
    """The client refused before migrate (exit 77): no stream at all; open_dump reads
    the stream's header, so the refusal comes from open_dump, reason and all."""
    err = "memdump-error 77 Background-snapshot is not compatible with guest memory configuration\n"
    t = FakeTransport(preflight_text(), FakeStream(b"", 77, err))
    with pytest.raises(LiveCaptureUnsupportedError) as ei:
        driver(t).open_dump(REF, mode="live", spill_dir=tmp_path)
    assert ei.value.fields["reason"] == (
        "Background-snapshot is not compatible with guest memory configuration"
    )
    assert t.live.aborted


def test_unsupported_preflight_starts_no_script(tmp_path: Path) -> None:
    t = FakeTransport(
        preflight_text(migrate={"status": "active"}), FakeStream(b"", 0, live_stderr())
    )
    with pytest.raises(LiveCaptureUnsupportedError):
        driver(t).open_dump(REF, mode="live", spill_dir=tmp_path)
    assert t.streams == []
    assert [s for s, _ in t.runs] == [qemu._PREFLIGHT]


@pytest.mark.parametrize(
    ("rc", "stats", "extra", "want"),
    [
        (
            78,
            {**STATS, "status": "failed", "error-desc": "Unable to write to file"},
            "",
            "the migration did not complete (exit 78): Unable to write to file",
        ),
        (
            79,
            STATS,
            "memdump-error 80 the guest was left postmigrate by the migration and was resumed\n",
            "the guest was left paused by the migration and was resumed (exit 79)",
        ),
        (
            80,
            STATS,
            "memdump-error 80 stopped by a signal\n",
            "stopped (exit 80): stopped by a signal",
        ),
    ],
)
def test_failures_after_migrate_are_dump_failures(
    tmp_path: Path, rc: int, stats: dict[str, Any], extra: str, want: str
) -> None:
    t = FakeTransport(
        preflight_text(), FakeStream(stream_of_2mib(), rc, live_stderr(rc, stats, extra))
    )
    src = driver(t).open_dump(REF, mode="live", spill_dir=tmp_path)
    with pytest.raises(DumpFailedError) as ei:
        write_dump(src, tmp_path, "d.mem.gz")
    assert want in str(ei.value)
    assert ei.value.fields["exit_code"] == rc
    assert list(tmp_path.iterdir()) == []  # nothing kept


def test_a_stream_that_is_not_a_migration_stream_is_refused(tmp_path: Path) -> None:
    t = FakeTransport(preflight_text(), FakeStream(b"\x7fELF" + bytes(100), 0, live_stderr()))
    with pytest.raises(MigrationStreamError):
        driver(t).open_dump(REF, mode="live", spill_dir=tmp_path)
    assert t.live.aborted
    # The abort ran the live abort script on the script's own directory.
    assert (qemu._ABORT_LIVE, ("/run/memdump/memdump.AbCdEfGhIj",)) in t.runs


# -- the hypervisor-side client's userfaultfd window -----------------------------------


def client() -> ModuleType:
    """memdump/hypervisors/remote/qmp.py as a module (memdump itself never imports it)."""
    path = Path(__file__).resolve().parents[2] / "memdump/hypervisors/remote/qmp.py"
    spec = importlib.util.spec_from_file_location("memdump_remote_qmp", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def window_env(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sysctl = tmp_path / "unprivileged_userfaultfd"
    sysctl.write_text("0\n")
    return run, sysctl


def test_window_sets_and_restores_the_sysctl_under_its_lock(window_env: tuple[Path, Path]) -> None:
    run, sysctl = window_env
    q = client()
    w = q.Window(str(run), str(sysctl))
    w.open()
    assert sysctl.read_text().strip() == "1"
    assert (run / "userfaultfd.restore").read_text() == "0\n"
    assert oct((run / "userfaultfd.restore").stat().st_mode & 0o777) == "0o600"
    # Another capture's window waits for the lock.
    other = q.Window(str(run), str(sysctl))
    opened = threading.Event()

    def take() -> None:
        other.open()
        opened.set()

    th = threading.Thread(target=take)
    th.start()
    assert not opened.wait(0.3)
    w.close()
    assert opened.wait(10)
    th.join()
    assert sysctl.read_text().strip() == "1"  # the other window's turn
    other.close()
    assert sysctl.read_text().strip() == "0"
    assert not (run / "userfaultfd.restore").exists()
    assert w.length > 0


def test_a_window_left_open_by_a_killed_client_is_restored(
    window_env: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, sysctl = window_env
    q = client()
    # What a client killed outright inside its window leaves.
    (run / "userfaultfd.restore").write_text("0\n")
    sysctl.write_text("1\n")
    # While another window holds the lock, the clean-up leaves it to that window.
    fd = os.open(run / "userfaultfd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert q.uffd_restore(str(run), str(sysctl)) == 0
    assert sysctl.read_text().strip() == "1"
    os.close(fd)
    assert q.uffd_restore(str(run), str(sysctl)) == 0
    assert sysctl.read_text().strip() == "0"
    assert not (run / "userfaultfd.restore").exists()
    assert "memdump-uffd-restored 0" in capsys.readouterr().out
    # The next window also takes the old value from a restore file, not the current 1.
    (run / "userfaultfd.restore").write_text("0\n")
    sysctl.write_text("1\n")
    w = q.Window(str(run), str(sysctl))
    w.open()
    assert (run / "userfaultfd.restore").read_text() == "0\n"
    w.close()
    assert sysctl.read_text().strip() == "0"


def test_window_refuses_a_run_dir_others_can_write(window_env: tuple[Path, Path]) -> None:
    run, sysctl = window_env
    run.chmod(0o777)
    q = client()
    with pytest.raises(q.Fail) as ei:
        q.Window(str(run), str(sysctl)).open()
    assert ei.value.code == 77 and "mode 0700" in ei.value.message
    assert sysctl.read_text().strip() == "0"


def test_drain_reads_as_qemu_writes_waiting_in_poll_not_in_sleeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An abort on QEMU < 8.1 runs the snapshot to its end into nothing (repair's drain),
    the guest's memory write-protected until it ends: the drain must take the stream as
    fast as QEMU gives it. It waits for data in poll(2); before, it slept 5 ms whenever
    the pipe was momentarily empty, a pipe's worth (64 KiB) per sleep: 13 MB/s, 19 s for
    the lab's 256 MiB guest. Here a writer puts 4 MiB into a pipe in pipe-sized writes
    with a pause after each, as QEMU between pages; the drain takes all of it and never
    sleeps."""
    q = client()
    r, w = os.pipe()
    os.set_blocking(r, False)
    total = 4 << 20
    done = threading.Event()
    pause = threading.Event()  # never set: its wait is the writer's pause (not time.sleep)

    def write() -> None:
        chunk = b"\x5a" * (64 << 10)
        for _ in range(total // len(chunk)):
            os.write(w, chunk)
            pause.wait(0.002)
        done.set()
        os.close(w)

    sleeps: list[float] = []
    monkeypatch.setattr(q.time, "sleep", sleeps.append)
    monkeypatch.setattr(q, "migration_status", lambda s: "completed" if done.is_set() else "active")
    th = threading.Thread(target=write)
    th.start()
    try:
        assert q.drain(None, r, 60.0) == "completed"
    finally:
        th.join(30)
        os.close(r)
    assert done.is_set() and sleeps == []


# -- the hypervisor-side client against a fake QEMU, through the real scripts -------------

THIS_EXE = os.readlink("/proc/self/exe")
CLIENT_PATH = (
    Path(__file__).resolve().parents[2] / "memdump/hypervisors/remote/qmp.py"
)  # the fakes' peer: allowed as if it were QEMU


@pytest.fixture
def fake(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeLiveQemu]:
    # Short paths: the socket path goes into sun_path.
    base = Path(tempfile.mkdtemp(prefix="mdl", dir="/tmp"))
    (base / "qmp").mkdir()
    (base / "run").mkdir(mode=0o700)
    (base / "uffd").write_text("0\n")
    monkeypatch.setenv("TMPDIR", str(base / "run"))
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(base / "run"))
    monkeypatch.setenv("MEMDUMP_UFFD_SYSCTL", str(base / "uffd"))
    f = FakeLiveQemu(base / "qmp" / "vm-a.qmp")
    f.hmp = {"info mtree -f": MTREE, "info registers": REGISTERS}
    yield f
    f.stop()
    shutil.rmtree(base, ignore_errors=True)


def local_driver(fake: FakeLiveQemu, restore_huge_pages: bool = False) -> QemuDriver:
    hv = HypervisorConfig(
        name="hv",
        driver="qemu",
        transport="local",
        qmp_dir=str(fake.path.parent),
        qemu_binaries=[THIS_EXE],
        live_restore_huge_pages=restore_huge_pages,
    )
    return QemuDriver(hv, LocalTransport(stall_timeout=20))


def read_raw(src: Any) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(1 << 16))
    while n := src.readinto(buf):
        out += buf[:n]
    src.close_ok()
    return bytes(out)


def test_client_checks_the_capability_right_before_migrate_and_turns_it_off(
    fake: FakeLiveQemu,
) -> None:
    raw, pre = local_driver(fake).open_live_stream(REF)
    assert pre.userfaultfd == "root"  # the fake runs as this test: root, no window
    assert read_raw(raw) == STREAM
    cmds = fake.commands
    i = cmds.index("migrate")
    assert cmds[i - 2 : i + 1] == [
        "migrate-set-capabilities",
        "query-migrate-capabilities",
        "migrate",
    ]
    assert fake.cap_at_migrate is True
    assert cmds.count("migrate-set-capabilities") == 2 and not fake.cap  # off again
    assert fake.status == "running" and "cont" not in cmds
    assert raw.live["downtime_ms"] == 4 and raw.live["userfaultfd"] == "root"
    assert [e["event"] for e in raw.live["events"]] == ["STOP", "RESUME"]


def test_capability_refused_is_unsupported_and_nothing_migrates(fake: FakeLiveQemu) -> None:
    fake.cap_error = "Background-snapshot is not supported by host kernel"
    with pytest.raises(LiveCaptureUnsupportedError) as ei:
        local_driver(fake).open_live_stream(REF)
    assert ei.value.fields["reason"] == "Background-snapshot is not supported by host kernel"
    assert "migrate" not in fake.commands
    assert "closefd" in fake.commands and fake.fds == {}  # QEMU holds no stray descriptor
    assert not fake.cap


def test_capability_that_does_not_stick_is_unsupported_and_nothing_migrates(
    fake: FakeLiveQemu,
) -> None:
    """A migrate without the capability in force would be an ordinary migration, which
    pauses the guest at its end: never issued."""
    fake.cap_sticks = False
    with pytest.raises(LiveCaptureUnsupportedError) as ei:
        local_driver(fake).open_live_stream(REF)
    assert "did not turn background-snapshot on" in ei.value.fields["reason"]
    assert "migrate" not in fake.commands
    assert fake.status == "running"


def test_guest_left_paused_is_resumed_and_a_failure(fake: FakeLiveQemu) -> None:
    fake.plain = True
    raw, _ = local_driver(fake).open_live_stream(REF)
    with pytest.raises(DumpFailedError) as ei:
        read_raw(raw)
    assert "left paused by the migration and was resumed (exit 79)" in str(ei.value)
    assert "postmigrate" in str(ei.value)
    assert "cont" in fake.commands
    assert fake.status == "running" and not fake.cap


def test_failed_migration_is_a_failure_with_qemus_reason(fake: FakeLiveQemu) -> None:
    fake.outcome = "failed"
    # The failed migration ends the script: whether its first bytes reached the client
    # before (the failure comes at the stream's end) or not (at open, from the head
    # check) is a race between the FIFO's reader and the client (CI, 2026-12-01: at open).
    with pytest.raises(DumpFailedError) as ei:
        raw, _ = local_driver(fake).open_live_stream(REF)
        read_raw(raw)
    assert "did not complete (exit 78): Unable to write to file" in str(ei.value)
    assert not fake.cap and fake.status == "running"


@pytest.mark.parametrize("version", [(7, 2), (8, 1)])
def test_abort_ends_the_snapshot_safely_for_the_qemu_version(
    fake: FakeLiveQemu, version: tuple[int, int]
) -> None:
    """QEMU before 8.1 leaves write protection on after a cancelled background snapshot:
    there an abort (SIGTERM to the script) runs it to its end into nothing; from 8.1 it is
    cancelled. Either way the capability is off and the guest runs."""
    fake.version = version
    fake.endless_mib = 64
    raw, _ = local_driver(fake).open_live_stream(REF)
    buf = memoryview(bytearray(1 << 16))
    got = 0
    while got < 1 << 20:  # mid-capture: QEMU (the fake) waits on the full pipe
        got += raw.readinto(buf)
    raw.abort()
    assert_snapshot_ended(fake, version, cancelled=("cancelled",))


def assert_snapshot_ended(
    fake: FakeLiveQemu, version: tuple[int, int], cancelled: tuple[str, ...]
) -> None:
    """After an abort: the capability off and the guest running; before 8.1 the snapshot
    drained to its end, from 8.1 cancelled (its state one of ``cancelled``)."""
    deadline = time.monotonic() + 30
    while fake.cap and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fake.cap and fake.status == "running"
    if version < (8, 1):
        assert "migrate_cancel" not in fake.commands
        assert fake.migration == "completed" and fake.written == 64 << 20  # drained
    else:
        assert "migrate_cancel" in fake.commands
        assert fake.migration in cancelled and fake.written < 64 << 20


def signal_waits(pid: int, sig: int) -> bool:
    """``sig`` is pending at ``pid`` (blocked), or ``pid`` has ended."""
    try:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    except OSError:
        return True
    if status["State"].split()[0] in ("Z", "X"):
        return True
    bit = 1 << (sig - 1)
    return any(int(status[k], 16) & bit for k in ("SigPnd", "ShdPnd"))


@pytest.mark.parametrize("version", [(7, 2), (8, 1)])
def test_an_abort_before_the_client_read_the_migrate_reply_ends_the_snapshot(
    fake: FakeLiveQemu, version: tuple[int, int]
) -> None:
    """QEMU writes the stream as soon as it takes ``migrate``: under load an abort's
    SIGTERM can reach the client while that reply is still on its way. The snapshot is
    ended as in the test above all the same (the client no longer takes it for one that
    never started: capability left on, migration neither cancelled nor drained)."""
    fake.version = version
    fake.endless_mib = 64
    gate = fake.migrate_reply_gate = threading.Event()
    raw, _ = local_driver(fake).open_live_stream(REF)
    buf = memoryview(bytearray(1 << 16))
    got = 0
    while got < 1 << 20:  # the migration runs; its reply is held back
        got += raw.readinto(buf)
    d = raw.directory
    assert d is not None
    deadline = time.monotonic() + 30
    noted = Path(d, "client")  # the live script notes its client's pid as it starts it
    while not (noted.exists() and noted.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    client = int(noted.read_text())
    aborting = threading.Thread(target=raw.abort)
    aborting.start()
    while not signal_waits(client, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()  # the reply reaches the client after the signal
    aborting.join()
    # Cancelled by the client, or failed first: the abort's SIGTERM also ended the
    # script's reader while the client waited for its reply, and from 8.1 a failed
    # background snapshot releases the guest's memory as a cancelled one does.
    assert_snapshot_ended(fake, version, cancelled=("cancelled", "failed"))


# -- a cap on the snapshot: QEMU's migration max-bandwidth while it runs ----------------


def test_huge_pages_are_restored_by_the_client_when_asked(fake: FakeLiveQemu) -> None:
    """The client runs sh/hugepages.pl on QEMU's pid (here the fake's: this process)
    before migrate and after it completed, and reports it; not asked, not run."""
    raw, _ = local_driver(fake, restore_huge_pages=True).open_live_stream(REF)
    assert read_raw(raw) == STREAM
    huge = raw.live["huge_pages"]
    assert set(huge) == {"regions_before", "restored", "not_restored", "restore_ms"}
    assert huge["restored"] == huge["regions_before"] and huge["not_restored"] == 0
    raw, _ = local_driver(fake).open_live_stream(REF)
    read_raw(raw)
    assert "huge_pages" not in raw.live


def test_huge_pages_are_not_collapsed_after_a_failed_migration(fake: FakeLiveQemu) -> None:
    fake.outcome = "failed"
    raw, _ = local_driver(fake, restore_huge_pages=True).open_live_stream(REF)
    with pytest.raises(DumpFailedError):
        read_raw(raw)
    assert raw.live["huge_pages"] == {"unavailable": "the capture did not complete"}


CAP = 300 * MIB


def test_no_cap_leaves_max_bandwidth_alone(fake: FakeLiveQemu) -> None:
    """QEMU's snapshot thread does not rate-limit a background snapshot: by default the
    capture neither reads nor sets max-bandwidth."""
    raw, _ = local_driver(fake).open_live_stream(REF)
    read_raw(raw)
    assert "migrate-set-parameters" not in fake.commands
    assert "query-migrate-parameters" not in fake.commands
    assert fake.max_bandwidth == 128 * MIB and "max_bandwidth" not in raw.live


def test_a_cap_is_set_while_the_snapshot_runs_and_put_back(fake: FakeLiveQemu) -> None:
    """QEMU ignores a max-bandwidth set before migrate (its snapshot thread disables the
    rate limit as it starts): the cap is set once the snapshot runs, the VM's own value
    (here not QEMU's default) put back after it."""
    fake.max_bandwidth = 3 << 30
    fake.wait_for_bandwidth = CAP
    raw, _ = local_driver(fake).open_live_stream(REF, max_bandwidth=CAP)
    assert read_raw(raw) == STREAM
    assert fake.bandwidth_at_end == CAP  # in force while the snapshot ran
    assert fake.max_bandwidth == 3 << 30
    assert fake.bandwidth_sets == [CAP, 3 << 30]
    cmds = fake.commands
    assert cmds.index("migrate") < cmds.index("migrate-set-parameters")
    assert raw.live["max_bandwidth"] == CAP and raw.live["max_bandwidth_before"] == 3 << 30


def test_a_cap_is_put_back_after_a_failed_migration(fake: FakeLiveQemu) -> None:
    fake.outcome = "failed"
    fake.wait_for_bandwidth = CAP
    raw, _ = local_driver(fake).open_live_stream(REF, max_bandwidth=CAP)
    with pytest.raises(DumpFailedError):
        read_raw(raw)
    assert fake.bandwidth_at_end == CAP
    assert fake.max_bandwidth == 128 * MIB and not fake.cap and fake.status == "running"


def test_a_cap_refused_fails_the_capture_and_leaves_the_guest_clean(fake: FakeLiveQemu) -> None:
    fake.bandwidth_error = "Parameter 'max-bandwidth' expects uint64"
    # The migration lasts until the cap is asked for (or 10 s): a short fake stream could
    # otherwise end before the client sets it, and then nothing is refused.
    fake.wait_for_bandwidth = CAP
    # The refusal ends the script, which stops the FIFO's reader: whether the first bytes
    # made it to the collector before (the failure then comes at the stream's end) or not
    # (at open) is a race between the reader and the client.
    with pytest.raises(DumpFailedError, match="max-bandwidth"):
        raw, _ = local_driver(fake).open_live_stream(REF, max_bandwidth=CAP)
        read_raw(raw)
    assert fake.max_bandwidth == 128 * MIB and not fake.cap and fake.status == "running"


@pytest.mark.parametrize("bad", [0, 1 << 64])
def test_a_cap_out_of_range_is_a_config_error(fake: FakeLiveQemu, bad: int) -> None:
    with pytest.raises(ConfigError):
        local_driver(fake).open_live_stream(REF, max_bandwidth=bad)
    assert fake.commands == []


def test_a_client_killed_outright_has_max_bandwidth_put_back(fake: FakeLiveQemu) -> None:
    """SIGKILL to the client mid-snapshot: the live script's own repair (the client's
    ``repair`` mode) puts the VM's max-bandwidth back from the client's output."""
    fake.endless_mib = 64
    raw, _ = local_driver(fake).open_live_stream(REF, max_bandwidth=CAP)
    buf = memoryview(bytearray(1 << 16))
    got = 0
    while got < 1 << 20:
        got += raw.readinto(buf)
    deadline = time.monotonic() + 10
    while fake.max_bandwidth != CAP and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.max_bandwidth == CAP
    d = raw.directory
    assert d is not None
    os.kill(int(Path(d, "client").read_text()), 9)
    with pytest.raises(DumpFailedError, match=r"exit 137"):
        while raw.readinto(buf):  # the repair drains the rest through the FIFO
            pass
        raw.close_ok()
    assert fake.max_bandwidth == 128 * MIB and not fake.cap and fake.status == "running"


def test_repair_leaves_a_max_bandwidth_someone_else_set(fake: FakeLiveQemu) -> None:
    """The client's ``repair`` mode puts OLD back only while NEW, the killed client's,
    is in force."""
    fake.max_bandwidth = 7 * MIB  # not the killed client's CAP: someone else's
    rc = subprocess.run(
        [
            sys.executable, "-I", "-S", str(CLIENT_PATH), "repair", str(fake.path), THIS_EXE,
            str(os.getpid()), "/nonexistent", str(128 * MIB), str(CAP),
        ],
        capture_output=True,
        check=False,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stdout
    assert fake.max_bandwidth == 7 * MIB
    fake.max_bandwidth = CAP
    rc = subprocess.run(
        [
            sys.executable, "-I", "-S", str(CLIENT_PATH), "repair", str(fake.path), THIS_EXE,
            str(os.getpid()), "/nonexistent", str(128 * MIB), str(CAP),
        ],
        capture_output=True,
        check=False,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stdout
    assert fake.max_bandwidth == 128 * MIB
    assert b"memdump-repaired max-bandwidth 134217728" in rc.stdout


def test_scripts_fit_one_sh_argument_and_carry_the_whole_client() -> None:
    """A script is one argument of ``sh -c`` (MAX_ARG_STRLEN, 128 KiB on Linux): _LIVE
    holds the client three times, so the scripts carry it without its docstring and
    comments, the same program."""
    import ast

    for script in (qemu._LIVE, qemu._REPAIR, qemu._PREFLIGHT, qemu._DUMP):
        assert len(script.encode()) < 128 << 10
    full = ast.parse(qemu.QMP_SOURCE)
    full.body = full.body[1:]  # the module docstring
    assert ast.dump(ast.parse(qemu.QMP_CLIENT)) == ast.dump(full)
