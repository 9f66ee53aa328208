"""Issue 11 item 13: what memdump creates is private whatever the umask: every missing
directory 0700 (not only the leaf), records and outbox databases 0600 with their WAL
files; directories that already existed are left as they are."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.fsperm import private_dir, private_file, private_umask
from memdump.records.outbox import Outbox
from memdump.records.sqlite import SQLiteRecordStore


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask of a shell or a service manager, restored afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.usefixtures("umask_022")
def test_private_dir_makes_every_missing_component_0700(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    leaf = shared / "a" / "b" / "c"
    assert private_dir(leaf) == leaf
    assert mode(shared) == 0o755  # existed: not ours to change
    for d in (shared / "a", shared / "a" / "b", leaf):
        assert mode(d) == 0o700, d
    # Again, on what exists now: nothing changes, including a mode set meanwhile.
    (shared / "a").chmod(0o750)
    private_dir(leaf)
    assert mode(shared / "a") == 0o750 and mode(leaf) == 0o700


def test_private_dir_is_exact_under_a_stricter_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # mkdir's mode alone would give 0500: unusable
    try:
        d = private_dir(tmp_path / "x" / "y")
    finally:
        os.umask(old)
    assert mode(tmp_path / "x") == 0o700 and mode(d) == 0o700


def test_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        private_dir(tmp_path / "f")


@pytest.mark.usefixtures("umask_022")
def test_private_file_creates_0600_and_leaves_an_existing_file(tmp_path: Path) -> None:
    new = private_file(tmp_path / "new.db")
    assert mode(new) == 0o600 and new.read_bytes() == b""
    old = tmp_path / "old"
    old.write_text("kept")
    old.chmod(0o640)
    private_file(old)
    assert mode(old) == 0o640 and old.read_text() == "kept"


@pytest.mark.usefixtures("umask_022")
def test_record_store_and_outbox_are_private_under_umask_022(tmp_path: Path) -> None:
    data = tmp_path / "var" / "lib" / "memdump"
    store = SQLiteRecordStore(data / "records.db")
    Outbox(data / "outbox.db")
    assert store.list(1, 0) == []
    for d in (tmp_path / "var", tmp_path / "var" / "lib", data):
        assert mode(d) == 0o700, d
    files = sorted(data.iterdir())
    assert {f.name for f in files} >= {"records.db", "outbox.db"}
    for f in files:  # the databases and their -wal/-shm
        assert mode(f) == 0o600, f


def test_private_umask_sets_077_and_returns_the_old_one() -> None:
    old = os.umask(0o022)
    try:
        assert private_umask() == 0o022
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(old)
