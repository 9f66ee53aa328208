"""Checks of a libvirt lab domain after a live capture (issue 12), however it ended: no
migration active, background-snapshot off, no userfaultfd write protection left in QEMU,
the guest running, no live script directory, the userfaultfd sysctl and the window's and
the domain's locks as they were. Used by the libvirt live tests and the fault suite."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from memdump.hypervisors.fifo import RUN_DIR
from tests.helpers.lab import remote_temp_paths, virsh

SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
ACTIVE = ("setup", "active", "device", "pre-switchover", "cancelling", "wait-unplug")


def qmp(vm: str, execute: str) -> object:
    return json.loads(virsh("qemu-monitor-command", vm, json.dumps({"execute": execute})))["return"]


def migration_status(vm: str) -> str:
    ret = qmp(vm, "query-migrate")
    assert isinstance(ret, dict)
    return str(ret.get("status", "none"))


def background_snapshot_on(vm: str) -> bool:
    caps = qmp(vm, "query-migrate-capabilities")
    assert isinstance(caps, list)
    (bg,) = [c for c in caps if c["capability"] == "background-snapshot"]
    return bool(bg["state"])


def qemu_pid(vm: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm}.pid").read_text().strip())


def write_protected(vm: str) -> bool:
    """QEMU still has memory registered for userfaultfd write protection (VmFlags "uw")
    or holds a userfaultfd: nobody would serve the guest's write faults any more."""
    pid = qemu_pid(vm)
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    if any(ln.startswith("VmFlags:") and " uw" in f"{ln} " for ln in smaps.splitlines()):
        return True
    fds = Path(f"/proc/{pid}/fd")
    return any("userfaultfd" in os.readlink(fds / f) for f in os.listdir(fds))


def live_dirs(vm: str) -> list[Path]:
    """Remote temp dirs of live scripts for ``vm`` (other helpers' dumps may run at the
    same time on the lab: theirs are not ours to judge)."""
    out = []
    for p in remote_temp_paths():
        try:
            if (p / "live").read_text().strip() == vm:
                out.append(p)
        except OSError:
            continue
    return out


def lock_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def assert_live_clean(vm: str, sysctl_before: str, directory: str | None = None) -> None:
    """After a live capture, however it ended. An aborted one on QEMU 7.2 drains its
    migration to the end first (seconds for 256 MiB): wait for that, bounded."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        migration_status(vm) in ACTIVE
        or live_dirs(vm)
        or (directory is not None and Path(directory).exists())
    ):
        time.sleep(0.2)
    assert migration_status(vm) not in ACTIVE
    assert live_dirs(vm) == []
    assert directory is None or not Path(directory).exists()
    assert virsh("domstate", vm).strip() == "running"
    assert background_snapshot_on(vm) is False
    assert write_protected(vm) is False
    assert SYSCTL.read_text().strip() == sysctl_before
    run = Path(os.environ.get("MEMDUMP_RUN_DIR", RUN_DIR))
    assert not (run / "userfaultfd.restore").exists()
    assert lock_free(run / "userfaultfd.lock")
    assert lock_free(run / f"live.{vm}.lock")


def guest_thp(vm: str) -> tuple[int, int] | None:
    """(KiB on transparent huge pages, KiB resident) of the lab domain's guest RAM right
    now (qemu_thp of its QEMU). None: not readable (no pid file, not root)."""
    try:
        return qemu_thp(qemu_pid(vm))
    except (OSError, ValueError):
        return None


def qemu_thp(pid: int) -> tuple[int, int]:
    """(KiB on transparent huge pages, KiB resident) of a QEMU's guest RAM: its mappings
    QEMU madvised for huge pages (VmFlags "hg"). A live capture's pause grows with the
    page-table entries QEMU write-protects while the vCPUs are stopped; its background
    snapshot releases the protection 4 KiB at a time, which splits the huge pages
    (live_restore_huge_pages puts them back)."""
    huge_total, rss_total, huge, rss = 0, 0, 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
        elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            huge_total += huge
            rss_total += rss
    return huge_total, rss_total
