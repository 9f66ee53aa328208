"""sh/fiforeader.pl, the reader of a live capture's FIFO, run for real (perl, as on the
hypervisors), and the two ways the drivers start it: libvirt/live.sh's DRAIN and lib.sh's
memdump_live_reader (qemu and proxmox). QEMU's background snapshot writes the stream 4 KiB
at a time; the reader must hand it on in large writes, byte for byte, and (DRAIN) keep
reading once the collector is gone."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memdump.hypervisors import libvirt as lv
from memdump.hypervisors.migration import FIFO_READER
from memdump.hypervisors.scripts import LIB

F_GETPIPE_SZ = 1032
PIECE = 4096
RATE = 20_000  # pieces/s: 80 MB/s


def _syscw(pid: int) -> int:
    """write(2) calls the process has made so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/PID/io")


def _no_perl_path(tmp_path: Path) -> str:
    """A PATH with sh, cat and the rest of what the scripts run, but no perl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "cat", "mkfifo", "rm"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _run_reader(
    argv: list[str], tmp_path: Path, pieces: int, env: dict[str, str] | None = None
) -> tuple[bytes, bytes, int, int, int, float]:
    """Feeds ``pieces`` random 4 KiB writes through a FIFO into the reader (``argv``, stdin
    the FIFO, stdout a file), paced at 80 MB/s in bursts due each 0.2 ms, as QEMU's
    snapshot writes them (a writer held up by the machine's load catches up in a larger
    burst); returns (sent, received, the FIFO's pipe size as the writer sees it, the
    reader's write(2) calls, its exit status, ms from the first byte sent to the last
    received)."""
    fifo = tmp_path / "mem"
    os.mkfifo(fifo, 0o600)
    out = tmp_path / "out"
    sent = os.urandom(pieces * PIECE)
    with out.open("wb") as fout:
        # The reader opens the FIFO through its stdin: the shell's redirection, as live.sh.
        reader = subprocess.Popen(
            ["sh", "-c", 'exec "$@" <"$0"', str(fifo), *argv], stdout=fout, env=env
        )
    fd = os.open(fifo, os.O_WRONLY)
    try:
        # The reader sets the pipe's size after its open: give it the moment it needs.
        deadline = time.monotonic() + 2
        while fcntl.fcntl(fd, F_GETPIPE_SZ) < (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        size = fcntl.fcntl(fd, F_GETPIPE_SZ)
        t0, i = time.monotonic(), 0
        while i < pieces:
            due = min(pieces, int((time.monotonic() - t0) * RATE) + 1)
            while i < due:
                os.write(fd, sent[i * PIECE : (i + 1) * PIECE])
                i += 1
            time.sleep(0.0002)
        # Everything arrived while the writer still holds the FIFO: the count of writes is
        # read from the live process.
        deadline = time.monotonic() + 30
        while out.stat().st_size < len(sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed_ms = (time.monotonic() - t0) * 1000
        writes = _syscw(reader.pid)
    finally:
        os.close(fd)
    rc = reader.wait(timeout=30)
    return sent, out.read_bytes(), size, writes, rc, elapsed_ms


def _batched(writes: int, elapsed_ms: float, pieces: int) -> bool:
    """The reader's bound: after a read below 128 KiB it waits 1 ms, so at most one such
    read per ms of the feed, plus the large reads (each at least 128 KiB)."""
    return writes <= elapsed_ms + pieces * PIECE // (128 << 10) + 2


def test_the_reader_copies_every_byte_in_large_writes(tmp_path: Path) -> None:
    """400 writes of 4 KiB, paced as QEMU's snapshot makes them: a few dozen writes on
    (cat: 63-70 for 400 in ~21 ms, measured), every byte, the FIFO's pipe 1 MiB."""
    sent, got, size, writes, rc, ms = _run_reader(["perl", "-e", FIFO_READER], tmp_path, 400)
    assert rc == 0
    assert got == sent
    assert size == 1 << 20
    assert _batched(writes, ms, 400), (writes, ms)


def test_the_reader_stops_when_its_stdout_is_gone(tmp_path: Path) -> None:
    """Without "drain": like cat, exit 1 at the first failed write."""
    r, w = os.pipe()
    os.close(r)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1 << 16))
    with src.open("rb") as fin:
        rc = subprocess.run(
            ["perl", "-e", FIFO_READER], stdin=fin, stdout=w, stderr=subprocess.PIPE, timeout=30
        )
    os.close(w)
    assert rc.returncode == 1
    assert b"writing the stream" in rc.stderr


def test_the_reader_fails_on_a_stdin_it_cannot_read(tmp_path: Path) -> None:
    """Exit 2 when stdin fails (a directory: read(2) gives EISDIR)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        rc = subprocess.run(
            ["perl", "-e", FIFO_READER],
            stdin=fd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    finally:
        os.close(fd)
    assert rc.returncode == 2
    assert b"reading the FIFO" in rc.stderr


@pytest.mark.parametrize("perl", [True, False], ids=["perl", "no-perl"])
def test_drain_outlives_its_stdout_and_reads_to_the_end(tmp_path: Path, perl: bool) -> None:
    """libvirt/live.sh's DRAIN, with and without perl on the host: QEMU 7.2 must see its
    whole stream read, or guest RAM stays write-protected. With the collector gone (stdout
    a closed pipe) the reader reads to the end and its exit status says the copy failed;
    with a live stdout it copies every byte and succeeds."""
    env = None if perl else {"PATH": _no_perl_path(tmp_path)}
    argv = ["sh", "-c", lv._DRAIN, "sh", FIFO_READER]
    data = tmp_path / "stream"
    data.write_bytes(os.urandom(1 << 20) * 3)  # larger than any pipe buffer
    r, w = os.pipe()
    os.close(r)  # the collector is gone before the first byte
    src = tmp_path / "src"
    os.mkfifo(src)
    fed = threading.Event()

    def feed() -> None:
        with src.open("wb") as fout:
            fout.write(data.read_bytes())  # blocks unless every byte is read
        fed.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with src.open("rb") as fin:
        reader = subprocess.Popen(argv, stdin=fin, stdout=w, stderr=subprocess.DEVNULL, env=env)
    os.close(w)
    assert reader.wait(timeout=30) not in (0, None)
    feeder.join(timeout=30)
    assert fed.is_set()  # every byte was read: the writer never blocked
    out = tmp_path / "out"
    with data.open("rb") as fin, out.open("wb") as fout:
        assert subprocess.run(argv, stdin=fin, stdout=fout, env=env).returncode == 0
    assert out.read_bytes() == data.read_bytes()


def test_drain_uses_the_batching_reader_where_perl_is(tmp_path: Path) -> None:
    """DRAIN as live.sh runs it makes the FIFO's pipe 1 MiB and writes in large pieces
    (with cat, before: 64 KiB and a write per piece)."""
    sent, got, size, writes, rc, ms = _run_reader(
        ["sh", "-c", lv._DRAIN, "sh", FIFO_READER], tmp_path, 400
    )
    assert (rc, got) == (0, sent)
    assert size == 1 << 20
    assert _batched(writes, ms, 400), (writes, ms)


# The writer's side of memdump_live_reader's test: opens the FIFO, reports the pipe's size
# once the reader has set it (or after 2 s), writes the data.
WRITER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
end = time.monotonic() + 2
while fcntl.fcntl(fd, 1032) < (1 << 20) and time.monotonic() < end:
    time.sleep(0.01)
sys.stderr.write("pipe %d\\n" % fcntl.fcntl(fd, 1032))
with open(sys.argv[2], "rb") as f:
    os.write(fd, f.read())
"""


@pytest.mark.parametrize("perl", [True, False], ids=["perl", "no-perl"])
def test_memdump_live_reader_in_lib_sh(tmp_path: Path, perl: bool) -> None:
    """lib.sh's memdump_live_reader (qemu/live.sh): perl's reader where the host has perl
    (the FIFO's pipe made 1 MiB), cat otherwise; either copies every byte."""
    env = {"PATH": os.environ["PATH"] if perl else _no_perl_path(tmp_path)}
    d = tmp_path / "d"
    d.mkdir()
    data = os.urandom(3 << 20)
    src = tmp_path / "sent"
    src.write_bytes(data)
    body = LIB + '\nd=$1\nmemdump_live_reader "$2"\n"$3" -c "$4" "$d/mem" "$5"\nwait "$reader"\n'
    res = subprocess.run(
        ["sh", "-c", body, "sh", str(d), FIFO_READER, sys.executable, WRITER, str(src)],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    assert f"pipe {1 << 20 if perl else 64 << 10}".encode() in res.stderr
    assert (d / "reader").read_text().strip().isdigit()
