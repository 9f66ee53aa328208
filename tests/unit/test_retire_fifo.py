"""lib.sh's memdump_retire_fifo, which abort-fifo.sh runs after killing a dump's reader: a
writer already blocked in open() goes on, and one that comes later cannot block.

The race it closes (seen on the lab's Proxmox VM once its SSH sessions started fast): an
abort killed the reader before QEMU got to its open() of the FIFO; QEMU then waited there
for a reader for ever, the guest paused and its monitor dead."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest

from memdump.hypervisors.scripts import load


def _run(fn: str, fifo: Path) -> None:
    script = load() + f'{fn} "$1"\n'
    subprocess.run(["sh", "-c", script, "sh", str(fifo)], check=True, timeout=30)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    d = tmp_path / "memdump.AbCdEfGhIj"
    d.mkdir(mode=0o700)
    os.mkfifo(d / "mem", 0o600)
    return d / "mem"


def test_a_writer_that_comes_after_the_abort_cannot_block(fifo: Path) -> None:
    _run("memdump_retire_fifo", fifo)
    assert not fifo.exists()
    with pytest.raises(FileNotFoundError):  # QEMU's open() fails: its dump ends
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # (non-blocking: no hang if it is there)


def test_before_it_a_later_writer_would_have_waited_for_a_reader_for_ever(fifo: Path) -> None:
    # What abort-fifo.sh did before (memdump_unblock alone): the FIFO stays, no reader.
    _run("memdump_unblock", fifo)
    with pytest.raises(OSError) as ei:  # non-blocking: a blocking open() would wait
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert ei.value.errno == errno.ENXIO


def test_a_writer_blocked_in_open_goes_on(fifo: Path) -> None:
    opened: list[int] = []
    writer = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)))
    writer.start()
    _run("memdump_retire_fifo", fifo)
    writer.join(10)
    assert not writer.is_alive() and opened  # its open() returned
    with pytest.raises(BrokenPipeError):  # and its writes fail: QEMU ends the dump
        os.write(opened[0], b"x")
    os.close(opened[0])


def test_a_symlink_is_left_alone(tmp_path: Path, fifo: Path) -> None:
    link = fifo.parent / "link"
    link.symlink_to(fifo)
    _run("memdump_retire_fifo", link)
    assert link.is_symlink() and fifo.exists()
