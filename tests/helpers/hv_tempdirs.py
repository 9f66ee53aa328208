"""What a local user on a hypervisor can plant for the dump scripts (run as root there),
and how a test sees whether root touched it: issue 11 item 4."""

from __future__ import annotations

import contextlib
import os
import select
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from memdump.transport.base import ByteStream, CommandResult, Transport

NOBODY = 65534  # the local user who plants
TOKEN = "c0ffee" * 5 + "00"  # what every dump's token is made to be (32 hex digits)
TARGET_BYTES = b"a disk image root must never truncate\n"


class FifoWatch:
    """A FIFO with our read end held open (non-blocking): ``touched()`` says whether
    anyone opened it for writing since (root's ``exec 9<>FIFO`` does). Linux reports
    POLLHUP on a FIFO's reader once a writer has come and gone: no timing involved."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def touched(self) -> bool:
        p = select.poll()
        p.register(self._fd, select.POLLIN | select.POLLHUP)
        return any(ev & (select.POLLHUP | select.POLLIN) for _, ev in p.poll(0))

    def close(self) -> None:
        os.close(self._fd)


def plant(
    base: Path, target: Path, fifo: Path, *, name: str = "memdump.0000000000", owner: int = NOBODY
) -> Path:
    """A local user's directory that looks like a dump's: the dump's token (read from
    /proc/PID/cmdline on the old code), ``cancel`` -> ``target``, ``mem`` -> ``fifo``."""
    d = base / name
    d.mkdir()
    (d / "token").write_text(TOKEN + "\n")
    os.symlink(target, d / "cancel")
    os.symlink(fifo, d / "mem")
    for p in (d / "token", d / "cancel", d / "mem", d):
        os.lchown(p, owner, owner)
    d.chmod(0o755)
    return d


def state(d: Path) -> list[tuple[str, int, int, str]]:
    """Each entry of ``d`` as lstat and content (or link target) see it."""
    out = []
    for p in sorted(d.iterdir()):
        st = p.lstat()
        what = os.readlink(p) if p.is_symlink() else (p.read_text() if p.is_file() else "")
        out.append((p.name, st.st_mode, st.st_uid, what))
    return out


def make_target(d: Path) -> Path:
    t = d / "disk.qcow2"
    t.write_bytes(TARGET_BYTES)
    return t


def token_in_cmdlines(token: str) -> list[str]:
    """The command lines (of every process on this machine) that hold ``token``."""
    hits = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            if token.encode() in raw:
                line = raw.replace(b"\0", b" ").decode(errors="replace")
                hits.append(f"{pid}: {line}")
    return hits


class Recording:
    """A Transport that records (script, args, stdin) of every call and passes it on."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.description = inner.description
        self.calls: list[tuple[str, tuple[str, ...], bytes]] = []

    def run(
        self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0, stdin: bytes = b""
    ) -> CommandResult:
        self.calls.append((script, tuple(args), stdin))
        kw = {"stdin": stdin} if stdin else {}  # (the code before issue 11 had no stdin)
        return self.inner.run(script, args, timeout=timeout, **kw)

    def stream(self, script: str, args: Sequence[str] = (), *, stdin: bytes = b"") -> ByteStream:
        self.calls.append((script, tuple(args), stdin))
        kw = {"stdin": stdin} if stdin else {}
        return self.inner.stream(script, args, **kw)

    def host_key_fingerprint(self) -> str:
        return self.inner.host_key_fingerprint()

    def close(self) -> None:
        self.inner.close()


def is_private_dir(p: Path) -> bool:
    st = p.lstat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0


@contextlib.contextmanager
def watched(path: Path) -> Iterator[FifoWatch]:
    w = FifoWatch(path)
    try:
        yield w
    finally:
        w.close()
