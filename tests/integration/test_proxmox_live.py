"""Live capture (issue 12) with the Proxmox driver on the lab's qm stand-in (lab/qm.py, NOT
Proxmox): QEMU laid out as Proxmox does (QMP socket <state>/run/qemu-server/VMID.qmp,
QEMU as root, so no userfaultfd window), reached through the lab's sshd. The guest keeps
running, the core holds its seeded markers, and a capture or an abort leaves nothing
behind; a socket served by another QEMU than the VM's is refused."""

from __future__ import annotations

import gzip
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.errors import HypervisorError
from memdump.hypervisors import open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.proxmox import ProxmoxDriver
from memdump.pipeline import DumpSource, write_dump
from memdump.settings import Settings
from tests.helpers.qmp_lab import SYSCTL, Poller, assert_clean, migration, status
from tests.integration.conftest import assert_markers, remote_temp_dirs

REPO = Path(__file__).resolve().parents[2]
VMID = "177"
VM = "qlive-pve"
HV = "lab-pve"


@pytest.fixture(scope="module")
def pve_sock(lab_dir: Path) -> Iterator[Path]:
    """VM 177 of the qm stand-in, this module's own; its QMP socket."""
    subprocess.run(
        [str(REPO / "lab/up"), "--proxmox", f"{VMID}:{VM}:256"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    try:
        yield lab_dir / "run" / "qemu-server" / f"{VMID}.qmp"
    finally:
        subprocess.run(
            [str(REPO / "lab/down"), "--vm", VM], check=False, capture_output=True, timeout=120
        )


@pytest.fixture
def pdriver(lab_dir: Path, pve_sock: Path) -> Iterator[ProxmoxDriver]:
    settings = Settings(inventory_file=lab_dir / "inventory-pve.yaml")
    # The stand-in's sockets are under the lab's state dir, not /var/run/qemu-server.
    hv = settings.hypervisor(HV).model_copy(update={"qmp_dir": str(pve_sock.parent)})
    d = open_driver(hv, settings.ssh)
    assert isinstance(d, ProxmoxDriver)
    yield d
    d.close()


def test_live_capture_of_a_running_proxmox_guest(
    pdriver: ProxmoxDriver, pve_sock: Path, lab_dir: Path, tmp_path: Path
) -> None:
    sysctl = SYSCTL.read_text().strip()
    before = remote_temp_dirs()
    poller = Poller(pve_sock)
    poller.start()
    try:
        ref = pdriver.resolve(VMID)
        src = pdriver.open_dump(ref, mode="live", spill_dir=tmp_path)
        result = write_dump(src, tmp_path, "pve.mem.gz")
    finally:
        seen = poller.stop()
    assert seen and set(seen) == {"running"}
    live = src.live  # type: ignore[attr-defined]
    assert live["userfaultfd"] == "root"  # Proxmox's QEMU runs as root: no window
    assert "userfaultfd_window_ms" not in live
    assert live["migration_status"] == "completed"
    assert isinstance(live["downtime_ms"], int)
    assert_markers(gzip.decompress(result.path.read_bytes()), lab_dir, VM)
    assert_clean(pve_sock, before, sysctl)


def test_abort_mid_capture_leaves_the_proxmox_guest_clean(
    pdriver: ProxmoxDriver, pve_sock: Path, tmp_path: Path
) -> None:
    sysctl = SYSCTL.read_text().strip()
    before = remote_temp_dirs()
    src: DumpSource = pdriver.open_dump(VMRef(HV, VMID, VM), mode="live", spill_dir=tmp_path)
    buf = memoryview(bytearray(1 << 20))
    try:
        got = 0
        while got < 8 << 20:
            got += src.readinto(buf)
        assert migration(pve_sock) == "active" and status(pve_sock) == "running"
    finally:
        src.abort()
    assert_clean(pve_sock, before, sysctl)


def test_a_socket_served_by_another_qemu_is_refused(
    pdriver: ProxmoxDriver, pve_sock: Path, lab_dir: Path
) -> None:
    """VM 177's name on the socket of another VM's QEMU (here: the socket of VM 177 is
    asked for while qm says VM 177 runs as another pid): nothing is sent to it."""
    other_pid = "1"
    pdriver._info = lambda vmid: {"status": f"status: running\npid: {other_pid}\n"}  # type: ignore[method-assign]
    with pytest.raises(HypervisorError) as ei:
        pdriver.open_dump(VMRef(HV, VMID, VM), mode="live")
    assert "runs as pid 1" in str(ei.value) and not ei.value.retryable
    assert migration(pve_sock) in ("none", "completed", "failed", "cancelled")
