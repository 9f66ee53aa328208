"""Plain-QEMU lab helpers (lab/up --qemu) shared by the qemu and proxmox driver tests: a
lab QEMU VM of its own, QMP status and dumps, the checks both drivers must pass."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from isal import igzip

from memdump.capture import Capture, capture
from memdump.errors import (
    CaptureTimeoutError,
)
from memdump.hypervisors import Driver, VMInfo
from memdump.pipeline import write_dump
from memdump.settings import Settings
from tests.helpers.lab import remote_temp_dirs
from tests.helpers.qmp_lab import qmp

REPO = Path(__file__).resolve().parents[2]


def qemu_dump_to(sock: Path, path: Path) -> dict[str, Any]:
    """QEMU's own dump of the VM into ``path``, handed over as a descriptor: a QEMU that
    runs as another user (the lab's) could not open a file of this test's."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        args = {"paging": False, "protocol": "fd:ref", "format": "elf"}
        return qmp(sock, "dump-guest-memory", args, fd=fd)
    finally:
        os.close(fd)


@contextmanager
def lab_qemu_vm(run_dir: Path, stem: str, name: str, *up_args: str) -> Iterator[Path]:
    """A lab QEMU VM (``lab/up *up_args``; files ``run_dir/stem.*``) up, started here if it
    was not and then stopped again at the end. Yields its QMP socket."""
    pidfile = run_dir / f"{stem}.pid"
    was_up = pidfile.is_file() and Path(f"/proc/{pidfile.read_text().strip()}").exists()
    subprocess.run([str(REPO / "lab/up"), *up_args], check=True, capture_output=True, timeout=300)
    try:
        yield run_dir / f"{stem}.qmp"
    finally:
        if not was_up:
            subprocess.run(
                [str(REPO / "lab/down"), "--vm", name],
                check=False,
                capture_output=True,
                timeout=120,
            )


def status(sock: Path) -> str:
    return str(qmp(sock, "query-status")["return"]["status"])


def wait_clean(sock: Path, before: list[str], timeout: float = 30.0) -> None:
    """Our dump's temp dir is gone (others' may come and go) and the guest runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        set(remote_temp_dirs()) - set(before) or status(sock) != "running"
    ):
        time.sleep(0.2)
    assert set(remote_temp_dirs()) - set(before) == set()
    assert status(sock) == "running"


def paused_capture_is_byte_exact(
    driver: Driver, settings: Settings, sock: Path, vm_id: str, tmp_path: Path
) -> tuple[Capture, VMInfo, bytes]:
    """Capture ``vm_id`` paused, then QEMU's own dump of it (QMP, same socket): both are the
    same bytes, the record's hashes and size say so, and the guest is running after."""
    # Paused, the VM's memory cannot change between our dump and the reference dump.
    assert "return" in qmp(sock, "stop")
    try:
        ref = driver.resolve(vm_id)
        info = driver.snapshot(ref)
        assert info.state == "paused"
        result = capture(driver, ref, settings)
        assert status(sock) == "paused"  # a dump leaves a paused guest paused
        local = tmp_path / "reference.elf"
        assert qemu_dump_to(sock, local) == {"return": {}}
    finally:
        qmp(sock, "cont")
    assert status(sock) == "running"
    rec = result.record
    raw = igzip.decompress(Path(rec.dump_path).read_bytes())
    expected = local.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == hashlib.sha256(expected).hexdigest() == rec.sha256
    assert raw == expected
    assert rec.raw_size_bytes == len(expected)
    return result, info, raw


def abort_mid_stream_resumes_the_guest(driver: Driver, sock: Path, vm_id: str) -> None:
    before = remote_temp_dirs()
    src = driver.open_dump(driver.resolve(vm_id))
    assert src.readinto(memoryview(bytearray(1 << 20))) > 0  # streaming, the guest paused
    src.abort()
    wait_clean(sock, before)
    # The monitor answers again (the dump failed in QEMU, which resumed the guest).
    assert driver.snapshot(driver.resolve(vm_id)).state == "running"


def deadline_stops_the_dump(driver: Driver, settings: Settings, sock: Path, vm_id: str) -> None:
    before = remote_temp_dirs()
    src = driver.open_dump(driver.resolve(vm_id))
    with pytest.raises(CaptureTimeoutError):
        write_dump(src, settings.dump_dir, "t.mem.gz", deadline=time.monotonic() + 0.05)
    assert list(settings.dump_dir.iterdir()) == []
    wait_clean(sock, before)
