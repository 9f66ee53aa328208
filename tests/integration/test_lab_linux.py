"""The lab's Linux guest (lab/up --linux): Debian's kernel and a busybox initramfs booted
with libvirt's direct kernel boot, so a memory dump holds a real OS image whose kernel
banner Volatility 3 finds. The module brings the VM up and removes it at the end."""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memdump.elfcore import parse_core
from tests.helpers.lab import layout, virsh

pytestmark = pytest.mark.lab

VM = "vm-linux-01"
MIB = 256
LAB = Path(__file__).resolve().parents[2] / "lab"
READY = "memdump-lab-linux: ready"


def lab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAB / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def linux_vm(lab_dir: Path) -> Iterator[dict[str, Any]]:
    t0 = time.monotonic()
    up = lab("up", "--linux", f"{VM}:{MIB}")
    try:
        assert up.returncode == 0, f"lab/up --linux failed:\n{up.stderr[-4000:]}"
        print(f"lab/up --linux: {time.monotonic() - t0:.1f}s\n{up.stderr}")
        yield layout(lab_dir, VM)
    finally:
        down = lab("down", "--vm", VM)
        assert down.returncode == 0, down.stderr
        assert VM not in virsh("list", "--all", "--name").split()


def count(path: Path, needle: bytes) -> int:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        n, i = 0, m.find(needle)
        while i >= 0:
            n, i = n + 1, m.find(needle, i + 1)
        return n


def test_guest_boots_debian_kernel(linux_vm: dict[str, Any], lab_dir: Path) -> None:
    lay = linux_vm
    assert lay["name"] == VM and lay["kind"] == "linux" and lay["memory_bytes"] == MIB << 20
    release, banner = lay["kernel_release"], lay["banner"]
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", release), release
    # The exact linux_banner: "Linux version <uname -r> (<builder>) (<compiler>) <uname -v>".
    assert banner.startswith(f"Linux version {release} (")
    assert banner.endswith(f") {lay['kernel_version']}") and lay["kernel_version"].startswith("#1 ")
    assert virsh("domstate", VM).strip() == "running"

    # Direct kernel boot of the cached kernel and initramfs, console on the first UART.
    xml = virsh("dumpxml", VM)
    assert f"<kernel>{lay['kernel']}</kernel>" in xml and f"<initrd>{lay['initrd']}</initrd>" in xml
    assert "console=ttyS0" in lay["cmdline"] and f"<domain type='{lay['virt']}'" in xml
    cache = Path(lay["kernel"]).parent
    assert cache.parent == Path((lab_dir / "run" / "images-dir").read_text().strip())
    assert Path(lay["kernel"]).name == f"vmlinuz-{release}" and (cache / "kernel.json").is_file()

    # /init reported on the serial console: the banner line lab/up copied is really there.
    console = Path(lay["console_log"]).read_text(errors="replace").replace("\r", "")
    assert f"memdump-lab-linux: banner: {banner}\n" in console and READY in console
    assert lay["boot"]["guest_uptime_seconds"] > 0


def test_lab_up_again_reuses_the_running_guest(linux_vm: dict[str, Any]) -> None:
    dom_id = virsh("domid", VM).strip()
    t0 = time.monotonic()
    up = lab("up", "--vm", f"{VM}:{MIB}:linux")  # the spec form; same VM as --linux
    assert up.returncode == 0, up.stderr
    assert time.monotonic() - t0 < 30 and "waiting for Linux" not in up.stderr
    assert virsh("domid", VM).strip() == dom_id  # not restarted
    st = lab("status")  # optional: an "info" line, unless MEMDUMP_LAB_VMS names it
    assert st.returncode == 0, st.stdout
    assert re.search(
        rf"^(info  domain {VM} running \(optional, Linux |ok    domain {VM} running)",
        st.stdout,
        re.M,
    ), st.stdout


def test_memory_dump_holds_the_kernel_banner(linux_vm: dict[str, Any], tmp_path: Path) -> None:
    dump = tmp_path / "linux.elf"
    virsh("dump", "--memory-only", "--format", "elf", VM, str(dump))
    assert virsh("domstate", VM).strip() == "running"
    with open(dump, "rb") as f:
        core = parse_core(f.read(1 << 20))
    assert core is not None and core.file_size == dump.stat().st_size
    assert core.memory_bytes >= (MIB - 1) << 20

    banner = linux_vm["banner"].encode()
    # linux_banner in the kernel's .rodata, plus copies (printk buffer, /init's output).
    assert count(dump, banner) >= 1
    assert count(dump, banner + b"\n") >= 1  # the string in RAM ends with a newline

    # Volatility 3's banners plugin, as an analyst would run it (`vol -f ... banners`).
    cli = "import sys; from volatility3.cli import main; sys.argv[0] = 'vol'; main()"
    vol = subprocess.run(
        [sys.executable, "-c", cli, "-q", "-r", "json", "-f", str(dump), "banners.Banners"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert vol.returncode == 0, vol.stderr[-2000:]
    found = [row["Banner"] for row in json.loads(vol.stdout)]
    assert linux_vm["banner"] in found, found


def test_memdump_capture_finds_the_kernel_banner(linux_vm: dict[str, Any], settings: Any) -> None:
    # Through memdump itself: SSH, pipeline, manifest, and the Volatility 3 check, whose
    # banners plugin names the guest's kernel.
    from memdump.capture import capture
    from memdump.hypervisors import open_driver
    from memdump.manifest import manifest_path

    drv = open_driver(settings.inventory[0], settings.ssh)
    try:
        rec = capture(drv, drv.resolve(VM), settings).record
    finally:
        drv.close()
    assert rec.analysis == "passed"
    m = json.loads(manifest_path(Path(rec.dump_path)).read_text())
    assert linux_vm["banner"] in m["analysis"]["banners"], m["analysis"]


def test_a_guest_that_does_not_boot_fails_lab_up_clearly(
    linux_vm: dict[str, Any], lab_dir: Path
) -> None:
    # No /init to run: the kernel panics, panic=-1 reboots, on_reboot ends the domain.
    up = lab("up", "--linux", f"{VM}:{MIB}", env={"MEMDUMP_LAB_LINUX_CMDLINE": "rdinit=/nope"})
    assert up.returncode != 0
    assert f"{VM}: the guest stopped while booting" in up.stderr
    assert "Kernel panic" in up.stderr
    assert not (lab_dir / "vms" / VM / "layout.json").exists()
    # Still recorded, so lab/down (the fixture's) removes it.
    assert VM in (lab_dir / "run" / "domains").read_text().split()
