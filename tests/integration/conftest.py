"""Fixtures for tests against the lab (lab/up): a real sshd, libvirtd and QEMU VMs.

These tests do not skip when the lab is missing: the test command always brings it up,
so a missing lab is a failure to report, not a reason to pass. ``lab_dir`` and
``settings`` are in tests/conftest.py (tests/faults use them too); the plain helpers
(virsh, layout, assert_hypervisor_clean, extra_lab_vm...) are in tests/helpers/lab.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.hypervisors import Driver, open_driver
from memdump.settings import HypervisorConfig, Settings


@pytest.fixture(scope="session")
def lab_hv(lab_dir: Path) -> HypervisorConfig:
    return Settings(inventory_file=lab_dir / "inventory.yaml").inventory[0]


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
