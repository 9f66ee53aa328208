"""The lab gives back the disk it took: a VM removed by name (lab/down --vm) takes its RAM
images with it. A test run creates and removes dozens of VMs of up to 4 GiB each; kept,
their images filled the disk of a CI machine mid-run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers.lab import extra_lab_vm

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]


def _images(lab_dir: Path) -> Path:
    return Path((lab_dir / "run" / "images-dir").read_text().strip())


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def test_a_domain_removed_by_name_takes_its_ram_images(lab_dir: Path) -> None:
    images = _images(lab_dir)
    with extra_lab_vm("vm-disk-01", 64) as name:
        assert _size(images / name) >= 60 << 20, "lab/up wrote no RAM images?"
    assert not (images / name).exists()
    # The lab's own domains keep theirs (reused by the next lab/up).
    assert _size(images / "vm-web-01") >= 250 << 20


def test_a_plain_qemu_vm_removed_by_name_takes_its_ram_images(lab_dir: Path) -> None:
    images, name = _images(lab_dir), "vm-disk-02"
    subprocess.run(
        [str(REPO / "lab/up"), "--qemu", f"{name}:64"], check=True, capture_output=True, timeout=300
    )
    try:
        assert _size(images / name) >= 60 << 20
    finally:
        down = subprocess.run(
            [str(REPO / "lab/down"), "--vm", name], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert not (images / name).exists()
