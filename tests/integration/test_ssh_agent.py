"""No agent forwarding, on either SSH path, even with an agent running and the lab's
sshd allowing forwarding (its default). A plain `ssh -A` to the same sshd is the control
that shows the check can see a forwarded agent."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.settings import HypervisorConfig, SSHTuning
from memdump.transport.ssh import SSHTransport

pytestmark = pytest.mark.lab

PROBE = 'echo "agent=${SSH_AUTH_SOCK:-none}"'


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_control_sees_a_forwarded_agent(agent: str, lab_hv: HypervisorConfig) -> None:
    out = subprocess.run(
        ["ssh", "-F", "/dev/null", "-A", "-T", "-i", str(lab_hv.key_file), "-p", str(lab_hv.port),
         "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={lab_hv.known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-l", lab_hv.user, lab_hv.host, PROBE],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "agent=none" not in out and "agent=/" in out


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_memdump_never_forwards_the_agent(
    agent: str, lab_hv: HypervisorConfig, client: str
) -> None:
    t = SSHTransport(lab_hv, SSHTuning(stream_client=client))  # type: ignore[arg-type]
    try:
        assert t.run(PROBE).stdout.decode().strip() == "agent=none"
        s = t.stream(PROBE)
        out = b""
        while chunk := s.read():
            out += chunk
        assert out.decode().strip() == "agent=none"
        assert s.finish(timeout=30).returncode == 0
    finally:
        t.close()
    assert os.environ["SSH_AUTH_SOCK"] == agent
