"""Clean-up of what a killed capture leaves: local .part files (memdump.leftovers) and
hypervisor temp dirs (memdump.hypervisors.fifo, run here through the local transport,
i.e. a real shell, flock and /proc)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.hypervisors.fifo import clean_stale
from memdump.hypervisors.scripts import LIB
from memdump.leftovers import clean_parts
from memdump.pipeline import write_dump
from memdump.transport.local import LocalTransport
from tests.helpers.elfgen import make_core, mixed_bytes
from tests.helpers.sources import FakeSource

OLD = time.time() - 3600


def _part(d: Path, name: str, *, old: bool = True) -> Path:
    p = d / name
    p.write_bytes(b"partial")
    if old:
        os.utime(p, (OLD, OLD))
    return p


def test_stale_part_is_removed_live_and_young_ones_kept(tmp_path: Path) -> None:
    stale = _part(tmp_path, "101_1.mem.gz.part")
    young = _part(tmp_path, "101_2.mem.gz.part", old=False)
    live = _part(tmp_path, "101_3.mem.gz.part")
    done = _part(tmp_path, "101_4.mem.gz")
    (tmp_path / "elsewhere").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.mem.gz.part")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running write_dump holds
    try:
        assert clean_parts(tmp_path, 60) == [stale]
    finally:
        os.close(fd)
    assert not stale.exists() and young.exists() and live.exists() and done.exists()
    assert (tmp_path / "elsewhere").exists()
    assert clean_parts(tmp_path / "missing") == []


def test_a_running_capture_holds_the_lock_on_its_part(tmp_path: Path) -> None:
    core = make_core([(0, mixed_bytes(640 * 1024, 5))])
    seen: list[list[Path]] = []

    class Peeking(FakeSource):
        def readinto(self, view: memoryview) -> int:
            if not seen:
                parts = list(tmp_path.glob("*.part"))
                for p in parts:
                    os.utime(p, (OLD, OLD))  # old enough, yet alive
                seen.append(clean_parts(tmp_path, 0))
                assert parts and all(p.exists() for p in parts)
            return super().readinto(view)

    res = write_dump(Peeking(core), tmp_path, "x.mem.gz")
    assert seen == [[]] and res.path.exists() and not list(tmp_path.glob("*.part"))


@pytest.fixture
def remote_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "hvtmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(d))  # the scripts' root-only base, here
    return d


def _dump_dir(tmp: Path, suffix: str, *, old: bool = True, lock: bool = True) -> Path:
    d = tmp / f"memdump.{suffix}"
    d.mkdir(mode=0o700)
    if lock:
        (d / "lock").touch()
    os.mkfifo(d / "mem", 0o600)
    if old:
        os.utime(d, (OLD, OLD))
    return d


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_stale_dump_dirs_are_removed_and_blocked_readers_killed(
    remote_tmp: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    stale = _dump_dir(remote_tmp, "AAAAAAAAAA")
    # The reader a killed script left, blocked for ever in open() of the FIFO.
    reader = subprocess.Popen(["cat", str(stale / "mem")], stdout=subprocess.DEVNULL)
    procs.append(reader)
    (stale / "reader").write_text(f"{reader.pid}\n")
    os.utime(stale, (OLD, OLD))
    # A pid that was reused by something else is not killed.
    bystander = subprocess.Popen(["sleep", "60"])
    procs.append(bystander)
    reused = _dump_dir(remote_tmp, "BBBBBBBBBB")
    (reused / "reader").write_text(f"{bystander.pid}\n")
    os.utime(reused, (OLD, OLD))
    no_lock = _dump_dir(remote_tmp, "CCCCCCCCCC", lock=False)  # an older script's dir

    removed = clean_stale(LocalTransport(), "hv", 0)

    assert sorted(removed) == sorted(str(p) for p in (stale, reused, no_lock))
    assert reader.wait(5) != 0  # killed
    assert bystander.poll() is None
    assert list(remote_tmp.iterdir()) == []


def test_live_young_and_foreign_dirs_are_kept(
    remote_tmp: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    live = _dump_dir(remote_tmp, "DDDDDDDDDD")
    holder = subprocess.Popen(["flock", str(live / "lock"), "sleep", "60"])
    procs.append(holder)
    deadline = time.monotonic() + 5
    while subprocess.run(["flock", "-n", str(live / "lock"), "true"]).returncode == 0:
        assert time.monotonic() < deadline, "flock holder did not start"
        time.sleep(0.05)
    os.utime(live, (OLD, OLD))
    young = _dump_dir(remote_tmp, "EEEEEEEEEE", old=False)
    target = remote_tmp / "not-ours"
    target.mkdir()
    os.symlink(target, remote_tmp / "memdump.FFFFFFFFFF")
    other_name = _dump_dir(remote_tmp, "short")

    assert clean_stale(LocalTransport(), "hv", 30) == []
    assert live.exists() and young.exists() and target.exists() and other_name.exists()


@pytest.mark.parametrize("shell", ["dash", "bash"])
@pytest.mark.parametrize("end", ["exit 0", "sleep 30"])
def test_a_signal_as_the_script_ends_still_removes_its_dir(
    remote_tmp: Path, shell: str, end: str
) -> None:
    # "exit $(kill ...)": the TERM is pending when the shell starts to exit, the case an
    # abort landing just as the dump finishes hits; "sleep 30": the usual abort mid-dump.
    # Both shells run a trap left pending there before the EXIT trap's first command.
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is not installed (scripts/bootstrap installs it)")
    script = LIB + 'memdump_start ""\n: >"$d/mem"\n'
    if end == "exit 0":
        script += "exit $(kill -TERM $$; echo 0)\n"
    else:
        script += "sleep 30 &\nreader=$!\nkill -TERM $$\nwait $reader\n"
    env = {**os.environ, "TMPDIR": str(remote_tmp)}
    res = subprocess.run(
        [shell, "-c", script], env=env, input=b"0123abcd\n", timeout=20, check=False
    )
    assert res.returncode == 143
    assert list(remote_tmp.iterdir()) == []


def test_analysis_copies_of_a_killed_check_are_removed(tmp_path: Path) -> None:
    from memdump.analysis import TEMP_PREFIX
    from memdump.leftovers import clean_analysis_dirs

    stale, live = tmp_path / f"{TEMP_PREFIX}a", tmp_path / f"{TEMP_PREFIX}b"
    for d in (stale, live):
        d.mkdir(mode=0o700)
        (d / "core.elf").write_bytes(b"\0" * 4096)
        os.utime(d, (OLD, OLD))
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running analyze() holds
    try:
        assert clean_analysis_dirs(tmp_path, 60) == [stale]
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists()
