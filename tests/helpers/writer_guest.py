"""The lab's writer guest (lab/writer.py): a libvirt domain whose BIOS keeps writing one
dword, the number of its current pass, into every 4 KiB page of its RAM from 1 MiB to the
end of RAM below 4 GiB.

- ``writer_domain``: ``lab/up --vm NAME:MIB:writer``, ``lab/down --vm NAME`` afterwards;
- ``read_pass``: the dword at one written address, read with HMP ``xp`` (the guest runs);
- ``pass_numbers``: every written dword of an ELF core (a file), in address order;
- ``check_one_instant``: those of an image taken at one instant: pages [START, k) hold the
  current pass n, pages [k, end) the previous one, n - 1.
"""

from __future__ import annotations

import importlib.util
import mmap
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from memdump.elfcore import parse_core

REPO = Path(__file__).resolve().parents[2]
URI = "qemu:///system"


def _writer_module() -> ModuleType:
    # lab/ is not a package: load lab/writer.py by path (its constants are the layout).
    spec = importlib.util.spec_from_file_location("lab_writer", REPO / "lab" / "writer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WRITER = _writer_module()
FIRST_ADDR: int = WRITER.START + WRITER.OFFSET


def low_ram_end(memory_bytes: int) -> int:
    """End of the RAM below 4 GiB of an i440fx guest (3 GiB once it does not fit below the
    PCI hole at 3.5 GiB), what the writer reads from the CMOS."""
    return 0xC000_0000 if memory_bytes >= 0xE000_0000 else memory_bytes


def written_addrs(memory_bytes: int) -> range:
    return range(FIRST_ADDR, low_ram_end(memory_bytes), WRITER.STRIDE)


@contextmanager
def writer_domain(name: str, mib: int) -> Iterator[str]:
    lab = REPO / "lab"
    subprocess.run(
        [str(lab / "up"), "--vm", f"{name}:{mib}:writer"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    try:
        yield name
    finally:
        subprocess.run(
            [str(lab / "down"), "--vm", name], check=False, capture_output=True, timeout=120
        )


def read_pass(domain: str, addr: int) -> int:
    out = subprocess.run(
        ["virsh", "-c", URI, "qemu-monitor-command", domain, "--hmp", f"xp /1wx {addr:#x}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    m = re.search(r":\s*0x([0-9a-f]+)", out)
    assert m, f"unexpected xp output: {out!r}"
    return int(m.group(1), 16)


def wait_pass_changes(domain: str, addr: int, timeout: float = 20.0) -> tuple[int, int]:
    """Two reads of ``addr`` that differ (the guest wrote it in between), at least pass 2
    at the second (so every written page holds a pass number, none the seeded bytes)."""
    first = read_pass(domain, addr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read_pass(domain, addr)
        if now != first and now >= 2:
            return first, now
    raise AssertionError(f"{domain}: the dword at {addr:#x} stayed {first} for {timeout} s")


def pass_numbers(core: Path, memory_bytes: int) -> list[int]:
    """The writer's dwords in an ELF core file, in address order. The core's headers must
    declare exactly its length."""
    with core.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        lay = parse_core(m[: 1 << 20])
        assert lay is not None, f"{core}: no ELF core headers"
        assert lay.file_size == len(m), f"{core}: headers say {lay.file_size}, file {len(m)}"
        out = []
        for addr in written_addrs(memory_bytes):
            off = lay.offset_of(addr)
            assert off is not None, f"{addr:#x} not in any PT_LOAD of {core}"
            out.append(struct.unpack_from("<I", m, off)[0])
        return out


def check_one_instant(values: list[int]) -> tuple[int, int]:
    """(n, k): pages [0, k) hold pass n, pages [k, len) pass n - 1 (k may be len: the
    pass had just ended). Anything else (a page of another pass, a step up, two steps)
    means pages of the image were read at different times or placed at the wrong address."""
    assert values, "no written page"
    n = values[0]
    k = next((i for i, v in enumerate(values) if v != n), len(values))
    assert n >= 2, f"first page holds {n}: the guest had not finished a pass"
    bad = [(i, v) for i, v in enumerate(values[k:], k) if v != n - 1]
    assert not bad, f"pass {n} up to page {k}, then not {n - 1}: {bad[:5]} ({len(bad)} pages)"
    return n, k
