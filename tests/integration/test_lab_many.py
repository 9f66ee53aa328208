"""lab/up --many (issue 17, item 1): a fleet of small plain QEMU guests written out as qemu
hypervisors of their own (inventory-many.yaml), each guest with its seeded markers,
captured by memdump's qemu driver like any lab QEMU VM, and stopped by lab/down --many
without touching the rest of the lab. Two 16 MiB guests; this module owns the fleet (it
resets whatever lab/up --many left and stops it at the end)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from isal import igzip

from memdump.capture import capture
from memdump.hypervisors import open_driver
from memdump.settings import Settings
from tests.helpers.lab import assert_markers, virsh
from tests.helpers.signing import trusting

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
FLEET = {"lab-many-1": ["vm-many-001"], "lab-many-2": ["vm-many-002"]}


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "lab" / args[0]), *args[1:]],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


def qemu_pids(lab_dir: Path) -> dict[str, int]:
    """Fleet guest -> the pid in its pidfile."""
    return {
        p.name.removesuffix(".pid"): int(p.read_text())
        for p in (lab_dir / "run" / "qemu-many").glob("*/*.pid")
    }


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def fleet(lab_dir: Path) -> Iterator[Path]:
    lab("up", "--many", "2:16:2")
    try:
        yield lab_dir / "inventory-many.yaml"
    finally:
        subprocess.run(
            [str(REPO / "lab" / "down"), "--many"], check=False, capture_output=True, timeout=120
        )


def test_the_fleet_is_its_inventory_and_each_guest_dumps_its_markers(
    fleet: Path, lab_dir: Path, tmp_path: Path
) -> None:
    s = trusting(Settings(inventory_file=fleet, dump_dir=tmp_path / "dumps"), tmp_path)
    assert [(h.name, h.driver) for h in s.inventory] == [(n, "qemu") for n in FLEET]
    listed = {}
    for hv in s.inventory:
        d = open_driver(hv, s.ssh)
        try:
            listed[hv.name] = sorted(ref.vmid for ref in d.list_vms())
        finally:
            d.close()
    # "all" over the file is exactly the fleet, guest i on lab-many-((i-1) % H + 1).
    assert listed == FLEET
    # QEMU dropped to QEMU's user, as lab/up --qemu's does.
    for pid in qemu_pids(lab_dir).values():
        uid = next(
            ln
            for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ln.startswith("Uid:")
        )
        assert uid.split()[2] != "0"
    hv = s.inventory[1]
    d = open_driver(hv, s.ssh)
    try:
        rec = capture(d, d.resolve("vm-many-002"), s, hv=hv).record
    finally:
        d.close()
    assert (rec.hypervisor, rec.vmid) == ("lab-many-2", "vm-many-002")
    raw = igzip.decompress(Path(rec.dump_path).read_bytes())
    assert rec.raw_size_bytes == len(raw) > 16 << 20
    assert_markers(raw, lab_dir, "vm-many-002")


def test_lab_down_many_stops_the_fleet_and_nothing_else(fleet: Path, lab_dir: Path) -> None:
    lab("up", "--many", "2:16:2")  # up whatever ran before (reused if so)
    pids = qemu_pids(lab_dir)
    assert sorted(pids) == ["vm-many-001", "vm-many-002"]
    images = Path((lab_dir / "run" / "images-dir").read_text().strip())
    assert (images / "vm-many-001").is_dir()
    domains = [n for n in (lab_dir / "run" / "domains").read_text().split() if n]
    running = [n for n in domains if virsh("domstate", n, check=False).strip() == "running"]
    others = {p: int(p.read_text()) for p in (lab_dir / "run" / "qemu").glob("*.pid")}
    others = {p: pid for p, pid in others.items() if alive(pid)}

    lab("down", "--many")

    assert not any(alive(pid) for pid in pids.values())
    assert not (lab_dir / "run" / "qemu-many").exists()
    assert not fleet.exists()
    assert not (images / "vm-many-001").exists()
    assert not (lab_dir / "vms" / "vm-many-002").exists()
    # The rest of the lab is as it was.
    assert [n for n in running if virsh("domstate", n).strip() == "running"] == running
    assert all(alive(pid) for pid in others.values())
    assert (lab_dir / "inventory.yaml").is_file()
