"""File-staged libvirt dumps (Settings.staging = "file"): the hypervisor-side script run
through the local transport (a real dash, stat, df, flock) with a fake virsh on PATH."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from isal import igzip

from memdump.errors import (
    DumpFailedError,
    HypervisorError,
    InsufficientSpaceError,
    StreamStalledError,
)
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.local import LocalTransport
from memdump.transport.process import ProcessByteStream
from tests.helpers.elfgen import make_core
from tests.helpers.hv_tempdirs import (
    TARGET_BYTES,
    TOKEN,
    Recording,
    make_target,
    plant,
    state,
    watched,
)

REF = VMRef("local", "vm1", "vm1")

# $FAKE_LOG gets one line per call. dominfo: $FAKE_KIB of memory ($FAKE_INFO=gone: no
# domain, =slow: answers after 1 s). dump ($FAKE_MODE): ok (after $FAKE_DELAY s), fail,
# or slow: written through a libvirt_iohelper that takes 30 s, and fails when that is
# killed, as libvirt 9 does. domjobabort refuses, as libvirt does for a memory-only dump.
# The target's mode and type and its directory's are logged before it is written.
FAKE_VIRSH = """#!/bin/sh
for a; do last=$a; done
case " $* " in
  *" dominfo "*)
    echo dominfo >>"$FAKE_LOG"
    case "$FAKE_INFO" in
      gone) echo "error: failed to get domain 'vm1'" >&2; exit 1 ;;
      slow) sleep 1 ;;
    esac
    printf 'Name:           vm1\\nMax memory:     %s KiB\\nUsed memory:    %s KiB\\n' \\
      "$FAKE_KIB" "$FAKE_KIB"
    exit 0 ;;
  *" domjobabort "*)
    echo domjobabort >>"$FAKE_LOG"
    echo "error: Requested operation is not valid: cannot abort memory-only dump" >&2
    exit 1 ;;
  *" dump "*) ;;
  *) exit 0 ;;
esac
echo "dump $(stat -c '%a %F' "$last") / $(stat -c '%a %F' "${last%/*}") / $last" >>"$FAKE_LOG"
case "$FAKE_MODE" in
  ok) sleep "${FAKE_DELAY:-0}"; cat "$FAKE_CORE" >"$last" ;;
  fail) head -c 1000 "$FAKE_CORE" >"$last"; echo "error: dump failed midway" >&2; exit 1 ;;
  slow)
    libvirt_iohelper "$last" 1 &
    if ! wait "$!"; then
      echo "error: Child process (libvirt_iohelper) unexpected fatal signal 15" >&2
      exit 1
    fi
    cat "$FAKE_CORE" >"$last" ;;
esac
"""


# Its command line names the file, as libvirt's does; gone after 30 s at the latest.
FAKE_IOHELPER = """#!/bin/sh
echo "iohelper $1" >>"$FAKE_LOG"
i=0
while [ "$i" -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    virsh = bindir / "virsh"
    virsh.write_text(FAKE_VIRSH)
    virsh.chmod(0o755)
    core = tmp_path / "core.elf"
    core.write_bytes(make_core([(0, os.urandom(300_000)), (1 << 20, bytes(700_000))]))
    helper = bindir / "libvirt_iohelper"
    helper.write_text(FAKE_IOHELPER)
    helper.chmod(0o755)
    (tmp_path / "remote-tmp").mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CORE", str(core))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "virsh.log"))
    monkeypatch.setenv("FAKE_KIB", "1024")
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "remote-tmp"))
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(tmp_path / "remote-tmp"))  # FIFO dumps' base
    return tmp_path


def _log(env: Path) -> list[str]:
    p = env / "virsh.log"
    return p.read_text().splitlines() if p.exists() else []


def _driver(transport: LocalTransport | None = None, **hv: str) -> LibvirtDriver:
    cfg = HypervisorConfig(name="local", transport="local", **hv)  # type: ignore[arg-type]
    return LibvirtDriver(cfg, transport or LocalTransport())


def _wait_empty(d: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(d.iterdir())


def test_staged_dump_is_the_same_bytes_and_leaves_nothing(env: Path) -> None:
    src = _driver().open_dump(REF, staging="file")
    res = write_dump(src, env / "out", "a.gz")
    core = (env / "core.elf").read_bytes()
    assert igzip.decompress(res.path.read_bytes()) == core
    assert res.raw_sha256 == hashlib.sha256(core).hexdigest()
    assert src.staging == "file" and src.pause_window is not None
    assert src.pause_window[0] <= src.pause_window[1]
    (dump,) = [line for line in _log(env) if line.startswith("dump ")]
    # A private 0600 regular file in the script's 0700 dir under TMPDIR, not a FIFO.
    assert dump.startswith("dump 600 regular empty file / 700 directory / ")
    assert dump.split(" / ")[-1].startswith(str(env / "remote-tmp" / "memdump."))
    assert dump.endswith("/mem")
    assert list((env / "remote-tmp").iterdir()) == []


def test_fifo_stays_the_default(env: Path) -> None:
    src = _driver().open_dump(REF)
    write_dump(src, env / "out", "a.gz")
    assert src.staging == "fifo"
    (dump,) = [line for line in _log(env) if line.startswith("dump ")]
    assert "fifo" in dump and "dominfo" not in _log(env)


def test_not_enough_space_refuses_before_the_dump(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KIB", str(1 << 40))  # 1 PiB of memory
    src = _driver().open_dump(REF, staging="file", margin=1.25)
    with pytest.raises(InsufficientSpaceError) as ei:
        write_dump(src, env / "out", "a.gz")
    e = ei.value
    assert not e.retryable
    assert e.fields["hypervisor"] == "local" and e.fields["vm_id"] == "vm1"
    assert e.fields["memory_bytes"] == 1 << 50
    assert e.fields["needed_bytes"] == (1 << 50) * 5 // 4
    assert 0 < e.fields["free_bytes"] < e.fields["needed_bytes"]
    assert e.fields["path"] == str(env / "remote-tmp")
    assert "not paused" in str(e) and "x 1.25" in str(e)
    assert _log(env) == ["dominfo"]  # virsh dump never ran: the guest was never paused
    assert list((env / "out").iterdir()) == []
    assert list((env / "remote-tmp").iterdir()) == []


def test_margin_zero_needs_no_space(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The guest would need 1 PiB staged: with margin 0 no space is asked for, and the
    # staged dump runs and arrives whole.
    monkeypatch.setenv("FAKE_KIB", str(1 << 40))
    src = _driver().open_dump(REF, staging="file", margin=0)
    res = write_dump(src, env / "out", "a.gz")
    core = (env / "core.elf").read_bytes()
    assert igzip.decompress(res.path.read_bytes()) == core and src.staging == "file"
    (dump,) = [line for line in _log(env) if line.startswith("dump ")]
    assert dump.startswith("dump 600 regular empty file / 700 directory / ")


def test_staging_dir_of_the_hypervisor(env: Path) -> None:
    stage = env / "stage"
    stage.mkdir()
    src = _driver(staging_dir=str(stage)).open_dump(REF, staging="file")
    write_dump(src, env / "out", "a.gz")
    (dump,) = [line for line in _log(env) if line.startswith("dump ")]
    assert dump.split(" / ")[-1].startswith(str(stage / "memdump."))
    assert list(stage.iterdir()) == [] and list((env / "remote-tmp").iterdir()) == []


def test_missing_staging_dir_is_not_retried(env: Path) -> None:
    src = _driver(staging_dir=str(env / "nope")).open_dump(REF, staging="file")
    with pytest.raises(HypervisorError) as ei:
        write_dump(src, env / "out", "a.gz")
    assert not ei.value.retryable and "staging temp dir" in str(ei.value)
    assert "dump" not in " ".join(_log(env))


def test_unknown_domain(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_INFO", "gone")
    with pytest.raises(DumpFailedError) as ei:
        write_dump(_driver().open_dump(REF, staging="file"), env / "out", "a.gz")
    assert "failed to get domain 'vm1'" in ei.value.fields["stderr"]
    assert _log(env) == ["dominfo"]
    assert list((env / "remote-tmp").iterdir()) == []


def test_virsh_dump_failure(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "fail")
    src = _driver().open_dump(REF, staging="file")
    t0 = time.monotonic()
    with pytest.raises(DumpFailedError) as ei:
        write_dump(src, env / "out", "a.gz")
    assert time.monotonic() - t0 < 10 and ei.value.retryable
    assert "dump failed midway" in ei.value.fields["stderr"]
    assert "memdump-pause-window" not in ei.value.fields["stderr"]
    assert src.pause_window is not None
    assert list((env / "out").iterdir()) == []
    assert list((env / "remote-tmp").iterdir()) == []


def test_a_long_silent_staging_is_not_a_stall(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing arrives while QEMU writes the file: longer than the stall timeout is fine.
    monkeypatch.setenv("FAKE_DELAY", "1")
    t = LocalTransport(stall_timeout=0.2)
    res = write_dump(_driver(t).open_dump(REF, staging="file"), env / "out", "a.gz")
    assert res.raw_bytes == (env / "core.elf").stat().st_size
    # The same silence from a FIFO dump is a stall.
    with pytest.raises(StreamStalledError):
        write_dump(_driver(t).open_dump(REF), env / "out", "b.gz")


class _Dropped:
    """A stream whose abort only drops our end of it, as a closed SSH channel does:
    nothing signals the remote script, which goes on until it writes to its stdout."""

    def __init__(self, inner: ProcessByteStream, procs: list[subprocess.Popen[bytes]]) -> None:
        self._inner = inner
        procs.append(inner._proc)

    def readinto(self, view: memoryview) -> int:
        return self._inner.readinto(view)

    def finish(self, timeout: float) -> object:
        return self._inner.finish(timeout)

    def abort(self) -> None:
        assert self._inner._proc.stdout is not None
        self._inner._proc.stdout.close()


class _DroppingTransport(LocalTransport):
    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        super().__init__()
        self.procs = procs

    def stream(  # type: ignore[override]
        self, script: str, args: Sequence[str] = (), *, stdin: bytes = b""
    ) -> _Dropped:
        return _Dropped(super().stream(script, args, stdin=stdin), self.procs)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()


def test_abort_during_the_staged_dump_stops_it(
    env: Path, monkeypatch: pytest.MonkeyPatch, procs: list[subprocess.Popen[bytes]]
) -> None:
    # Over SSH the script sees nothing of the abort, and libvirt refuses domjobabort for
    # a memory-only dump: the abort kills libvirt's writer of our file instead.
    monkeypatch.setenv("FAKE_MODE", "slow")
    src = _driver(_DroppingTransport(procs)).open_dump(REF, staging="file")
    deadline = time.monotonic() + 10
    while not any(line.startswith("iohelper ") for line in _log(env)):
        assert time.monotonic() < deadline, "the fake dump did not start"
        time.sleep(0.02)
    bystander = subprocess.Popen(  # another dump's writer: left alone
        [str(env / "bin" / "libvirt_iohelper"), str(env / "other" / "mem"), "1"]
    )
    procs.append(bystander)
    t0 = time.monotonic()
    src.abort()
    assert time.monotonic() - t0 < 10
    assert "domjobabort" in _log(env)
    assert procs[0].wait(10) == 1  # the script ended with the failed dump
    assert _wait_empty(env / "remote-tmp") == []
    assert bystander.poll() is None
    bystander.kill()


def test_abort_before_the_dump_cancels_it(
    env: Path, monkeypatch: pytest.MonkeyPatch, procs: list[subprocess.Popen[bytes]]
) -> None:
    # The abort lands while the script still checks memory and space: no job to abort
    # yet, so it leaves the cancel mark, and the script never starts the dump.
    monkeypatch.setenv("FAKE_INFO", "slow")
    src = _driver(_DroppingTransport(procs)).open_dump(REF, staging="file")
    deadline = time.monotonic() + 10
    while not list((env / "remote-tmp").glob("memdump.*/token")):
        assert time.monotonic() < deadline, "the script did not start"
        time.sleep(0.02)
    src.abort()
    assert procs[0].wait(10) == 94
    assert not any(line.startswith("dump ") for line in _log(env))
    assert _wait_empty(env / "remote-tmp") == []


def test_abort_after_the_script_exited_stops_nothing(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KIB", str(1 << 40))
    with pytest.raises(InsufficientSpaceError):
        write_dump(_driver().open_dump(REF, staging="file"), env / "out", "a.gz")
    assert "domjobabort" not in _log(env)


def test_clean_stale_covers_the_staging_dir(env: Path) -> None:
    stage = env / "stage"
    stage.mkdir()
    left = stage / "memdump.AAAAAAAAAA"
    left.mkdir(mode=0o700)
    (left / "lock").touch()
    (left / "mem").write_bytes(b"half a dump")
    old = time.time() - 3600
    os.utime(left, (old, old))
    assert _driver(staging_dir=str(stage)).clean_stale(60) == [str(left)]
    assert list(stage.iterdir()) == []


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().staging == "fifo"
    monkeypatch.setenv("MEMDUMP_STAGING", "file")
    assert Settings().staging == "file"
    monkeypatch.setenv("MEMDUMP_STAGING", "disk")
    with pytest.raises(ValueError, match="staging"):
        Settings()
    assert HypervisorConfig(name="h", staging_dir="/var/tmp").staging_dir == "/var/tmp"
    for bad in ("var/tmp", "/a\nb"):
        with pytest.raises(ValueError, match="staging_dir"):
            HypervisorConfig(name="h", staging_dir=bad)


def test_unknown_staging_is_refused(env: Path) -> None:
    with pytest.raises(Exception, match="unknown staging"):
        _driver().open_dump(REF, staging="disk")  # type: ignore[arg-type]
    assert _log(env) == []


def test_abort_while_streaming_the_file_cleans_up(env: Path) -> None:
    # Bigger than the stream's pipe (1 MiB), so the script is still streaming it.
    big = make_core([(0, os.urandom(300_000)), (1 << 20, bytes(4 << 20))])
    (env / "core.elf").write_bytes(big)
    src = _driver().open_dump(REF, staging="file")
    assert src.readinto(memoryview(bytearray(4096))) > 0  # streaming the finished file
    (d,) = (env / "remote-tmp").iterdir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    st = (d / "mem").stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == (env / "core.elf").stat().st_size
    src.abort()
    assert _wait_empty(env / "remote-tmp") == []


# -- issue 11 item 4: a local user's planted directory; the token on no command line ----------


@pytest.fixture
def fixed_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every dump's token is TOKEN: the one a local user read from /proc (old code)."""
    monkeypatch.setattr(secrets, "token_hex", lambda n=32: TOKEN)
    return TOKEN


def test_staged_abort_leaves_a_planted_dir_alone(
    env: Path, fixed_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local user plants memdump.0000000000 with the token and cancel -> a disk image in
    # the staged dump's base: the abort acts on the script's own directory only.
    monkeypatch.setenv("FAKE_INFO", "slow")  # the abort lands before the dump starts
    target = make_target(env)
    with watched(env / "victim.fifo") as victim:
        planted = plant(env / "remote-tmp", target, victim.path)
        before = state(planted)
        src = _driver().open_dump(REF, staging="file")
        src.abort()
        assert not victim.touched()
    assert target.read_bytes() == TARGET_BYTES and state(planted) == before
    assert [p.name for p in _wait_empty_but(env / "remote-tmp", planted)] == [planted.name]


def _wait_empty_but(d: Path, keep: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) != [keep] and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(d.iterdir())


def test_the_token_is_on_no_command_line(
    env: Path, fixed_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every script of the libvirt driver (FIFO and staged dumps, the staged abort): the
    # token travels on stdin only; /proc/PID/cmdline is world-readable.
    monkeypatch.setenv("FAKE_INFO", "slow")
    t = Recording(LocalTransport())
    drv = _driver(t)  # type: ignore[arg-type]
    drv.open_dump(REF, staging="file").abort()
    write_dump(drv.open_dump(REF), env / "out", "a.gz")
    scripts = [script for script, _, _ in t.calls]
    assert len(t.calls) == 3 and "domjobabort" in scripts[1], scripts
    for script, args, stdin in t.calls:
        assert TOKEN not in script and not any(TOKEN in a for a in args)
        assert stdin == f"{TOKEN}\n".encode()
