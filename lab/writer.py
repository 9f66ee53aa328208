#!/usr/bin/env python3
"""The lab's "writer" BIOS: a guest that keeps writing across all its RAM below 4 GiB.

For the live-capture benchmark (benchmarks/capture.py --writer) and tests: QEMU's
background snapshot sends a page the guest writes before the sweep reached it, then
continues its sweep after that page, so a guest writing everywhere makes the collector's
converter buffer (MEMDUMP_LIVE_BUFFER_BYTES) and spill pages (memdump/livecore.py).

A 64 KiB BIOS image (like image.write_halt_bios / lab/counter.py) whose reset vector
jumps to 16-bit code that
  1. enters "unreal" (big real) mode: lgdt, CR0.PE=1, DS = a flat 4 GiB data segment,
     CR0.PE=0; DS keeps its 4 GiB limit (the descriptor cache), so 32-bit addresses
     (0x67 prefix) reach all memory below 4 GiB while the code stays real-mode code
     running from the ROM (no stack, interrupts off, nothing else written);
  2. reads the size of RAM below 4 GiB from the CMOS (QEMU's pc_cmos_init: registers
     0x34/0x35 = 64 KiB units above 16 MiB, i.e. end = 16 MiB + value * 64 KiB; 3 GiB for
     a guest of 3.5 GiB or more);
  3. loops for ever: n += 1; for each STRIDE-th byte from START (1 MiB) up to that end:
     dword [addr + OFFSET] = n.

So one dword per 4 KiB page of [1 MiB, end of low RAM) holds the number of the pass that
last wrote it; every other byte keeps the seeded image content (lab/image.py), so the
memory stays as compressible as the other lab VMs'. Not written: the first MiB (IVT/BDA,
VGA, option ROM and BIOS shadows) and RAM above 4 GiB (a guest of more than 3.5 GiB has
its memory beyond 3 GiB there; reaching it needs long mode or PAE paging, not done).
The seeded markers of layout.json are overwritten where a marker covers OFFSET: a writer
guest's dumps are not checked against them.

Usage: writer.py --bios PATH      (write the 64 KiB writer BIOS)
       writer.py --bios-dir DIR   (write it as DIR/bios-writer-v<VERSION>.bin, print the path:
                                   a new version is a new path, so lab/up restarts its VMs)
"""

from __future__ import annotations

import struct
import sys

# Bump when the machine code changes.
WRITER_VERSION = 1
START = 0x100000  # first written page: 1 MiB, above the legacy areas
STRIDE = 0x1000  # one dword per 4 KiB page
OFFSET = 0x800  # where in the page the pass number goes (not the page's first bytes)
CODE_AT = 0xE000  # where the code sits in the image (CS base 0xFFFF0000, IP = this)
GDT_AT = 0xF000  # the GDT in the image: null descriptor, flat data (selector 8)
GDTR_AT = 0xF020  # the 6-byte GDTR operand (limit, 32-bit base)
ROM_BASE = 0xFFFF0000  # where the 64 KiB image sits in the physical address space
DATA_SEL = 8


def rel8(delta: int) -> int:
    if not -128 <= delta <= 127:
        raise ValueError(f"short jump out of range: {delta}")
    return delta & 0xFF


def _code() -> bytes:
    """16-bit real-mode machine code (32-bit operands and addresses through the 0x66 and
    0x67 prefixes), assembled here by hand; the comments are the assembly."""
    code = bytearray()

    def emit(hexstr: str, *imm: bytes) -> int:
        code.extend(bytes.fromhex(hexstr))
        for b in imm:
            code.extend(b)
        return len(code)

    def w(v: int) -> bytes:
        return struct.pack("<H", v)

    def d(v: int) -> bytes:
        return struct.pack("<I", v)

    emit("fa")  # cli
    # o32 so the GDTR's base is read as 32 bits (16-bit lgdt takes 24).
    emit("2e660f0116", w(GDTR_AT))  # lgdt cs:[GDTR_AT]
    emit("0f20c0")  # mov eax, cr0
    emit("0c01")  # or al, 1
    emit("0f22c0")  # mov cr0, eax         ; protected mode (CS keeps its real-mode cache)
    emit("eb00")  # jmp $+2
    emit("bb", w(DATA_SEL))  # mov bx, DATA_SEL
    emit("8edb")  # mov ds, bx           ; DS cache: base 0, limit 4 GiB
    emit("24fe")  # and al, 0xfe
    emit("0f22c0")  # mov cr0, eax         ; back to real mode, DS keeps its limit
    emit("eb00")  # jmp $+2
    emit("31db")  # xor bx, bx
    emit("8edb")  # mov ds, bx           ; base 0 again; the limit stays 4 GiB
    # End of RAM below 4 GiB from the CMOS: 16 MiB + [0x35:0x34] * 64 KiB.
    emit("b034")  # mov al, 0x34
    emit("e670")  # out 0x70, al
    emit("e471")  # in al, 0x71
    emit("88c1")  # mov cl, al
    emit("b035")  # mov al, 0x35
    emit("e670")  # out 0x70, al
    emit("e471")  # in al, 0x71
    emit("88c5")  # mov ch, al
    emit("660fb7c9")  # movzx ecx, cx
    emit("66c1e110")  # shl ecx, 16
    emit("6681c1", d(0x1000000))  # add ecx, 16 MiB      ; ecx = end
    emit("6631d2")  # xor edx, edx         ; n
    outer = len(code)
    emit("6642")  # inc edx
    emit("66bf", d(START + OFFSET))  # mov edi, START + OFFSET
    inner = len(code)
    emit("67668917")  # mov [edi], edx      ; a32 o32, DS
    emit("6681c7", d(STRIDE))  # add edi, STRIDE
    emit("6639cf")  # cmp edi, ecx
    end = emit("72", b"\0")  # jb inner
    code[end - 1] = rel8(inner - end)
    end = emit("eb", b"\0")  # jmp outer
    code[end - 1] = rel8(outer - end)
    return bytes(code)


def bios_bytes() -> bytes:
    rom = bytearray(b"\xff" * 0x10000)
    code = _code()
    if CODE_AT + len(code) > GDT_AT:
        raise ValueError("code overlaps the GDT")
    rom[CODE_AT : CODE_AT + len(code)] = code
    # Null descriptor; flat data: base 0, limit 0xFFFFF pages (G=1), present, writable,
    # accessed already (the CPU would otherwise write the accessed bit into the ROM).
    rom[GDT_AT : GDT_AT + 16] = bytes(8) + bytes.fromhex("ffff00000093cf00")
    rom[GDTR_AT : GDTR_AT + 6] = struct.pack("<HI", 16 - 1, ROM_BASE + GDT_AT)
    # Reset vector (0xFFFFFFF0, image offset 0xFFF0): jmp near CODE_AT.
    rel = CODE_AT - (0xFFF0 + 3)
    rom[0xFFF0:0xFFF3] = b"\xe9" + struct.pack("<h", rel)
    return bytes(rom)


def written_addrs(low_ram_end: int) -> range:
    """Guest-physical addresses of the dwords the guest writes, for a guest whose RAM
    below 4 GiB ends at ``low_ram_end``."""
    return range(START + OFFSET, low_ram_end, STRIDE)


def main(argv: list[str] | None = None) -> int:
    from rom import rom_main  # lab/rom.py, next to this file

    return rom_main(argv, __doc__ or "", "writer", WRITER_VERSION, bios_bytes)


if __name__ == "__main__":
    sys.exit(main())
