"""The lab (lab/up) as tests see it: virsh on its libvirtd, its VMs' seeded layouts, the
dump scripts' temp dirs on its hypervisor (this machine), the checks that a failed or
aborted dump left the hypervisor clean, and extra VMs of a test's own."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

URI = "qemu:///system"

# scripts/test runs the tests not marked ``lab`` in a lane of their own, beside the lab's,
# with the lab's variables unset and this one set: a test that reaches for the lab there
# is a test missing its marker.
NO_LAB_LANE = "MEMDUMP_TEST_NO_LAB"

# The lab lane collects only these directories (its start-up is 10 s shorter than
# collecting every one); the lane without the lab collects all and refuses a lab-marked
# test elsewhere (stray_lab_tests), which neither lane would run.
LAB_TEST_DIRS = ("tests/e2e", "tests/faults", "tests/flows", "tests/integration")


def stray_lab_tests(items: Iterable[Any]) -> list[str]:
    """The node ids of pytest ``items`` marked ``lab`` outside LAB_TEST_DIRS."""
    inside = tuple(f"{d}/" for d in LAB_TEST_DIRS)
    return [
        i.nodeid
        for i in items
        if i.get_closest_marker("lab") is not None and not i.nodeid.startswith(inside)
    ]


def lab_missing() -> NoReturn:
    """Fail the test that needs the lab when there is none, saying which of the two it is."""
    import pytest

    if os.environ.get(NO_LAB_LANE):
        pytest.fail(
            "this test uses the lab but its module is not marked: add "
            "`pytestmark = pytest.mark.lab` (scripts/test runs unmarked tests without the lab)"
        )
    pytest.fail("the lab is not up: run lab/up and source .lab/env (scripts/test does)")


def virsh(*args: str, check: bool = True) -> str:
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=check, timeout=120
    ).stdout


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
def extra_lab_vm(name: str, mib: int, kind: str = "") -> Iterator[str]:
    """A lab VM of its own for one test or module (lab/up --vm NAME:MIB[:KIND]), removed
    afterwards."""
    lab = Path(__file__).resolve().parents[2] / "lab"
    spec = f"{name}:{mib}" + (f":{kind}" if kind else "")
    subprocess.run([str(lab / "up"), "--vm", spec], check=True, capture_output=True, timeout=300)
    try:
        yield name
    finally:
        subprocess.run(
            [str(lab / "down"), "--vm", name], check=False, capture_output=True, timeout=120
        )
