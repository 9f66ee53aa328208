"""Issue 11 item 4 against the lab (its sshd, libvirtd and QEMU; this machine is the
hypervisor, the scripts run there as root): a local user's planted dump directory with
the right token, a ``cancel`` symlink to a file and a symlinked FIFO are left alone by an
abort and by the start-up clean-up, the file's bytes unchanged; the token is on no
command line while a dump runs; the clean-up looks in the root-only run directory."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from memdump.hypervisors import Driver, open_driver
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.local import LocalTransport
from memdump.transport.ssh import SSHTransport
from tests.helpers.hv_tempdirs import (
    NOBODY,
    TARGET_BYTES,
    TOKEN,
    make_target,
    plant,
    state,
    token_in_cmdlines,
    watched,
)
from tests.helpers.lab import assert_hypervisor_clean, virsh

pytestmark = pytest.mark.lab

VM = "vm-web-01"
RUN_DIR = "/run/memdump"  # memdump.hypervisors.fifo.RUN_DIR (tests/unit/test_hv_tempdirs.py)


@pytest.fixture
def fixed_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every dump's token is TOKEN: the one a local user read from /proc (old code)."""
    monkeypatch.setattr(secrets, "token_hex", lambda n=32: TOKEN)
    return TOKEN


def _only(d: Path, keep: Path, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) != [keep] and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(d.iterdir())


def test_staged_abort_over_ssh_leaves_a_planted_dir_alone(
    settings: Settings, fixed_token: str, tmp_path: Path
) -> None:
    # The staged dump's base is a shared, sticky, world-writable dir (as /tmp is), where a
    # local user planted memdump.0000000000 with the token and cancel -> a disk image.
    stage = tmp_path / "stage"
    stage.mkdir()
    stage.chmod(0o1777)
    target = make_target(tmp_path)
    hv = settings.inventory[0].model_copy(update={"staging_dir": str(stage)})
    drv = open_driver(hv, settings.ssh)
    assert isinstance(drv, LibvirtDriver)
    try:
        with watched(tmp_path / "victim.fifo") as victim:
            planted = plant(stage, target, victim.path)
            kept = state(planted)
            src = drv.open_dump(drv.resolve(VM), staging="file")
            src.abort()
            assert _only(stage, planted) == [planted]  # the real dump's dir went
            assert not victim.touched()
    finally:
        drv.close()
    assert target.read_bytes() == TARGET_BYTES and state(planted) == kept
    assert_hypervisor_clean(VM)
    assert "None" in virsh("domjobinfo", VM)


@pytest.mark.parametrize("staging", ["fifo", "file"])
def test_the_token_is_on_no_command_line_during_a_dump(
    driver: Driver, settings: Settings, fixed_token: str, staging: str
) -> None:
    # Read /proc/*/cmdline of every process of the hypervisor (and of the collector: the
    # OpenSSH client's argv carries the remote command line) while the dump script runs.
    assert isinstance(driver, LibvirtDriver)
    src = driver.open_dump(driver.resolve(VM), staging=staging)  # type: ignore[arg-type]
    try:
        seen = [token_in_cmdlines(TOKEN)]  # the script runs (it named its directory)
        assert src.readinto(memoryview(bytearray(1 << 20))) > 0
        seen.append(token_in_cmdlines(TOKEN))  # streaming
    finally:
        src.abort()
    assert_hypervisor_clean(VM)
    assert seen == [[], []]


def test_clean_up_over_ssh_takes_stale_dirs_of_the_run_dir_only_if_ours(
    driver: Driver, tmp_path: Path
) -> None:
    run = Path(RUN_DIR)
    run.mkdir(mode=0o700, exist_ok=True)
    old = time.time() - 3600
    target = make_target(tmp_path)
    made: list[Path] = []
    try:
        # A dump script's dir left by a SIGKILL: root's, 0700, lock free, an hour old.
        stale = run / f"memdump.{secrets.token_hex(5)}"
        stale.mkdir(mode=0o700)
        made.append(stale)
        (stale / "lock").touch()
        os.mkfifo(stale / "mem", 0o600)
        os.utime(stale, (old, old))
        with watched(tmp_path / "victim.fifo") as victim:
            # Not ours: another user's (with the token and the symlinks), and root's but
            # writable by others; both an hour old, their lock free.
            planted = plant(run, target, victim.path, name=f"memdump.{secrets.token_hex(5)}")
            made.append(planted)
            (planted / "lock").touch()
            os.lchown(planted / "lock", NOBODY, NOBODY)
            loose = run / f"memdump.{secrets.token_hex(5)}"
            loose.mkdir()
            made.append(loose)
            loose.chmod(0o777)
            os.symlink(target, loose / "cancel")
            for d in (planted, loose):
                os.utime(d, (old, old))
            kept = state(planted), state(loose)

            removed = driver.clean_stale(60)

            assert not victim.touched()
        assert str(stale) in removed and not stale.exists()
        assert str(planted) not in removed and str(loose) not in removed
        assert (state(planted), state(loose)) == kept
        assert target.read_bytes() == TARGET_BYTES
    finally:
        for d in made:
            if d.exists():
                for p in d.iterdir():
                    p.unlink()
                d.rmdir()


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_stdin_reaches_the_remote_script_on_every_path(
    lab_hv: HypervisorConfig, client: str
) -> None:
    # How a secret reaches a script: run() (paramiko) and stream() (either client), and
    # the local transport; the script's args and text never hold it.
    script = 'IFS= read -r x; [ "$x" = "$1" ] && printf "got %s\\n" "$(printf %s "$x" | wc -c)"'
    tuning = Settings().ssh.model_copy(update={"stream_client": client})
    for t in (SSHTransport(lab_hv, tuning), LocalTransport()):
        try:
            res = t.run(script, (TOKEN,), stdin=f"{TOKEN}\n".encode())
            assert (res.returncode, res.stdout) == (0, b"got 32\n")
            s = t.stream(script, (TOKEN,), stdin=f"{TOKEN}\n".encode())
            assert s.read() == b"got 32\n" and s.read() == b""
            assert s.finish(30).returncode == 0
            assert t.run(script, (TOKEN,)).returncode == 1  # nothing on stdin: EOF
        finally:
            t.close()
