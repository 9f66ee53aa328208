"""Issue 11 item 6 against the lab's real sshd: a command that floods stdout or stderr is
stopped at the cap, one that trickles forever at its deadline, and the remote processes
are gone afterwards (the lab's sshd runs on this machine, so /proc shows them)."""

from __future__ import annotations

import pytest

from memdump.errors import CommandTimeoutError, OutputTooLargeError
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.ssh import SSHTransport
from tests.helpers.runaway import FLOOD_STDERR, FLOOD_STDOUT, TRICKLE, marker, wait_gone

pytestmark = pytest.mark.lab

CAP_OUT, CAP_ERR = 1 << 20, 64 * 1024


def _transport(lab_hv: HypervisorConfig) -> SSHTransport:
    tuning = Settings().ssh.model_copy(
        update={"run_max_stdout_bytes": CAP_OUT, "run_max_stderr_bytes": CAP_ERR}
    )
    return SSHTransport(lab_hv, tuning)


@pytest.mark.parametrize(
    ("script", "stream", "cap"),
    [(FLOOD_STDOUT, "stdout", CAP_OUT), (FLOOD_STDERR, "stderr", CAP_ERR)],
)
def test_flood_is_stopped_at_the_cap(
    lab_hv: HypervisorConfig, script: str, stream: str, cap: int
) -> None:
    t = _transport(lab_hv)
    mark = marker()
    try:
        with pytest.raises(OutputTooLargeError) as ei:
            t.run(script, [mark], timeout=60)
        assert ei.value.fields == {"host": lab_hv.host, "op": "run", "stream": stream, "limit": cap}
        assert not ei.value.retryable
        assert wait_gone(mark) == []
        # The connection is still good for the next command.
        assert t.run('printf %s "$1"', ["ok"]).stdout == b"ok"
    finally:
        t.close()


def test_trickle_is_stopped_at_the_deadline(lab_hv: HypervisorConfig) -> None:
    t = _transport(lab_hv)
    mark = marker()
    try:
        with pytest.raises(CommandTimeoutError) as ei:
            t.run(TRICKLE, [mark], timeout=1)
        assert ei.value.fields == {"host": lab_hv.host, "op": "run", "timeout": 1}
        assert wait_gone(mark) == []
    finally:
        t.close()
