"""The SSH transport against the lab's real sshd: host keys, cut connections, re-keys."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from memdump.capture import capture
from memdump.errors import HostKeyError, ShortDumpError, StreamInterruptedError
from memdump.hypervisors import open_driver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.ssh import SSHTransport
from tests.helpers.lab import assert_hypervisor_clean

pytestmark = pytest.mark.lab


def _with_known_hosts(hv: HypervisorConfig, path: Path) -> HypervisorConfig:
    return hv.model_copy(update={"known_hosts": path})


def test_wrong_host_key_is_refused(lab_hv: HypervisorConfig, tmp_path: Path) -> None:
    # known_hosts names the lab host with another ed25519 key: a man in the middle.
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    host = lab_hv.known_hosts.read_text().split()[0]  # type: ignore[union-attr]
    kh = tmp_path / "known_hosts"
    kh.write_text(
        f"{host} {(tmp_path / 'k.pub').read_text().split()[0]} "
        f"{(tmp_path / 'k.pub').read_text().split()[1]}\n"
    )
    t = SSHTransport(_with_known_hosts(lab_hv, kh), Settings().ssh)
    t0 = time.monotonic()
    with pytest.raises(HostKeyError) as ei:
        t.run("true")
    assert "mismatch" in str(ei.value)
    assert not ei.value.retryable and time.monotonic() - t0 < 15


def test_unknown_host_is_refused(lab_hv: HypervisorConfig, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    with pytest.raises(HostKeyError) as ei:
        SSHTransport(_with_known_hosts(lab_hv, kh), Settings().ssh).run("true")
    assert "not in known_hosts" in str(ei.value) and ei.value.fields["fingerprint"]
    assert kh.read_text() == ""  # nothing was added


def test_lab_sessions_do_not_run_the_machines_root_bashrc(lab_hv: HypervisorConfig) -> None:
    # lab/up: the sessions' HOME is the lab's own (sshd_config SetEnv), so bash does not
    # read this machine's root ~/.bashrc (pyenv init: ~110 ms a session, pyenv's python3
    # first in PATH); a hypervisor's root has none of it.
    home = Path(subprocess.run(["getent", "passwd", "root"], capture_output=True, text=True,
                               check=True).stdout.split(":")[5])  # fmt: skip
    t = SSHTransport(lab_hv, Settings().ssh)
    try:
        seen = t.run('echo "$HOME"; echo "$PATH"; ls -A "$HOME"')
    finally:
        t.close()
    assert seen.returncode == 0
    session_home, path, *listed = seen.stdout.decode().splitlines()
    assert Path(session_home) != home and listed == [], seen.stdout  # an empty home of its own
    assert str(home) not in path, path  # nothing the machine's rc put in PATH


def _lab_sshd_children(lab_dir: Path) -> list[int]:
    master = int((lab_dir / "ssh" / "sshd.pid").read_text().split()[0])
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            kids.append(int(stat_file.parent.name))
    return kids


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_connection_cut_mid_stream_leaves_nothing(
    settings: Settings, lab_dir: Path, client: str
) -> None:
    tuning = settings.ssh.model_copy(update={"stream_client": client})
    drv = open_driver(settings.inventory[0], tuning)
    ref = drv.resolve("vm-web-01")
    killed: list[int] = []

    def cut(done: int, total: int | None) -> None:
        if done and not killed:
            for pid in _lab_sshd_children(lab_dir):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    t0 = time.monotonic()
    with pytest.raises((StreamInterruptedError, ShortDumpError)):
        capture(drv, ref, settings, progress=cut)
    assert killed and time.monotonic() - t0 < 60
    assert not settings.dump_dir.exists() or list(settings.dump_dir.iterdir()) == []
    # On the hypervisor the dump fails on a broken pipe: temp files go, the guest runs again.
    assert_hypervisor_clean("vm-web-01")


class _Source:
    def __init__(self, stream: object) -> None:
        self.s = stream

    def readinto(self, view: memoryview) -> int:
        return self.s.readinto(view)  # type: ignore[attr-defined, no-any-return]

    def close_ok(self) -> None:
        assert self.s.finish(60).returncode == 0  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.s.abort()  # type: ignore[attr-defined]


def test_stream_of_exactly_two_rekey_intervals(lab_hv: HypervisorConfig, tmp_path: Path) -> None:
    # paramiko's default re-key interval is 512 MiB; a re-key at the very end of a stream
    # hung recv() in earlier measurements. 2 x 512 MiB must stream cleanly and promptly.
    size = 2 * 512 * 1024 * 1024
    t = SSHTransport(lab_hv, Settings().ssh.model_copy(update={"stream_client": "paramiko"}))
    t0 = time.monotonic()
    stream = t.stream('head -c "$1" /dev/zero', [str(size)])
    packetizer = t._connected().get_transport().packetizer  # type: ignore[union-attr]
    assert packetizer.REKEY_BYTES >= 2**36
    res = write_dump(_Source(stream), tmp_path, "zeros.gz", expected_size=lambda _: size)
    assert res.raw_bytes == size
    zeros, mib = hashlib.sha256(), bytes(1 << 20)
    for _ in range(size >> 20):
        zeros.update(mib)
    assert res.raw_sha256 == zeros.hexdigest()
    assert time.monotonic() - t0 < 60
    t.close()


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_stream_host_key_mismatch_is_refused(
    lab_hv: HypervisorConfig, tmp_path: Path, client: str
) -> None:
    # Both stream clients check the same known_hosts; a changed key is never accepted.
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    host = lab_hv.known_hosts.read_text().split()[0]  # type: ignore[union-attr]
    pub = (tmp_path / "k.pub").read_text().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{host} {pub[0]} {pub[1]}\n")
    tuning = Settings().ssh.model_copy(update={"stream_client": client})
    t = SSHTransport(_with_known_hosts(lab_hv, kh), tuning)
    with pytest.raises(HostKeyError):
        stream = t.stream("echo secret")
        assert stream.read() == b""
        stream.finish(30)
