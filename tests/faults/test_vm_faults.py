"""Faults on the lab (bounded in time): a VM destroyed during its dump, a hypervisor that
cannot be reached, a dump script killed outright. Each leaves no file and a clear error;
what a killed script leaves on the hypervisor goes at the next start."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.capture import capture
from memdump.errors import ConnectError, DumpFailedError, ShortDumpError
from memdump.hypervisors import open_driver
from memdump.settings import Settings
from memdump.targets import find
from tests.helpers.lab import (
    assert_hypervisor_clean,
    extra_lab_vm,
    remote_temp_dirs,
    remote_temp_paths,
    virsh,
)
from tests.helpers.procs import cmdline, holders

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
VM = "vm-fault-01"


@pytest.fixture
def doomed_vm(lab_dir: Path) -> Iterator[str]:
    with extra_lab_vm(VM, 512) as name:
        yield name


def test_vm_destroyed_during_its_dump(doomed_vm: str, settings: Settings) -> None:
    drv = open_driver(settings.inventory[0], settings.ssh)
    ref = drv.resolve(doomed_vm)
    destroyed: list[bool] = []

    def destroy(done: int, total: int | None) -> None:
        if done and not destroyed:
            virsh("destroy", doomed_vm)
            destroyed.append(True)

    t0 = time.monotonic()
    with pytest.raises((DumpFailedError, ShortDumpError)) as ei:
        capture(drv, ref, settings, progress=destroy)
    assert destroyed and time.monotonic() - t0 < 60
    assert "stderr" in ei.value.fields or "bytes_done" in ei.value.fields
    assert not settings.dump_dir.exists() or list(settings.dump_dir.iterdir()) == []
    deadline = time.monotonic() + 30
    while remote_temp_dirs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert remote_temp_dirs() == []
    # The other VMs are untouched and still dump fine.
    other = capture(drv, drv.resolve("vm-db-01"), settings)
    assert Path(other.record.dump_path).is_file()


def test_unreachable_hypervisor_is_a_clear_bounded_error(settings: Settings) -> None:
    hv = settings.inventory[0].model_copy(update={"port": 1})  # nothing listens there
    drv = open_driver(hv, settings.ssh)
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as ei:
        find([drv], "vm-web-01")
    assert ei.value.retryable and "cannot connect" in str(ei.value)
    assert time.monotonic() - t0 < 20


def test_dump_script_killed_outright_is_cleaned_by_the_next_start(settings: Settings) -> None:
    # The hypervisor-side script dies without its EXIT trap (SIGKILL): its temp dir with
    # the FIFO stays behind until a worker's start-up clean-up (Driver.clean_stale).
    drv = open_driver(settings.inventory[0], settings.ssh)
    src = drv.open_dump(drv.resolve("vm-db-01"))
    buf = bytearray(1 << 20)
    assert src.readinto(memoryview(buf)) > 0  # the dump is streaming
    (left,) = remote_temp_dirs()
    (where,) = remote_temp_paths()
    (shell,) = holders(where / "lock")  # fd 8 of the script, and only the script
    assert "mkfifo" in cmdline(shell)
    os.kill(shell, signal.SIGKILL)
    src.abort()
    time.sleep(1)
    assert remote_temp_dirs() == [left]  # nothing removed it
    assert drv.clean_stale(3600) == []  # too young to be sure
    assert drv.clean_stale(0) == [str(where)]
    assert_hypervisor_clean("vm-db-01")
    assert "None" in virsh("domjobinfo", "vm-db-01")
    drv.close()
