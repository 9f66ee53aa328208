"""Synthetic ELF64 cores for unit tests (same layout QEMU writes: notes, then RAM)."""

from __future__ import annotations

import random
import struct

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")


def make_core(
    blocks: list[tuple[int, bytes]], note: bytes = b"N" * 64, xnum: bool = False
) -> bytes:
    """blocks: (guest-physical address, content). Returns the whole core file."""
    phnum = len(blocks) + 1
    phoff = EHDR.size + (SHDR.size if xnum else 0)
    data_off = phoff + phnum * PHDR.size
    e_phnum = 0xFFFF if xnum else phnum
    ehdr = EHDR.pack(
        b"\x7fELF\x02\x01\x01" + b"\x00" * 9,
        4,
        62,
        1,
        0,
        phoff,
        EHDR.size if xnum else 0,
        0,
        EHDR.size,
        PHDR.size,
        e_phnum,
        SHDR.size if xnum else 0,
        1 if xnum else 0,
        0,
    )
    out = bytearray(ehdr)
    if xnum:
        out += SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
    phdrs = [PHDR.pack(4, 0, data_off, 0, 0, len(note), 0, 0)]
    off = data_off + len(note)
    for paddr, content in blocks:
        phdrs.append(PHDR.pack(1, 0, off, paddr, paddr, len(content), len(content), 0))
        off += len(content)
    for p in phdrs:
        out += p
    out += note
    for _, content in blocks:
        out += content
    return bytes(out)


def mixed_bytes(size: int, seed: int = 1) -> bytes:
    """Random, compressible and zero regions, deterministic."""
    rnd = random.Random(seed)
    out = bytearray()
    kinds = ("random", "text", "zero")
    while len(out) < size:
        n = min(size - len(out), rnd.choice((4096, 65536, 1 << 20)))
        kind = rnd.choice(kinds)
        if kind == "random":
            out += rnd.randbytes(n)
        elif kind == "text":
            out += (b"memdump forensic text %d " % rnd.randrange(1000) * (n // 20 + 1))[:n]
        else:
            out += bytes(n)
    return bytes(out)
