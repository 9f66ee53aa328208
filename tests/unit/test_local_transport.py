"""The local transport and the libvirt dump script, with a fake virsh on PATH."""

import os
import stat
import time
from pathlib import Path

import pytest

from memdump.errors import DumpFailedError, ShortDumpError
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig
from memdump.transport.local import LocalTransport
from tests.helpers.elfgen import make_core


def test_arguments_are_never_parsed_by_a_shell(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    hostile = f"x; touch {canary}; $(touch {canary}) `touch {canary}` \n'\""
    res = LocalTransport().run('printf %s "$1"', [hostile])
    assert res.returncode == 0
    assert res.stdout.decode() == hostile
    assert not canary.exists()


def test_stream_and_exit_status() -> None:
    s = LocalTransport().stream('head -c "$1" /dev/zero; echo oops >&2; exit 3', ["1000000"])
    n = 0
    while chunk := s.read():
        n += len(chunk)
    res = s.finish(5)
    assert n == 1_000_000 and res.returncode == 3 and res.stderr_text == "oops"


def test_abort_kills_the_group() -> None:
    s = LocalTransport().stream("sleep 30 & wait")
    t0 = time.monotonic()
    s.abort()
    assert time.monotonic() - t0 < 5


FAKE_VIRSH = """#!/bin/sh
# fake virsh: behaviour chosen by $FAKE_MODE; the dump path is the last argument
for a; do last=$a; done
case " $* " in *" dump "*) ;; *) exit 0 ;; esac  # e.g. domjobabort: nothing to do
case "$FAKE_MODE" in
  ok) cat "$FAKE_CORE" > "$last" ;;
  fail-early) echo "error: Requested operation is not valid: domain is not running" >&2; exit 1 ;;
  fail-mid) head -c 1000 "$FAKE_CORE" > "$last"; echo "error: dump failed midway" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    virsh = bindir / "virsh"
    virsh.write_text(FAKE_VIRSH)
    virsh.chmod(0o755)
    core = tmp_path / "core.elf"
    core.write_bytes(make_core([(0, os.urandom(300_000)), (1 << 20, bytes(700_000))]))
    tmp = tmp_path / "remote-tmp"
    tmp.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CORE", str(core))
    monkeypatch.setenv("TMPDIR", str(tmp))
    # The scripts prefer the run dir (/run/memdump as root) to TMPDIR: without this their
    # dirs went there, and the checks of remote-tmp below looked at an empty dir.
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(tmp))
    return tmp_path


def _driver() -> LibvirtDriver:
    return LibvirtDriver(HypervisorConfig(name="local", transport="local"), LocalTransport())


def test_dump_script_ok_cleans_up(fake_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "ok")
    res = write_dump(_driver().open_dump(VMRef("local", "vm1", "vm1")), fake_env / "out", "a.gz")
    assert res.raw_bytes == (fake_env / "core.elf").stat().st_size
    assert list((fake_env / "remote-tmp").iterdir()) == []
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", ["fail-early", "fail-mid"])
def test_virsh_failure_no_hang_no_file(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)
    t0 = time.monotonic()
    with pytest.raises(DumpFailedError) as ei:
        write_dump(_driver().open_dump(VMRef("local", "vm1", "vm1")), fake_env / "out", "a.gz")
    assert time.monotonic() - t0 < 10
    assert "error:" in ei.value.fields["stderr"]
    assert list((fake_env / "out").iterdir()) == []
    assert list((fake_env / "remote-tmp").iterdir()) == []


def test_abort_mid_dump_cleans_remote_temp(fake_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "ok")
    src = _driver().open_dump(VMRef("local", "vm1", "vm1"))
    assert src.readinto(memoryview(bytearray(65536)))
    # The dump's own dir is where this test looks (so its emptiness below means something).
    assert [p.name[:8] for p in (fake_env / "remote-tmp").iterdir()] == ["memdump."]
    src.abort()
    deadline = time.monotonic() + 5
    while list((fake_env / "remote-tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((fake_env / "remote-tmp").iterdir()) == []


def test_short_core_from_successful_virsh(fake_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # virsh exits 0 but the core is truncated: the headers catch it.
    core = fake_env / "core.elf"
    core.write_bytes(core.read_bytes()[:-1])
    monkeypatch.setenv("FAKE_MODE", "ok")
    with pytest.raises(ShortDumpError):
        write_dump(_driver().open_dump(VMRef("local", "vm1", "vm1")), fake_env / "out", "a.gz")
