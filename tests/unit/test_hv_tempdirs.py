"""Issue 11 item 4: the hypervisor-side temp dirs (memdump.hypervisors.fifo) and the abort
and clean-up scripts that act on them, run through the local transport (a real dash,
stat, flock, /proc; as root, as on a hypervisor). A local user's planted directory, a
symlinked ``cancel`` or FIFO, a directory others can write: root touches none of them; the
token is on no command line."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.errors import HypervisorError
from memdump.hypervisors import fifo
from memdump.hypervisors.fifo import ABORT_FIFO, DirStream, clean_stale
from memdump.hypervisors.libvirt import _ABORT_FILE
from memdump.hypervisors.scripts import LIB
from memdump.transport.base import CommandResult
from memdump.transport.local import LocalTransport
from tests.helpers.hv_tempdirs import (
    NOBODY,
    TARGET_BYTES,
    TOKEN,
    FifoWatch,
    is_private_dir,
    make_target,
    plant,
    state,
    watched,
)

OLD = time.time() - 3600
# How every dump script starts (sh/lib.sh, then its memdump_start).
PROLOGUE = LIB + 'memdump_start ""\n'
LOCAL = LocalTransport()


def _stdin(token: str = TOKEN) -> bytes:
    return f"{token}\n".encode()


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR and the run directory of the scripts, both here."""
    b = tmp_path / "hvtmp"
    b.mkdir()
    monkeypatch.setenv("TMPDIR", str(b))
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(b))
    return b


def _own_dir(base: Path, name: str = "memdump.AAAAAAAAAA", token: str = TOKEN) -> Path:
    """A directory as PROLOGUE makes it: root's, 0700, with the token."""
    d = base / name
    d.mkdir(mode=0o700)
    (d / "token").write_text(token + "\n")
    return d


# -- the directory line and the run directory -------------------------------------------------


def _prologue(stdin: bytes = _stdin(), extra: str = "") -> tuple[CommandResult, str | None]:
    s = DirStream(LOCAL.stream(PROLOGUE + extra + "exit 0\n", stdin=stdin), "hv")
    d = s.read_dir()
    return s.finish(10), d


def test_the_script_names_its_directory_first_and_uses_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    run = tmp_path / "run"
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(run))
    seen = tmp_path / "seen"
    res, d = _prologue(extra=f'stat -c "%a %u" "$d" "$d/token" >{seen}\ncat "$d/token" >>{seen}\n')
    assert res.returncode == 0, res.stderr_text
    assert d is not None and Path(d).parent == run and Path(d).name.startswith("memdump.")
    assert is_private_dir(run)  # made 0700 by the script
    assert seen.read_text().split("\n") == ["700 0", "600 0", TOKEN, ""]
    assert list(run.iterdir()) == []  # removed on exit


def test_a_run_dir_that_is_not_ours_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)  # (whatever the umask)
    link = tmp_path / "run-link"
    link.symlink_to(elsewhere)
    foreign = tmp_path / "run-foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    for run in (link, foreign, tmp_path / "no" / "such" / "dir"):
        monkeypatch.setenv("MEMDUMP_RUN_DIR", str(run))
        res, d = _prologue()
        assert res.returncode == 0, res.stderr_text
        assert d is not None and Path(d).parent == tmp  # fell back to TMPDIR
    assert (elsewhere.stat().st_mode & 0o777) == 0o755 and list(elsewhere.iterdir()) == []
    assert list(foreign.iterdir()) == []


def test_an_own_run_dir_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(run))
    res, d = _prologue()
    assert res.returncode == 0 and d is not None and Path(d).parent == run
    assert is_private_dir(run)


def test_no_token_on_stdin_no_directory(base: Path) -> None:
    res, d = _prologue(stdin=b"")
    assert d is None and res.returncode == 93 and "no token on stdin" in res.stderr_text
    assert list(base.iterdir()) == []


class _Chunks:
    """A ByteStream that hands out fixed chunks."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.aborted = False

    def readinto(self, view: memoryview) -> int:
        if not self.chunks:
            return 0
        c = self.chunks.pop(0)
        n = min(len(c), len(view))
        view[:n] = c[:n]
        if n < len(c):
            self.chunks.insert(0, c[n:])
        return n

    def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def finish(self, timeout: float) -> CommandResult:
        return CommandResult(0, b"", b"")

    def abort(self) -> None:
        self.aborted = True


def _all(s: DirStream) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(7))
    while n := s.readinto(buf):
        out += buf[:n]
    return bytes(out)


def test_dir_line_parsing() -> None:
    d = "/run/memdump/memdump.Ab3dEf9hIj"
    for chunks in (
        (f"memdump-dir {d}\nELF".encode(), b"rest"),
        (b"memdump-d", f"ir {d}".encode(), b"\nELFrest"),
    ):
        s = DirStream(_Chunks(*chunks), "hv")
        assert s.read_dir() == d and _all(s) == b"ELFrest"
    empty = DirStream(_Chunks(), "hv")  # the script failed before its directory
    assert empty.read_dir() is None and _all(empty) == b""
    for bad in (
        b"ELF\x7f....\n",
        b"memdump-dir tmp/memdump.Ab3dEf9hIj\n",  # relative
        b"memdump-dir /tmp/../etc/memdump.Ab3dEf9hIj\n",
        b"memdump-dir /tmp/x y/memdump.Ab3dEf9hIj\n",
        b"memdump-dir /tmp/memdump.short\n",
        b"memdump-dir /tmp/memdump.Ab3dEf9hIj/cancel\n",
        b"memdump-dir /tmp/memdump.Ab3dEf9hIj",  # cut short
        b"x" * 5000,
    ):
        inner = _Chunks(bad)
        with pytest.raises(HypervisorError, match="memdump-dir"):
            DirStream(inner, "hv").read_dir()
        assert inner.aborted


# -- ABORT_FIFO ----------------------------------------------------------------------------


def _abort_fifo(d: Path | str, token: str = TOKEN) -> None:
    res = LOCAL.run(ABORT_FIFO, (str(d),), stdin=_stdin(token), timeout=20)
    assert res.returncode == 0, res.stderr_text


def test_abort_fifo_opens_the_fifo_of_its_own_checked_dir(base: Path, tmp_path: Path) -> None:
    d = _own_dir(base)
    w = FifoWatch(d / "mem")
    try:
        _abort_fifo(d, token="0" * 32)  # another dump's token: nothing
        assert not w.touched()
        _abort_fifo(d)
        assert w.touched()  # control: the real case does open it
    finally:
        w.close()


def test_abort_fifo_leaves_planted_and_unsafe_dirs_alone(base: Path, tmp_path: Path) -> None:
    target = make_target(tmp_path)
    with watched(tmp_path / "victim.fifo") as victim:
        planted = plant(base, target, victim.path)
        before = state(planted)
        _abort_fifo(planted)  # a local user's directory, right token
        # Root's, right token, but writable by others (its entries can be swapped).
        loose = _own_dir(base, "memdump.BBBBBBBBBB")
        loose.chmod(0o777)
        os.symlink(victim.path, loose / "mem")
        _abort_fifo(loose)
        # Root's, 0700, right token: its mem a symlink to someone's FIFO.
        linked = _own_dir(base, "memdump.CCCCCCCCCC")
        os.symlink(victim.path, linked / "mem")
        _abort_fifo(linked)
        # A symlink (in a shared /tmp) to root's real dump directory.
        real = _own_dir(tmp_path, "memdump.DDDDDDDDDD")
        with watched(real / "mem") as real_fifo:
            alias = base / "memdump.EEEEEEEEEE"
            alias.symlink_to(real)
            _abort_fifo(alias)
            for bad in ("memdump.DDDDDDDDDD", f"{base}/../{real.parent.name}/memdump.DDDDDDDDDD"):
                _abort_fifo(bad)  # relative, or with ".."
            assert not real_fifo.touched()
        assert not victim.touched()
    assert state(planted) == before and target.read_bytes() == TARGET_BYTES


# -- _ABORT_FILE (libvirt, staged) ---------------------------------------------------------


def _abort_file(d: Path, token: str = TOKEN) -> None:
    res = LOCAL.run(_ABORT_FILE, ("test:///default", "vm1", str(d)), stdin=_stdin(token))
    assert res.returncode == 0, res.stderr_text


def test_abort_file_marks_only_its_own_checked_dir(base: Path, tmp_path: Path) -> None:
    target = make_target(tmp_path)
    with watched(tmp_path / "victim.fifo") as victim:
        planted = plant(base, target, victim.path)
        before = state(planted)
        _abort_file(planted)
        assert state(planted) == before
    # Root's own 0700 directory whose cancel is a symlink: noclobber, nothing followed.
    linked = _own_dir(base, "memdump.BBBBBBBBBB")
    os.symlink(target, linked / "cancel")
    _abort_file(linked)
    assert (linked / "cancel").is_symlink()
    assert target.read_bytes() == TARGET_BYTES
    # Control: the real case gets its cancel mark.
    own = _own_dir(base)
    _abort_file(own, token="f" * 32)
    assert not (own / "cancel").exists()
    _abort_file(own)
    assert (own / "cancel").is_file() and not (own / "cancel").is_symlink()


# -- the start-up clean-up -----------------------------------------------------------------


@pytest.fixture
def two_bases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    run.mkdir(mode=0o700)
    tmp.mkdir()
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(run))
    monkeypatch.setenv("TMPDIR", str(tmp))
    yield run, tmp


def _stale(d: Path) -> Path:
    (d / "lock").touch()
    os.mkfifo(d / "mem", 0o600)
    os.utime(d, (OLD, OLD))
    return d


def test_clean_up_looks_in_the_run_dir_and_tmpdir_and_leaves_what_is_not_ours(
    two_bases: tuple[Path, Path], tmp_path: Path
) -> None:
    run, tmp = two_bases
    target = make_target(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    stale_run = _own_dir(run, "memdump.RRRRRRRRRR")
    os.symlink(outside, stale_run / "link")  # removed as a link, not followed
    _stale(stale_run)
    stale_tmp = _stale(_own_dir(tmp, "memdump.TTTTTTTTTT"))
    with watched(tmp_path / "victim.fifo") as victim:
        planted = plant(tmp, target, victim.path)
        os.utime(planted, (OLD, OLD), follow_symlinks=False)
        before = state(planted)
        loose = _stale(_own_dir(tmp, "memdump.LLLLLLLLLL"))
        loose.chmod(0o770)
        os.utime(loose, (OLD, OLD))
        bad_lock = _own_dir(tmp, "memdump.KKKKKKKKKK")
        os.symlink(victim.path, bad_lock / "lock")
        os.utime(bad_lock, (OLD, OLD))
        alias = tmp / "memdump.SSSSSSSSSS"
        alias.symlink_to(_stale(_own_dir(tmp_path, "memdump.SSSSSSSSSS")))

        removed = clean_stale(LOCAL, "hv", 60)

        assert not victim.touched()
    assert sorted(removed) == sorted([str(stale_run), str(stale_tmp)])
    assert not stale_run.exists() and not stale_tmp.exists()
    assert (outside / "keep").read_bytes() == b"keep"
    assert state(planted) == before and target.read_bytes() == TARGET_BYTES
    assert loose.exists() and bad_lock.exists() and alias.is_symlink()
    assert (tmp_path / "memdump.SSSSSSSSSS").exists()


def test_a_foreign_run_dir_is_not_cleaned(
    two_bases: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = two_bases
    left = _stale(_own_dir(run))
    os.chown(run, NOBODY, NOBODY)
    assert clean_stale(LOCAL, "hv", 60) == []
    assert left.exists()
    subprocess.run(["chown", "0:0", str(run)], check=True)
    assert clean_stale(LOCAL, "hv", 60) == [str(left)]


def test_run_dir_constant() -> None:
    assert fifo.RUN_DIR == "/run/memdump"
    assert "/run/memdump" in LIB
