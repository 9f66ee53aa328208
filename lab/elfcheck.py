#!/usr/bin/env python3
"""Check an ELF memory dump of a lab VM against its layout.json.

Usage: elfcheck.py LAYOUT_JSON DUMP.elf [--full] [--segments]

Looks up every marker at its guest-physical address through the PT_LOAD
program headers (p_paddr/p_offset/p_filesz), as written by
`virsh dump --memory-only --format elf`.  With --full also compares every
byte of the loader images with the dump (slow for big VMs).
For a Linux guest (layout "kind": "linux", lab/linux.py) it instead counts the
copies of the guest's kernel banner in the dump.
Exit status 0 only if everything matched.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import BinaryIO

PT_LOAD = 1
CHUNK = 16 << 20


def load_segments(f: BinaryIO) -> list[tuple[int, int, int]]:
    """[(paddr, offset, filesz)] of the PT_LOAD segments of an ELF64 LE core."""
    ehdr = f.read(64)
    if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    (e_phoff,) = struct.unpack_from("<Q", ehdr, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", ehdr, 54)
    segs = []
    for i in range(e_phnum):
        f.seek(e_phoff + i * e_phentsize)
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, _memsz, _align = struct.unpack(
            "<IIQQQQQQ", f.read(56)
        )
        if p_type == PT_LOAD:
            segs.append((p_paddr, p_offset, p_filesz))
    return segs


def read_phys(f: BinaryIO, segs: list[tuple[int, int, int]], addr: int, size: int) -> bytes | None:
    for paddr, off, filesz in segs:
        if paddr <= addr and addr + size <= paddr + filesz:
            f.seek(off + addr - paddr)
            return f.read(size)
    return None


def count_in_file(f: BinaryIO, needle: bytes) -> int:
    """Occurrences of needle anywhere in the file (chunked, overlapping by len - 1)."""
    f.seek(0)
    n, tail = 0, b""
    while chunk := f.read(CHUNK):
        buf = tail + chunk
        i = buf.find(needle)
        while i >= 0:
            n += 1
            i = buf.find(needle, i + 1)
        tail = buf[len(buf) - len(needle) + 1 :] if len(needle) > 1 else b""
    return n


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as lf:
        layout = json.load(lf)
    bad = 0
    with open(args[1], "rb") as f:
        segs = load_segments(f)
        if "--segments" in argv:
            for paddr, off, filesz in segs:
                print(f"PT_LOAD paddr={paddr:#x} offset={off:#x} filesz={filesz:#x}")
        if layout.get("kind") == "linux":
            # A running kernel: no fixed content to compare, but its banner must be there.
            n = count_in_file(f, layout["banner"].encode())
            print(f"Linux {layout['kernel_release']}: {n} copies of the kernel banner")
            return 0 if n else 1
        for m in layout["markers"]:
            want = bytes.fromhex(m["hex"])
            got = read_phys(f, segs, m["addr"], len(want))
            ok = got == want
            bad += not ok
            print(f"marker {m['addr']:#x}: {'ok' if ok else 'MISSING'}")
        if "--full" in argv:
            for r in layout["regions"]:
                with open(r["file"], "rb") as img:
                    pos = 0
                    while pos < r["size"]:
                        n = min(CHUNK, r["size"] - pos)
                        if read_phys(f, segs, r["addr"] + pos, n) != img.read(n):
                            print(f"region {r['addr']:#x}: mismatch near {r['addr'] + pos:#x}")
                            bad += 1
                            break
                        pos += n
                    else:
                        print(f"region {r['addr']:#x}+{r['size']:#x}: identical")
    print(f"{len(layout['markers'])} markers, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
