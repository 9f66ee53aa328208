"""Disk full, on a real (small) tmpfs as the dump directory: the preflight refuses before
the guest is paused; with the preflight off, ENOSPC mid-write fails the capture, leaves no
partial file, and the guest runs on."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.capture import capture
from memdump.errors import InsufficientSpaceError, StorageError
from memdump.hypervisors import open_driver
from memdump.settings import Settings
from tests.helpers.lab import assert_hypervisor_clean, virsh

pytestmark = pytest.mark.lab


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_preflight_refuses(small_disk: Path, settings: Settings) -> None:
    s = settings.model_copy(update={"dump_dir": small_disk / "dumps"})
    drv = open_driver(s.inventory[0], s.ssh)
    with pytest.raises(InsufficientSpaceError) as ei:
        capture(drv, drv.resolve("vm-web-01"), s)
    assert ei.value.fields["free_bytes"] < ei.value.fields["needed_bytes"]
    assert list((small_disk / "dumps").iterdir()) == []
    assert_hypervisor_clean("vm-web-01")  # never paused, nothing started remotely
    assert "None" in virsh("domjobinfo", "vm-web-01")


def test_enospc_mid_write_leaves_nothing(small_disk: Path, settings: Settings) -> None:
    s = settings.model_copy(update={"dump_dir": small_disk / "dumps", "disk_space_margin": 0})
    drv = open_driver(s.inventory[0], s.ssh)
    with pytest.raises(StorageError) as ei:
        capture(drv, drv.resolve("vm-web-01"), s)
    assert "no space" in str(ei.value)
    assert list((small_disk / "dumps").iterdir()) == []  # no .part, no .mem.gz
    assert_hypervisor_clean("vm-web-01")
    # The disk is usable again at once: nothing was left behind to fill it.
    (small_disk / "probe").write_bytes(b"x" * (16 << 20))
