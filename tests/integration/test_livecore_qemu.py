"""memdump.livecore on a real QEMU of the lab (issue 12, Build 3 / item 5 "byte-exact"): a
quiescent guest captured by a background-snapshot migration and converted gives the same
PT_LOADs, byte for byte, as QEMU's own dump-guest-memory of that guest.

The guests run the lab's halt BIOS (`cli; hlt`) with seeded RAM content preloaded by
`-device loader` (lab/image.py), so they never write memory: the snapshot instant does not
matter. They are QEMU processes of this test, run as root (QEMU 7.2 needs root, or
vm.unprivileged_userfaultfd=1, for background-snapshot's userfaultfd write protection), so
nothing on the host is changed. (Stopping a guest with `stop` instead would not keep it
still: QEMU 7.2's background snapshot resumes the guest when it starts saving RAM,
bg_migration_vm_start_bh calls vm_start() whatever the run state was.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from memdump.elfcore import PT_LOAD, parse_core
from memdump.livecore import GuestLayout, LiveCoreSource, elf_machine_from_registers
from tests.helpers.qmp_lab import Qmp

REPO = Path(__file__).resolve().parents[2]
QEMU = "/usr/bin/qemu-system-x86_64"


def _accel() -> str:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    return "kvm"


@contextlib.contextmanager
def root_qemu(
    mib: int, loaders: list[tuple[int, Path]], bios: Path, machine: str = "pc"
) -> Iterator[Qmp]:
    """A lab-style `pc` guest (halt BIOS, RAM preloaded) run by this test, as root."""
    d = Path(tempfile.mkdtemp(prefix="memdump-livecore-"))
    os.chmod(d, 0o700)
    argv = [
        QEMU, "-name", d.name, "-machine", f"{machine},accel={_accel()}", "-m", str(mib),
        "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-bios", str(bios),
    ]  # fmt: skip
    for addr, path in loaders:
        argv += [
            "-device",
            f"loader,file={str(path).replace(',', ',,')},addr={addr:#x},force-raw=on",
        ]
    argv += [
        "-qmp",
        f"unix:{d / 'qmp'},server=on,wait=off",
        "-pidfile",
        str(d / "pid"),
        "-daemonize",
    ]
    try:
        subprocess.run(argv, check=True, timeout=120, capture_output=True)
    except BaseException:
        shutil.rmtree(d)
        raise
    pid = int((d / "pid").read_text())
    qmp: Qmp | None = None
    try:
        qmp = Qmp(d / "qmp")
        yield qmp
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.execute("quit")
            qmp.close()
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
        shutil.rmtree(d)


class FdSource:
    """The read end of the pipe QEMU writes its migration stream into (a DumpSource),
    hashing what it hands on: an independent check of LiveCoreSource.stream_sha256."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sha = hashlib.sha256()
        self.bytes = 0

    def readinto(self, view: memoryview) -> int:
        n = os.readv(self.fd, [view])
        self.sha.update(view[:n])
        self.bytes += n
        return n

    def close_ok(self) -> None:
        os.close(self.fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class ElfDigest:
    ehdr: tuple[Any, ...] = ()
    phdrs: list[tuple[int, ...]] = field(default_factory=list)
    loads: dict[int, str] = field(default_factory=dict)  # p_paddr -> SHA-256 of its bytes
    grabbed: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


def digest_elf(read: Callable[[memoryview], int], grab: dict[int, int]) -> ElfDigest:
    """Stream an ELF core (memory bounded): its headers, a SHA-256 per PT_LOAD (in any file
    order), and the bytes at the guest-physical addresses in ``grab`` (addr -> length)."""
    out = ElfDigest()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    head = bytearray()
    segs: list[tuple[int, int, int, Any]] = []  # (offset, size, paddr, sha), by offset
    pos = 0
    while True:
        n = read(view)
        if not n:
            break
        chunk = view[:n]
        if not segs:
            head += chunk
            layout = parse_core(bytes(head))
            if layout is not None:
                out.ehdr = struct.unpack_from("<16sHHIQQQIHHHHHH", head)
                phoff, phnum = out.ehdr[5], out.ehdr[10]
                out.phdrs = [
                    struct.unpack_from("<IIQQQQQQ", head, phoff + i * 56) for i in range(phnum)
                ]
                segs = sorted(
                    (s.offset, s.filesz, s.paddr, hashlib.sha256())
                    for s in layout.segments
                    if s.type == PT_LOAD
                )
                out.size = layout.file_size
        for off, size, paddr, sha in segs:
            lo, hi = max(off, pos), min(off + size, pos + n)
            if lo < hi:
                sha.update(chunk[lo - pos : hi - pos])
                for addr, length in grab.items():
                    a_lo = off + addr - paddr
                    g_lo, g_hi = max(a_lo, lo), min(a_lo + length, hi)
                    if paddr <= addr < paddr + size and g_lo < g_hi:
                        out.grabbed[addr] = out.grabbed.get(addr, b"") + bytes(
                            chunk[g_lo - pos : g_hi - pos]
                        )
        pos += n
    assert pos == out.size, (pos, out.size)
    out.loads = {paddr: sha.hexdigest() for _, _, paddr, sha in segs}
    return out


def live_capture(
    qmp: Qmp, spill_dir: Path, grab: dict[int, int]
) -> tuple[ElfDigest, Any, dict[str, Any]]:
    """background-snapshot into a pipe, converted on the fly; the capability is off after."""
    layout = GuestLayout.from_mtree(qmp.hmp("info mtree -f"))
    machine = elf_machine_from_registers(qmp.hmp("info registers"))
    qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "background-snapshot", "state": True}]},
    )
    old_bw = qmp.execute("query-migrate-parameters")["max-bandwidth"]
    qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})  # not 128 MiB/s
    r, w = os.pipe()
    src = FdSource(r)
    try:
        qmp.execute("getfd", {"fdname": "memdump"}, fds=[w])
        qmp.execute("migrate", {"uri": "fd:memdump"})
    finally:
        os.close(w)
    core = LiveCoreSource(src, layout, spill_dir=spill_dir, buffer_bytes=16 << 20, machine=machine)
    try:
        dig = digest_elf(core.readinto, grab)
        core.close_ok()
    except BaseException:
        core.abort()
        raise
    finally:
        for _ in range(600):
            mig = qmp.execute("query-migrate")
            if mig.get("status") not in ("setup", "active", "device"):
                break
            time.sleep(0.1)
        qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": False}]},
        )
        qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
    assert mig["status"] == "completed", mig
    caps = {c["capability"]: c["state"] for c in qmp.execute("query-migrate-capabilities")}
    assert caps["background-snapshot"] is False
    assert core.stream_sha256 == src.sha.hexdigest() and core.stream_bytes == src.bytes
    return dig, core, mig


def paused_dump(qmp: Qmp, grab: dict[int, int]) -> ElfDigest:
    """QEMU's dump-guest-memory (paging=false: what virsh dump --memory-only --format elf and
    memdump's paused capture write) into a pipe, digested by a thread."""
    r, w = os.pipe()
    result: list[ElfDigest] = []

    def reader() -> None:
        with open(r, "rb", buffering=0) as f:
            result.append(digest_elf(f.readinto, grab))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        qmp.execute("getfd", {"fdname": "memdump"}, fds=[w])
        qmp.execute("dump-guest-memory", {"paging": False, "protocol": "fd:memdump"})
    finally:
        os.close(w)
    t.join(600)
    assert result, "dump reader failed"
    return result[0]


def assert_same_core(live: ElfDigest, paused: ElfDigest) -> None:
    # ELF header: all fields but e_ehsize (QEMU 7.2 writes 8, sizeof a pointer; fixed in
    # later QEMU; ours is the right 64) and the section/program header positions' content.
    pick = (0, 1, 2, 3, 4, 7, 9, 10, 11, 12, 13)
    assert [live.ehdr[i] for i in pick] == [paused.ehdr[i] for i in pick]
    assert live.ehdr[8] == 64 and paused.ehdr[8] in (8, 64)
    assert (live.ehdr[5], live.ehdr[6]) == (paused.ehdr[5], paused.ehdr[6])  # phoff, shoff

    def loads(d: ElfDigest) -> list[tuple[int, ...]]:  # without p_offset
        return [p[:2] + p[3:] for p in d.phdrs if p[0] == PT_LOAD]

    assert loads(live) == loads(paused)
    assert live.loads == paused.loads  # every PT_LOAD, byte for byte


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where lab/image.py's BIOS and RAM images are kept: the lab's images dir when a lab
    is up (a cache shared with it), else one of this module's. The guests are this
    test's own QEMU processes, so it needs no lab and runs beside the lab's tests."""
    lab = os.environ.get("MEMDUMP_LAB_DIR")
    return Path(lab) / "images" if lab else tmp_path_factory.mktemp("images")


def _lab_bios(images: Path) -> Path:
    bios = images / "bios-halt.bin"
    if not bios.is_file():
        subprocess.run(
            [sys.executable, str(REPO / "lab" / "image.py"), "--bios", str(bios)], check=True
        )
    return bios


def _lab_image(name: str, mib: int, tmp: Path, images: Path) -> dict[str, Any]:
    """lab/image.py's seeded RAM content (cached under ``images``)."""
    images = images / name
    subprocess.run(
        [sys.executable, str(REPO / "lab" / "image.py"), "--name", name, "--mib", str(mib),
         "--out", str(tmp), "--images", str(images)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    data: dict[str, Any] = json.loads((tmp / "layout.json").read_text())
    return data


@pytest.mark.parametrize(
    ("mib", "machine"), [(256, "pc"), (1024, "pc"), (256, "q35")], ids=["256M", "1G", "q35-256M"]
)
def test_live_core_equals_dump_guest_memory(
    mib: int, machine: str, tmp_path: Path, images: Path
) -> None:
    bios = _lab_bios(images)
    img = _lab_image(f"lc-{mib}", mib, tmp_path, images)
    markers = {m["addr"]: bytes.fromhex(m["hex"]) for m in img["markers"]}
    grab = {a: len(b) for a, b in markers.items()}
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    loaders = [(r["addr"], Path(r["file"])) for r in img["regions"]]
    with root_qemu(mib, loaders, bios, machine) as qmp:
        live, core, mig = live_capture(qmp, spill, grab)
        assert qmp.execute("query-status")["status"] == "running"
        paused = paused_dump(qmp, {})
    assert_same_core(live, paused)
    assert live.grabbed == markers  # the lab's markers at their guest-physical addresses
    pages = core.live["pages"]
    # Every page QEMU says it sent was parsed: "normal" data pages and "duplicate" (zero) ones.
    assert (pages["normal"], pages["zero"]) == (mig["ram"]["normal"], mig["ram"]["duplicate"])
    assert pages["dropped"] > 0  # option ROM, ACPI tables, pc.ram behind pc.rom
    assert list(spill.iterdir()) == []


def test_live_core_4g_above_the_pci_hole(tmp_path: Path, images: Path) -> None:
    """4 GiB i440fx: 3 GiB below the PCI hole, pc.ram's last GiB at 4 GiB, which the sweep
    sends before the BIOS that sits below it physically (p_offset not monotonic). A mostly
    empty guest (markers only): zero pages cost one byte on the wire, so this stays small."""
    bios = _lab_bios(images)
    marks = {
        0x100000: b"low RAM",
        0xBFFFF000: b"last page below the PCI hole",
        0x100000000: b"first page above 4 GiB",
        0x13FFFF000: b"last page of RAM",
    }
    loaders = []
    for i, (addr, text) in enumerate(marks.items()):
        f = tmp_path / f"mark{i}.bin"
        f.write_bytes(b"MEMDUMP-LIVECORE " + text)
        loaders.append((addr, f))
    grab = {a: 17 + len(t) for a, t in marks.items()}
    with root_qemu(4096, loaders, bios) as qmp:
        live, core, _ = live_capture(qmp, tmp_path, grab)
        paused = paused_dump(qmp, {})
    assert_same_core(live, paused)
    assert live.grabbed == {a: b"MEMDUMP-LIVECORE " + t for a, t in marks.items()}
    offsets = {p[4]: p[2] for p in live.phdrs if p[0] == PT_LOAD}
    assert offsets[0x100000000] < offsets[0xFFFF0000]  # the sweep's order, not the addresses
    assert core.stream_bytes < 64 << 20
