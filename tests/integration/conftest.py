"""Fixtures for tests against the lab (lab/up): a real sshd, libvirtd and QEMU VMs.

These tests do not skip when the lab is missing: the test command always brings it up,
so a missing lab is a failure to report, not a reason to pass.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from memdump.hypervisors import Driver, open_driver
from memdump.settings import HypervisorConfig, Settings

URI = "qemu:///system"


def virsh(*args: str, check: bool = True) -> str:
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=check, timeout=120
    ).stdout


@pytest.fixture(scope="session")
def lab_dir() -> Path:
    d = os.environ.get("MEMDUMP_LAB_DIR")
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not d or not inv or not Path(inv).is_file():
        pytest.fail("the lab is not up: run lab/up and source .lab/env (scripts/test does)")
    return Path(d)


@pytest.fixture(scope="session")
def lab_hv(lab_dir: Path) -> HypervisorConfig:
    return Settings(inventory_file=lab_dir / "inventory.yaml").inventory[0]


@pytest.fixture
def settings(lab_dir: Path, tmp_path: Path) -> Settings:
    return Settings(inventory_file=lab_dir / "inventory.yaml", dump_dir=tmp_path / "dumps")


@pytest.fixture
def driver(settings: Settings) -> Iterator[Driver]:
    d = open_driver(settings.inventory[0], settings.ssh)
    yield d
    d.close()


@pytest.fixture
def libvirt_window_driver(lab_dir: Path) -> Iterator[Driver]:
    """The lab's libvirt driver with live_userfaultfd sysctl-window: libvirt's QEMU runs as
    libvirt-qemu here, so a live capture needs the driver to open the userfaultfd window."""
    settings = Settings(inventory_file=lab_dir / "inventory.yaml")
    hv = settings.inventory[0].model_copy(update={"live_userfaultfd": "sysctl-window"})
    d = open_driver(hv, settings.ssh)
    yield d
    d.close()


def layout(lab_dir: Path, vm: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((lab_dir / "vms" / vm / "layout.json").read_text())
    return data


def remote_temp_paths() -> list[Path]:
    """The dump scripts' temp dirs on the lab hypervisor (this machine): in their root-only
    run directory (FIFO dumps) and in TMPDIR (file-staged dumps, or no run directory)."""
    from memdump.hypervisors.fifo import RUN_DIR

    bases = (Path(RUN_DIR), Path(os.environ.get("TMPDIR", "/tmp")))
    return sorted(p for base in bases for p in base.glob("memdump.*"))


def remote_temp_dirs() -> list[str]:
    return sorted(p.name for p in remote_temp_paths())


def assert_hypervisor_clean(vm: str, timeout: float = 30.0) -> None:
    """After a failed or aborted dump, paused or live: the remote temp dir is gone and the
    guest runs again (QEMU resumes it when its dump fails), no migration is active (an
    aborted live capture on QEMU 7.2 drains to its end first), background-snapshot is
    off and QEMU holds no userfaultfd write protection. All may take a moment."""
    import time

    from tests.helpers.libvirt_live import (
        ACTIVE,
        background_snapshot_on,
        migration_status,
        write_protected,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        remote_temp_dirs()
        or virsh("domstate", vm).strip() != "running"
        or migration_status(vm) in ACTIVE
    ):
        time.sleep(0.2)
    assert remote_temp_dirs() == []
    assert virsh("domstate", vm).strip() == "running"
    assert migration_status(vm) not in ACTIVE
    assert background_snapshot_on(vm) is False
    assert write_protected(vm) is False


def assert_markers(raw: bytes, lab_dir: Path, vm: str) -> None:
    """``raw`` is a whole ELF core of lab VM ``vm``: its headers declare exactly its length,
    it maps the VM's RAM, and every seeded marker sits at its guest-physical address."""
    from memdump.elfcore import parse_core

    lay = parse_core(raw)
    assert lay is not None and lay.file_size == len(raw)
    vm_layout = layout(lab_dir, vm)
    assert lay.memory_bytes >= vm_layout["memory_bytes"] - (1 << 20)
    assert len(vm_layout["markers"]) >= 8
    for marker in vm_layout["markers"]:
        off = lay.offset_of(marker["addr"])
        assert off is not None, f"marker at {marker['addr']:#x} not in any PT_LOAD"
        want = bytes.fromhex(marker["hex"])
        assert raw[off : off + len(want)] == want


@contextmanager
def extra_lab_vm(name: str, mib: int) -> Iterator[str]:
    """A lab VM of its own for one test or module (lab/up --vm), removed afterwards."""
    lab = Path(__file__).resolve().parents[2] / "lab"
    subprocess.run(
        [str(lab / "up"), "--vm", f"{name}:{mib}"], check=True, capture_output=True, timeout=300
    )
    try:
        yield name
    finally:
        subprocess.run(
            [str(lab / "down"), "--vm", name], check=False, capture_output=True, timeout=120
        )
