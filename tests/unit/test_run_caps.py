"""Issue 11 item 6: run() caps stdout/stderr and keeps its deadline even while data keeps
coming, for the local transport (real processes) and the SSH transport's loop (a channel
that is never idle)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from memdump.errors import CommandTimeoutError, OutputTooLargeError
from memdump.settings import HypervisorConfig, SSHTuning
from memdump.transport.local import LocalTransport
from memdump.transport.process import STDERR_TAIL
from memdump.transport.ssh import SSHTransport
from tests.helpers.runaway import FLOOD_STDERR, FLOOD_STDOUT, TRICKLE, marker, wait_gone

CAP_OUT, CAP_ERR = 256 * 1024, 16 * 1024


def _local() -> LocalTransport:
    return LocalTransport(max_stdout=CAP_OUT, max_stderr=CAP_ERR)


@pytest.mark.parametrize(
    ("script", "stream", "cap"),
    [(FLOOD_STDOUT, "stdout", CAP_OUT), (FLOOD_STDERR, "stderr", CAP_ERR)],
)
def test_local_flood_stops_at_the_cap(script: str, stream: str, cap: int) -> None:
    mark = marker()
    with pytest.raises(OutputTooLargeError) as ei:
        _local().run(script, [mark], timeout=60)
    assert ei.value.fields == {"host": "local", "op": "run", "stream": stream, "limit": cap}
    assert not ei.value.retryable
    assert wait_gone(mark) == []


def test_local_output_up_to_the_cap_is_kept() -> None:
    res = _local().run(
        'head -c "$1" /dev/zero; head -c "$2" /dev/zero >&2', [str(CAP_OUT), str(CAP_ERR)]
    )
    assert (len(res.stdout), len(res.stderr), res.returncode) == (CAP_OUT, CAP_ERR, 0)


def test_local_trickle_stops_at_the_deadline() -> None:
    mark = marker()
    with pytest.raises(CommandTimeoutError) as ei:
        _local().run(TRICKLE, [mark], timeout=1)
    assert ei.value.fields["timeout"] == 1 and not ei.value.retryable
    assert wait_gone(mark) == []


def test_local_default_caps_come_from_the_settings() -> None:
    from memdump.transport import open_transport

    tuning = SSHTuning(run_max_stdout_bytes=100_000, run_max_stderr_bytes=5_000)
    t = open_transport(HypervisorConfig(name="here", transport="local"), tuning)
    with pytest.raises(OutputTooLargeError) as ei:
        t.run("head -c 100001 /dev/zero")
    assert ei.value.fields["limit"] == 100_000
    assert SSHTuning().run_max_stdout_bytes == 16 << 20
    assert SSHTuning().run_max_stderr_bytes == 1 << 20


class _NeverIdleChannel:
    """A channel whose peer writes without pause: there is always a byte ready."""

    closed = False
    remote_chanid = 0
    transport = None

    def __init__(self) -> None:
        self.status_event = threading.Event()
        self.reads = 0

    def recv_ready(self) -> bool:
        return True

    def recv(self, n: int) -> bytes:
        self.reads += 1
        if self.reads > 100_000:  # the old loop never looked at the clock: stop it here
            raise RuntimeError("deadline never checked while data kept coming")
        return b"x"

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def _ssh(tmp_path: Path, tuning: SSHTuning) -> SSHTransport:
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    hv = HypervisorConfig(name="hv", host="hv.invalid", key_file=tmp_path / "k", known_hosts=kh)
    return SSHTransport(hv, tuning)


def test_ssh_deadline_is_checked_while_data_keeps_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake clock that moves 1 ms per look: the deadline (1 s) falls after ~1000 turns,
    # each of which found a byte ready.
    now = [0.0]

    def monotonic() -> float:
        now[0] += 0.001
        return now[0]

    monkeypatch.setattr("memdump.transport.ssh.time", SimpleNamespace(monotonic=monotonic))
    t = _ssh(tmp_path, SSHTuning())
    chan = _NeverIdleChannel()
    monkeypatch.setattr(t, "_open_channel", lambda *_args: chan)
    with pytest.raises(CommandTimeoutError) as ei:
        t.run("yes", timeout=1.0)
    assert ei.value.fields == {"host": "hv.invalid", "op": "run", "timeout": 1.0}
    assert chan.reads < 2000 and chan.closed


def test_ssh_cap_holds_at_most_one_byte_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _ssh(tmp_path, SSHTuning(run_max_stdout_bytes=64 * 1024))
    chan = _NeverIdleChannel()
    asked: list[int] = []

    def recv(n: int) -> bytes:
        asked.append(n)
        return b"y" * n

    monkeypatch.setattr(chan, "recv", recv)
    monkeypatch.setattr(t, "_open_channel", lambda *_args: chan)
    with pytest.raises(OutputTooLargeError) as ei:
        t.run("yes", timeout=60)
    assert ei.value.fields == {
        "host": "hv.invalid",
        "op": "run",
        "stream": "stdout",
        "limit": 65536,
    }
    assert sum(asked) == 65537 and chan.closed


def test_stream_keeps_only_the_tail_of_a_flooded_stderr() -> None:
    # 20 MiB of stderr beside the stream, then the line that matters: only the last
    # STDERR_TAIL bytes are read back into memory.
    s = LocalTransport().stream(
        'head -c 20971520 /dev/zero >&2; printf data; echo "$1" >&2', ["last line"]
    )
    out = b""
    while chunk := s.read():
        out += chunk
    res = s.finish(30)
    assert out == b"data" and res.returncode == 0
    assert len(res.stderr) == STDERR_TAIL and res.stderr.endswith(b"last line\n")
