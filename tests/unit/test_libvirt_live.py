"""Live capture in the libvirt driver (issue 12): the preflight's judgement (reasons,
layout, userfaultfd method), the live script's exit codes and its stats lines, through a
fake transport; and the hypervisor-side shell of the userfaultfd window and of the QEMU
pid lookup, run by a real sh against stand-in files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from memdump.errors import ConfigError, DumpFailedError, LiveCaptureUnsupportedError
from memdump.hypervisors import fifo
from memdump.hypervisors import libvirt as lv
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.exitcodes import Exit
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.hypervisors.scripts import LIB
from memdump.settings import HypervisorConfig
from memdump.transport.base import CommandResult

DOM = "vm-live-01"
REF = VMRef("hv1", DOM, DOM)
MTREE = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram KVM
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom KVM
  00000000000e0000-00000000000effff (prio 0, ram): pc.ram @00000000000e0000 KVM
  00000000000f0000-00000000000fffff (prio 0, rom): pc.bios KVM
  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000fec00000-00000000fec00fff (prio 0, i/o): kvm-ioapic
  00000000ffff0000-00000000ffffffff (prio 0, rom): pc.bios KVM
"""
REGISTERS = "CPU#0\nEAX=00000000 EBX=00000000\nEFER=0000000000000d01\n"
CAPS = [
    {"state": False, "capability": "xbzrle"},
    {"state": True, "capability": "events"},
    {"state": False, "capability": "background-snapshot"},
]
XML = "<domain type='kvm' id='4'><name>vm-live-01</name><devices></devices></domain>"


def qmp(ret: Any) -> str:
    return json.dumps({"return": ret, "id": "libvirt-7"}, separators=(",", ":"))


def sections(monitor: bool = True, over: dict[str, str] | None = None) -> bytes:
    """Preflight output as the script prints it (lab values: libvirt 9.0, QEMU 7.2 as
    libvirt-qemu without capabilities, sysctl 0)."""
    sec = {
        "state": "running",
        "libvirt": "Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\n"
        "Running hypervisor: QEMU 7.2.22",
        "xml": XML,
        "missing": "",
        "pid": "4242",
        "status": "Uid:\t64055\t64055\t64055\t64055\nCapEff:\t0000000000000000",
        "uffd": "0",
    }
    if monitor:
        sec |= {
            "version": qmp({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "x"}),
            "migrate": qmp({}),
            "caps": qmp(CAPS),
            "mtree": MTREE,
            "registers": REGISTERS,
        }
    sec |= over or {}
    out = b""
    for name, text in sec.items():
        data = text.encode()
        out += b"memdump-section %s %d\n%s\n" % (name.encode(), len(data), data)
    return out


def judge(data: bytes, setting: str = "sysctl-window") -> lv.LivePreflight:
    return lv.judge_preflight(lv.parse_sections(data), DOM, "hv1", setting)


def reason_of(data: bytes, setting: str = "sysctl-window") -> str:
    with pytest.raises(LiveCaptureUnsupportedError) as ei:
        judge(data, setting)
    assert ei.value.retryable is False
    reason = ei.value.fields["reason"]
    assert isinstance(reason, str) and reason in str(ei.value)
    return reason


# -- preflight ---------------------------------------------------------------------------


def test_preflight_lab_values_with_the_sysctl_window() -> None:
    pre = judge(sections())
    assert pre.userfaultfd == "sysctl-window"
    assert pre.qemu_uid == 64055
    assert (pre.qemu_version, pre.libvirt_version) == ("7.2.22", "9.0.0")
    # QEMU 7.2 keeps write tracking after a cancel: an abort must drain, never cancel.
    assert pre.stop == "drain"
    assert pre.capability_was_on is False
    from memdump.livecore import GuestLayout

    segs = GuestLayout.from_mtree(pre.mtree).segments
    assert [(s.phys_start, s.block) for s in segs][0] == (0, "pc.ram")
    assert (
        sum(s.size for s in segs if s.block == "pc.ram") == 0x10000000 - 0x30000
    )  # pc.rom and pc.bios below 1 MiB


def test_preflight_none_setting_names_the_setting_and_needs_no_monitor() -> None:
    # The script stops before the monitor (no taint) when nothing else could allow it.
    reason = reason_of(sections(False), "none")
    assert "live_userfaultfd: sysctl-window" in reason
    assert "hv1" in reason and "uid 64055" in reason
    assert "vm.unprivileged_userfaultfd is 0" in reason


@pytest.mark.parametrize(
    ("status", "uffd", "setting", "method"),
    [
        ("Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff", "0", "none", "root"),
        ("Uid:\t107\t107\t107\t107\nCapEff:\t0000000000080000", "0", "none", "cap-sys-ptrace"),
        ("Uid:\t64055\t64055\t64055\t64055\nCapEff:\t0000000000000000", "1", "none",
         "unprivileged-allowed"),
    ],
)  # fmt: skip
def test_preflight_userfaultfd_method(status: str, uffd: str, setting: str, method: str) -> None:
    assert judge(sections(over={"status": status, "uffd": uffd}), setting).userfaultfd == method


def test_preflight_uses_the_window_even_when_the_sysctl_reads_1() -> None:
    # 1 may be another capture's window (the lab ran into it): closed again by the time
    # this capture's QEMU checks, which would then refuse. The window reads it under lock.
    assert judge(sections(over={"uffd": "1"})).userfaultfd == "sysctl-window"


def test_preflight_root_without_capabilities_is_not_privileged() -> None:
    # libvirt clears a root QEMU's capabilities by default (clear_emulator_capabilities):
    # uid 0 alone does not let it create a kernel-fault userfaultfd.
    status = "Uid:\t0\t0\t0\t0\nCapEff:\t0000000000000000"
    assert "live_userfaultfd" in reason_of(sections(False, {"status": status}), "none")


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"state": "paused"}, "the guest is paused, not running"),
        ({"libvirt": "Using library: libvirt 8.0.0"}, "older than 8.2"),
        ({"missing": "setsid"}, "missing on the hypervisor: setsid"),
        ({"pid": ""}, "cannot find the domain's QEMU process"),
        ({"status": ""}, "cannot read the credentials"),
        ({"uffd": ""}, "no vm.unprivileged_userfaultfd"),
        (
            {"version": qmp({"qemu": {"micro": 0, "minor": 2, "major": 5}, "package": ""})},
            "QEMU 5.2.0 is older than 6.0",
        ),
        ({"migrate": qmp({"status": "active"})}, "a migration is in progress (status active)"),
        ({"caps": qmp(CAPS[:2])}, "does not know the background-snapshot capability"),
        (
            {"migrate": '{"id":"x","error":{"class":"GenericError","desc":"boom"}}'},
            "query-migrate failed: boom",
        ),
        ({"mtree": "error: internal error"}, "memory layout"),
        ({"xml": "error: failed to get domain"}, "domain XML cannot be read"),
        (
            {
                "xml": "<domain><devices><hostdev mode='subsystem' type='pci' managed='yes'>"
                "</hostdev></devices></domain>"
            },
            "VFIO devices (hostdev type pci)",
        ),
        (
            {"xml": "<domain><devices><interface type='hostdev'/></devices></domain>"},
            "VFIO devices (interface type hostdev)",
        ),
    ],
)
def test_preflight_refusals_give_a_reason(over: dict[str, str], words: str) -> None:
    assert words in reason_of(sections(over=over))


def test_preflight_usb_hostdev_is_not_vfio() -> None:
    xml = "<domain><devices><hostdev mode='subsystem' type='usb'/></devices></domain>"
    assert judge(sections(over={"xml": xml})).userfaultfd == "sysctl-window"


def test_preflight_qemu_81_cancels_and_a_finished_migration_is_idle() -> None:
    version = qmp({"qemu": {"micro": 0, "minor": 1, "major": 8}, "package": ""})
    for status in ("completed", "failed", "cancelled"):
        pre = judge(sections(over={"version": version, "migrate": qmp({"status": status})}))
        assert pre.stop == "cancel"


def test_preflight_output_cut_short_is_an_error() -> None:
    from memdump.errors import HypervisorError

    with pytest.raises(HypervisorError, match="cut short"):
        lv.parse_sections(b"memdump-section state 100\nrunning\n")
    with pytest.raises(HypervisorError, match="not understood"):
        lv.parse_sections(b"garbage\n")


# -- the live script's end, through a fake transport --------------------------------------


class FakeStream:
    def __init__(self, stdout: bytes, rc: int, stderr: str) -> None:
        self._data = stdout
        self._rc = rc
        self._err = stderr.encode()
        self.aborted = False
        self.finished = 0

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), len(self._data))
        view[:n] = self._data[:n]
        self._data = self._data[n:]
        return n

    def read(self) -> bytes:
        data, self._data = self._data, b""
        return data

    def finish(self, timeout: float) -> CommandResult:
        self.finished += 1
        return CommandResult(self._rc, b"", self._err)

    def abort(self) -> None:
        self.aborted = True


class FakeTransport:
    description = "fake"

    def __init__(self, preflight: bytes, stream: FakeStream) -> None:
        self.preflight = preflight
        self.live = stream
        self.runs: list[tuple[str, tuple[str, ...], bytes]] = []
        self.streams: list[tuple[str, tuple[str, ...], bytes]] = []

    def run(
        self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0, stdin: bytes = b""
    ) -> CommandResult:
        self.runs.append((script, tuple(args), stdin))
        if script is lv._LIVE_PREFLIGHT:
            return CommandResult(0, self.preflight, b"")
        return CommandResult(0, b"", b"")

    def stream(self, script: str, args: Sequence[str] = (), *, stdin: bytes = b"") -> FakeStream:
        self.streams.append((script, tuple(args), stdin))
        return self.live

    def host_key_fingerprint(self) -> str:
        return ""

    def close(self) -> None:
        pass


DIR_LINE = b"memdump-dir /run/memdump/memdump.AbCdEf0123\n"
STATS = {
    "status": "completed",
    "setup-time": 2,
    "downtime": 5,
    "total-time": 3005,
    "ram": {"total": 268632064, "transferred": 189362004, "normal": 46098, "duplicate": 19486},
}
GOOD_END = (
    "memdump-live-stats " + qmp(STATS) + "\n"
    "memdump-live-uffd window 1764390707.500000000 1764390707.625600000\n"
    "memdump-live-taint custom-argv custom-monitor \n"
    "memdump-live-bandwidth 134217728 314572800\n"
    "memdump-live-t1 1764390707.710000000 "
    + qmp({"status": "active", "setup-time": 2, "total-time": 110})
    + "\n"
    "memdump-live-state running (unpaused)\n"
    "memdump-live-events 2025-11-29 04:31:47.603|2025-11-29 04:31:47.608\n"
    "memdump-pause-window 1764390707.600000000 1764390707.710000000\n"
)


def driver(
    stream: FakeStream, setting: str = "sysctl-window", huge: bool = False, **over: str
) -> tuple[LibvirtDriver, FakeTransport]:
    hv = HypervisorConfig.model_validate(
        {
            "name": "hv1",
            "transport": "local",
            "live_userfaultfd": setting,
            "live_restore_huge_pages": huge,
        }
    )
    t = FakeTransport(sections(over=over), stream)
    return LibvirtDriver(hv, t), t


def test_open_dump_live_returns_the_converter_over_the_script_stream(tmp_path: Path) -> None:
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03rest", 0, GOOD_END)
    drv, t = driver(stream)
    src = drv.open_dump(
        REF, mode="live", spill_dir=tmp_path, buffer_bytes=1 << 20, max_bandwidth=512 << 20
    )
    from memdump.livecore import LiveCoreSource

    assert isinstance(src, LiveCoreSource)
    # The preflight got the setting; the script: window (sysctl), drain (QEMU 7.2).
    assert t.runs[0][1] == ("qemu:///system", DOM, "sysctl-window")
    script, args, stdin = t.streams[0]
    assert script is lv._LIVE
    # ... and QEMU's migration max-bandwidth for the snapshot (bytes/s).
    assert args == ("qemu:///system", DOM, "window", "drain", "536870912", "keep")
    assert len(stdin.strip()) == 32  # the token, on stdin only
    assert all(stdin.strip().decode() not in a for a in args)


def test_live_stream_end_stats_and_window() -> None:
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03" + b"x" * 100, 0, GOOD_END)
    drv, _ = driver(stream)
    raw = drv.open_live_stream(REF, drv.live_preflight(REF))
    got = bytearray()
    buf = memoryview(bytearray(7))
    while n := raw.readinto(buf):
        got += buf[:n]
    raw.close_ok()
    assert bytes(got) == b"QEVM\x00\x00\x00\x03" + b"x" * 100
    live = raw.live
    assert live["downtime_ms"] == 5 and live["setup_time_ms"] == 2
    assert live["total_time_ms"] == 3005
    assert live["userfaultfd"] == "sysctl-window"
    assert live["userfaultfd_window_ms"] == pytest.approx(125.6, abs=0.05)
    assert live["taint"] == ["custom-argv", "custom-monitor"]
    # The cap (QEMU's max-bandwidth while the snapshot ran); the VM's own was put back.
    assert live["max_bandwidth"] == 300 << 20
    assert live["max_bandwidth_before"] == 128 << 20
    assert live["migration_status"] == "completed" and live["libvirt_job"] == "none"
    assert (live["qemu_version"], live["libvirt_version"]) == ("7.2.22", "9.0.0")
    assert live["ram"]["transferred"] == 189362004
    # QEMU's STOP and RESUME events: the snapshot instant and the pause they show.
    assert live["snapshot_at"] == live["stopped_at"] == "2025-11-29T04:31:47.603000+00:00"
    assert live["resumed_at"] == "2025-11-29T04:31:47.608000+00:00"
    assert live["pause_ms_events"] == 5.0
    assert raw.pause_window is not None
    assert (raw.pause_window[1] - raw.pause_window[0]).total_seconds() == pytest.approx(0.11)


def test_huge_page_restore_is_asked_for_and_reported(tmp_path: Path) -> None:
    end = GOOD_END + "memdump-live-hugepages 2048 2040 8 1830 deadline\n"
    drv, t = driver(FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03" + b"x" * 10, 0, end), huge=True)
    raw = drv.open_live_stream(REF, drv.live_preflight(REF))
    while raw.readinto(memoryview(bytearray(64))):
        pass
    raw.close_ok()
    assert t.streams[0][1][-1] == "restore"
    assert raw.live["huge_pages"] == {
        "regions_before": 2048,
        "restored": 2040,
        "not_restored": 8,
        "restore_ms": 1830,
        "error": "deadline",
    }
    # Not asked for: nothing in the manifest.
    assert "huge_pages" not in lv.live_metadata(
        lv.parse_live_stderr(GOOD_END)[1], judge(sections())
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("unavailable no-perl", "perl is missing on the hypervisor"),
        ("unavailable not-completed", "the capture did not complete"),
        ("unavailable scan-3", "the QEMU process ended or is not the one scanned"),
        ("unavailable collapse-4", "no process_madvise MADV_COLLAPSE (Linux >= 6.1)"),
        ("unavailable collapse-255", "collapse failed (exit 255)"),
        ("12 x 1", "unknown"),
    ],
)
def test_huge_page_restore_that_did_not_run_says_why(line: str, reason: str) -> None:
    got = lv.huge_pages(line)
    assert got is not None and reason in got["unavailable"]


def test_snapshot_instant_without_events_from_qemus_times() -> None:
    end = GOOD_END.replace(
        "memdump-live-events 2025-11-29 04:31:47.603|2025-11-29 04:31:47.608",
        "memdump-live-events |",
    )
    live = lv.live_metadata(lv.parse_live_stderr(end)[1], judge(sections()))
    # QEMU's start = t1 - total-time at t1 (110 ms); the snapshot, setup-time (2 ms) later.
    assert live["snapshot_at"] == "2025-11-29T04:31:47.602000+00:00"
    assert "pause_ms_events" not in live and "stopped_at" not in live


def test_script_refusal_is_unsupported_at_open_with_qemus_words(tmp_path: Path) -> None:
    err = (
        'memdump-live-unsupported {"id":"libvirt-434","error":{"class":"GenericError",'
        '"desc":"Background-snapshot is not supported by host kernel"}}\n'
    )
    stream = FakeStream(DIR_LINE, Exit.LIVE_UNSUPPORTED, err)
    drv, _ = driver(stream)
    with pytest.raises(LiveCaptureUnsupportedError) as ei:
        drv.open_dump(REF, mode="live", spill_dir=tmp_path)
    assert ei.value.fields["reason"] == "Background-snapshot is not supported by host kernel"


def test_unsupported_preflight_starts_no_script(tmp_path: Path) -> None:
    stream = FakeStream(DIR_LINE, 0, "")
    drv, t = driver(stream, setting="none")
    t.preflight = sections(False)
    with pytest.raises(LiveCaptureUnsupportedError, match="live_userfaultfd"):
        drv.open_dump(REF, mode="live", spill_dir=tmp_path)
    assert t.streams == []


def test_unknown_layout_is_unsupported_before_the_guest_is_touched(tmp_path: Path) -> None:
    bad = 'FlatView #0\n AS "memory", root: system\n  zzzz\n'
    drv, t = driver(FakeStream(DIR_LINE, 0, ""), mtree=bad)
    with pytest.raises(LiveCaptureUnsupportedError, match="memory layout is not understood"):
        drv.open_dump(REF, mode="live", spill_dir=tmp_path)
    assert t.streams == []


@pytest.mark.parametrize(
    ("rc", "words", "retryable"),
    [
        (Exit.MIGRATION_FAILED, "did not complete (status failed)", True),
        (Exit.WRITE_PROTECTED, "write-protected", False),
        (Exit.LEFT_PAUSED, "left the guest paused", False),
        (Exit.READER_FAILED, "reader failed", True),
        (Exit.MONITOR_FAILED, "monitor command failed", False),
    ],
)
def test_script_failures_after_the_stream(rc: int, words: str, retryable: bool) -> None:
    end = GOOD_END.replace('"completed"', '"failed"') + (
        "memdump-live-resumed\n" if rc == Exit.LEFT_PAUSED else ""
    )
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03", rc, end)
    drv, _ = driver(stream)
    raw = drv.open_live_stream(REF, drv.live_preflight(REF))
    buf = memoryview(bytearray(64))
    with pytest.raises(DumpFailedError) as ei:
        while raw.readinto(buf):
            pass
    assert words in str(ei.value)
    assert ei.value.retryable is retryable
    assert ei.value.fields["exit_code"] == rc
    with pytest.raises(DumpFailedError):
        raw.close_ok()  # the same error again, not a success


@pytest.mark.parametrize("rc", [0, Exit.MIGRATION_FAILED])
def test_once_the_converter_has_all_of_ram_the_script_is_waited_for_in_close_ok(rc: int) -> None:
    # memdump.livecore calls defer_end once RAM is whole: the script's tail (its checks of
    # QEMU) then runs beside the pipeline's, and its verdict comes from close_ok.
    end = GOOD_END if rc == 0 else GOOD_END.replace('"completed"', '"failed"')
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03" + b"x" * 100, rc, end)
    drv, _ = driver(stream)
    raw = drv.open_live_stream(REF, drv.live_preflight(REF))
    raw.defer_end()
    buf = memoryview(bytearray(64))
    while raw.readinto(buf):
        pass
    assert stream.finished == 0
    if rc:
        with pytest.raises(DumpFailedError, match="did not complete"):
            raw.close_ok()
    else:
        raw.close_ok()
        assert raw.live["migration_status"] == "completed"
    assert stream.finished == 1


def test_abort_drains_on_qemu_72_and_cancels_from_81() -> None:
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03", 0, GOOD_END)
    drv, t = driver(stream)
    raw = drv.open_live_stream(REF, drv.live_preflight(REF))
    raw.abort()
    assert stream.aborted
    assert [r for r in t.runs if r[0] is lv._LIVE_ABORT] == []  # the reader drains
    version = qmp({"qemu": {"micro": 0, "minor": 1, "major": 8}, "package": ""})
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03", 0, GOOD_END)
    drv, t = driver(stream, version=version)
    raw = drv.open_live_stream(REF, drv.live_preflight(REF))
    raw.abort()
    (abort,) = [r for r in t.runs if r[0] is lv._LIVE_ABORT]
    token = t.streams[0][2]
    assert abort[1] == ("qemu:///system", DOM, "/run/memdump/memdump.AbCdEf0123")
    assert abort[2] == token


# -- hypervisor-side shell ------------------------------------------------------------------


def sh(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sysctl = tmp_path / "unprivileged_userfaultfd"
    sysctl.write_text("0\n")
    return run, sysctl, {"MEMDUMP_RUN_DIR": str(run), "MEMDUMP_UFFD_SYSCTL": str(sysctl)}


def test_uffd_window_opens_and_closes(run_dir: tuple[Path, Path, dict[str, str]]) -> None:
    run, sysctl, env = run_dir
    script = (
        LIB
        + 'memdump_uffd_open "$1" || exit 1\n'
        + 'echo "in=$(cat "$memdump_uffd_sysctl") restore=$(cat "$1/userfaultfd.restore")"\n'
        + 'flock -n "$1/userfaultfd.lock" true && echo lock-free || echo lock-held\n'
        + "memdump_uffd_close || exit 1\n"
        + 'flock -n "$1/userfaultfd.lock" true && echo lock-free || echo lock-held\n'
        + 'echo "t0=$memdump_uffd_t0 t1=$memdump_uffd_t1"\n'
    )
    res = sh(script, str(run), env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "in=1 restore=0"
    assert lines[1:3] == ["lock-held", "lock-free"]
    assert sysctl.read_text().strip() == "0"
    assert not (run / "userfaultfd.restore").exists()
    t0, t1 = (float(x.split("=")[1]) for x in lines[3].split())
    assert t1 >= t0


def test_uffd_window_of_a_killed_script_is_restored(
    run_dir: tuple[Path, Path, dict[str, str]],
) -> None:
    run, sysctl, env = run_dir
    script = LIB + 'memdump_uffd_open "$1" || exit 1\necho open\nexec sleep 60\n'
    p = subprocess.Popen(
        ["sh", "-c", script, "sh", str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "open\n"
        assert sysctl.read_text().strip() == "1"
        # Its lock is held: the repair leaves the window alone.
        res = sh(fifo.UFFD_RESTORE, env=env)
        assert res.returncode == 0 and res.stdout == ""
        assert sysctl.read_text().strip() == "1"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    res = sh(fifo.UFFD_RESTORE, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "userfaultfd-restored 0"
    assert sysctl.read_text().strip() == "0"
    assert not (run / "userfaultfd.restore").exists()


def test_next_window_takes_the_old_value_from_a_left_restore_file(
    run_dir: tuple[Path, Path, dict[str, str]],
) -> None:
    # A killed window left the sysctl at 1: the next window must restore 0, not 1.
    run, sysctl, env = run_dir
    sysctl.write_text("1\n")
    (run / "userfaultfd.restore").write_text("0\n")
    script = LIB + 'memdump_uffd_open "$1" && memdump_uffd_close\n'
    assert sh(script, str(run), env=env).returncode == 0
    assert sysctl.read_text().strip() == "0"


def test_qemu_pid_is_checked_against_the_domain_name(tmp_path: Path) -> None:
    argv = ["sh", "-c", "sleep 60", "qemu", "-name", f"guest={DOM},debug-threads=on"]
    p = subprocess.Popen(argv)
    try:
        (tmp_path / f"{DOM}.pid").write_text(f"{p.pid}")
        (tmp_path / "other.pid").write_text(f"{p.pid}")
        (tmp_path / "bad.pid").write_text("12; rm -rf /")
        env = {"MEMDUMP_LIBVIRT_PIDDIR": str(tmp_path)}
        script = LIB + 'memdump_qemu_pid "$1"'
        assert sh(script, DOM, env=env).stdout.strip() == str(p.pid)
        assert sh(script, "other", env=env).returncode != 0  # not that domain's QEMU
        assert sh(script, "bad", env=env).returncode != 0
        assert sh(script, "missing", env=env).returncode != 0
    finally:
        p.kill()
        p.wait()


def test_preflight_script_asks_the_monitor_only_when_allowed(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    virsh = bin_dir / "virsh"
    virsh.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >>{calls}\n'
        'case "$*" in\n'
        '  *" domstate "*) echo running ;;\n'
        '  *" version"*) echo "Using library: libvirt 9.0.0" ;;\n'
        '  *" dumpxml "*) echo "<domain type=\'kvm\'/>" ;;\n'
        "  *qemu-monitor-command*) echo '{\"return\":{}}' ;;\n"
        "esac\n"
    )
    virsh.chmod(0o755)
    # An unprivileged stand-in for QEMU: setpriv drops every capability.
    argv = [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all", "sh", "-c", "sleep 60", "q", "-name", f"guest={DOM}",
    ]  # fmt: skip
    p = subprocess.Popen(argv)
    try:
        (tmp_path / f"{DOM}.pid").write_text(f"{p.pid}\n")
        sysctl = tmp_path / "uffd"
        sysctl.write_text("0\n")
        env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "MEMDUMP_LIBVIRT_PIDDIR": str(tmp_path),
            "MEMDUMP_UFFD_SYSCTL": str(sysctl),
        }
        for _ in range(100):  # until setpriv has exec'd the stand-in
            if "guest=" in Path(f"/proc/{p.pid}/cmdline").read_text(errors="replace"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        res = sh(lv._LIVE_PREFLIGHT, "qemu:///system", DOM, "none", env=env)
        sec = lv.parse_sections(res.stdout.encode())
        assert sec["pid"] == str(p.pid) and "Uid:\t65534" in sec["status"]
        assert "version" not in sec
        assert "qemu-monitor-command" not in calls.read_text()
        res = sh(lv._LIVE_PREFLIGHT, "qemu:///system", DOM, "sysctl-window", env=env)
        sec = lv.parse_sections(res.stdout.encode())
        assert sec["version"] == '{"return":{}}'
        assert "qemu-monitor-command" in calls.read_text()
    finally:
        p.kill()
        p.wait()


def test_live_stream_has_no_cap_by_default() -> None:
    """QEMU does not rate-limit a background snapshot; no cap unless one is asked for
    (an empty argument: the script leaves max-bandwidth alone)."""
    stream = FakeStream(DIR_LINE + b"QEVM\x00\x00\x00\x03", 0, GOOD_END)
    drv, t = driver(stream)
    drv.open_live_stream(REF, drv.live_preflight(REF))
    assert t.streams[0][1][4] == ""
    with pytest.raises(ConfigError):
        drv.open_live_stream(REF, drv.live_preflight(REF), max_bandwidth=0)
    assert len(t.streams) == 1
