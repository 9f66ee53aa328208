"""Synthetic ELF64 cores for unit tests, laid out as QEMU 7.2 writes them: ELF header,
section headers (NULL + .shstrtab), program headers (NOTE + LOADs), notes, RAM, and
the .shstrtab contents last."""

from __future__ import annotations

import random
import struct

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
SHSTRTAB = b"\x00.shstrtab\x00"


def make_core(
    blocks: list[tuple[int, bytes]], note: bytes = b"N" * 64, xnum: bool = False
) -> bytes:
    """blocks: (guest-physical address, content). Returns the whole core file."""
    phnum = len(blocks) + 1
    shoff = EHDR.size
    phoff = shoff + 2 * SHDR.size
    data_off = phoff + phnum * PHDR.size
    ehdr = EHDR.pack(
        b"\x7fELF\x02\x01\x01" + b"\x00" * 9,
        4,
        62,
        1,
        0,
        phoff,
        shoff,
        0,
        EHDR.size,
        PHDR.size,
        0xFFFF if xnum else phnum,
        SHDR.size,
        2,
        1,
    )
    phdrs = [PHDR.pack(4, 0, data_off, 0, 0, len(note), 0, 0)]
    off = data_off + len(note)
    for paddr, content in blocks:
        phdrs.append(PHDR.pack(1, 0, off, paddr, paddr, len(content), len(content), 0))
        off += len(content)
    out = bytearray(ehdr)
    out += SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum if xnum else 0, 0, 0)
    out += SHDR.pack(1, 3, 0, 0, off, len(SHSTRTAB), 0, 0, 1, 0)
    for p in phdrs:
        out += p
    out += note
    for _, content in blocks:
        out += content
    out += SHSTRTAB
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
