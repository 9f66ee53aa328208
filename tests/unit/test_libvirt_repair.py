"""The libvirt driver's repair after live scripts killed outright (sh/libvirt/live-repair.sh),
run here with a real dash over a fake virsh: a dead script's directory is repaired (QEMU's
max-bandwidth put back, background-snapshot off, the fd closed) and removed; a directory
whose script still holds its lock, or that is no live script's, is left alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from memdump.hypervisors import libvirt as lv

DOM = "vm-live-01"
FAKE_VIRSH = r"""#!/bin/sh
# virsh -c URI CMD DOM [ARG]: logs CMD and ARG, answers as QEMU would after a migration.
printf '%s %s\n' "$3" "$5" >>"$FAKE_LOG"
case $3 in
  domjobinfo) echo "Job type:         None" ;;
  qemu-monitor-command)
    case $5 in
      *query-migrate-parameters*) echo '{"return":{"max-bandwidth":134217728,"x":1}}' ;;
      *query-migrate*) echo '{"return":{"status":"completed"}}' ;;
      *) echo '{"return":{}}' ;;
    esac ;;
esac
"""


def _dir(run: Path, name: str, live: bool = True) -> Path:
    d = run / name
    d.mkdir(mode=0o700)
    (d / "lock").touch()
    if live:
        (d / "live").write_text(f"{DOM}\n")
        (d / "bandwidth").write_text("1000 134217728\n")
    return d


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    virsh = bin_dir / "virsh"
    virsh.write_text(FAKE_VIRSH)
    virsh.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MEMDUMP_RUN_DIR": str(run),
        "FAKE_LOG": str(tmp_path / "log"),
    }


def test_a_killed_live_scripts_directory_is_repaired_and_removed(env: dict[str, str]) -> None:
    run = Path(env["MEMDUMP_RUN_DIR"])
    dead = _dir(run, "memdump.DeadScr1pt")
    held = _dir(run, "memdump.HeldScr1pt")
    other = _dir(run, "memdump.NotLive001", live=False)
    holder = subprocess.Popen(["flock", "-x", str(held / "lock"), "sleep", "60"])
    try:
        while subprocess.run(["flock", "-n", str(held / "lock"), "true"]).returncode == 0:
            pass  # until the holder has it
        res = subprocess.run(
            ["sh", "-c", lv._LIVE_REPAIR, "sh", "qemu:///system"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"live-repaired {DOM}", str(dead)]
    assert not dead.exists()
    assert sorted(p.name for p in held.iterdir()) == ["bandwidth", "live", "lock"]
    assert other.exists()
    calls = Path(env["FAKE_LOG"]).read_text().splitlines()
    assert calls[0] == "domjobinfo "
    assert calls[-3:] == [
        'qemu-monitor-command {"execute":"migrate-set-parameters",'
        '"arguments":{"max-bandwidth":1000}}',
        'qemu-monitor-command {"execute":"migrate-set-capabilities","arguments":'
        '{"capabilities":[{"capability":"background-snapshot","state":false}]}}',
        'qemu-monitor-command {"execute":"closefd","arguments":{"fdname":"memdump"}}',
    ]
