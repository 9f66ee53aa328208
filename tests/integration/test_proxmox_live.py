"""Live capture (issue 12) with the Proxmox driver on the lab's qm stand-in (lab/qm.py, NOT
Proxmox): QEMU laid out as Proxmox does (QMP socket <state>/run/qemu-server/VMID.qmp,
QEMU as root, so no userfaultfd window), reached through the lab's sshd. The guest keeps
running, the core holds its seeded markers, and a capture or an abort leaves nothing
behind; a socket served by another QEMU than the VM's is refused; for 256 MiB and 1 GiB
guests the live core equals the driver's paused dump in every PT_LOAD."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from isal import igzip

from memdump.errors import HypervisorError
from memdump.hypervisors import open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.proxmox import ProxmoxDriver
from memdump.pipeline import DumpSource, write_dump
from memdump.settings import Settings
from tests.helpers.elf_compare import (
    assert_same_lab_guest,
    compare_source_with_file,
    lab_markers,
    save_source,
)
from tests.helpers.lab import assert_markers, layout, remote_temp_dirs
from tests.helpers.qmp_lab import SYSCTL, Poller, assert_clean, migration, status

pytestmark = pytest.mark.lab

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


# This module's own larger VMs of the stand-in (bx-: names no other test uses): 1 GiB
# seeded as the lab seeds every guest, 4 GiB (RAM above the PCI hole) zero but for the
# markers (lab/up's sparse kind), which costs about what a small guest does (the seeded
# 4 GiB stand-in VM cost this module 67 s of CI's 30 minutes).
BIG = {1024: ("178", "bx-pve-1g", ""), 4096: ("179", "bx-pve-4g", ":sparse")}


@pytest.fixture(scope="module", params=[256, 1024, 4096], ids=["256M", "1G", "4G-sparse"])
def sized_vm(request: pytest.FixtureRequest, pve_sock: Path) -> Iterator[tuple[str, str, Path]]:
    """(vmid, name, QMP socket) of a 256 MiB (this module's VM 177), a 1 GiB and a 4 GiB
    stand-in VM. The larger ones are started here and each removed once its tests are done,
    so no test of another module (captures of "all" VMs) ever sees it."""
    mib: int = request.param
    if mib == 256:
        yield VMID, VM, pve_sock
        return
    vmid, name, kind = BIG[mib]
    subprocess.run(
        [str(REPO / "lab/up"), "--proxmox", f"{vmid}:{name}:{mib}{kind}"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    try:
        yield vmid, name, pve_sock.parent / f"{vmid}.qmp"
    finally:
        subprocess.run(
            [str(REPO / "lab/down"), "--vm", name], check=False, capture_output=True, timeout=120
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
    assert_markers(igzip.decompress(result.path.read_bytes()), lab_dir, VM)
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


def test_live_elf_equals_the_paused_dump_in_every_pt_load(
    sized_vm: tuple[str, str, Path], pdriver: ProxmoxDriver, lab_dir: Path, tmp_path: Path
) -> None:
    """Issue 12 item 5 on the proxmox stand-in, 256 MiB, 1 GiB and 4 GiB (RAM above the PCI
    hole; zero but for the markers): the live core equals the
    paused dump of the same guest in every PT_LOAD, byte for byte. The reference is the
    driver's own paused capture: ``qm monitor VMID`` with HMP ``dump-guest-memory`` (paging
    off, ELF), which is Proxmox's way to a paused memory dump (Proxmox has no ``virsh
    dump``; ``qm monitor`` is its interface to the VM's monitor) and the capture memdump
    makes there with capture_mode paused, so this also shows that switching the mode changes
    no byte of guest memory. It is the same QEMU command ``virsh dump --memory-only --format
    elf`` issues. The live core comes from the driver through the VM's QMP socket
    (background snapshot), a different path to the same QEMU. Compared as the libvirt and
    plain-QEMU tests do (streamed, never a whole core in memory): the same ELF header bar
    e_ehsize (QEMU 7.2 writes 8), the same PT_LOAD headers but p_offset (the live core lays
    data out in QEMU's sweep order), the seeded markers in both. The notes differ: QEMU's
    hold the vCPU's registers (NT_PRSTATUS and its CPU state), which a live core cannot have
    (the guest runs on through the snapshot instant); it carries a MEMDUMP note of its own
    saying so. The paused dump comes first (the guest is quiescent: the order does not
    matter) so that the live one can be compared as it arrives."""
    vmid, name, sock = sized_vm
    sysctl = SYSCTL.read_text().strip()
    before = remote_temp_dirs()
    lay = layout(lab_dir, name)
    grab = {a: len(b) for a, b in lab_markers(lay).items()}
    ref = VMRef(HV, vmid, name)
    reference = tmp_path / "paused.elf"
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    try:
        save_source(pdriver.open_dump(ref, mode="paused"), reference)
        assert status(sock) == "running"
        src = pdriver.open_dump(ref, mode="live", spill_dir=spill)
        live, paused = compare_source_with_file(src, reference, grab)
    finally:
        reference.unlink(missing_ok=True)  # gone as soon as compared
    assert_clean(sock, before, sysctl)
    assert list(spill.iterdir()) == []
    assert_same_lab_guest(live, paused, lay)
