#!/usr/bin/env python3
"""The lab's "counter" BIOS: a guest that keeps writing memory, for live-capture tests.

A 64 KiB BIOS image (like image.write_halt_bios) whose reset vector jumps to a real-mode
loop that runs for ever:

    init:  for each page i of PAGES 4 KiB pages from BASE:
               page[0:8] = MAGIC, page[8:16] = 0 (u64), page[16:20] = i (u32)
    loop:  c += 1 (64-bit)
           for each page i in page order: page[8:16] = c

So at any instant pages 0..k-1 hold c and pages k..PAGES-1 hold c-1 (k = how far the
current pass got). An image taken at one instant has every page's counter within one of
the others, non-increasing in page order with at most one step; an image whose pages were
read at different times (smeared) breaks that. Nothing else is written: the code runs
from the ROM, with interrupts off and no stack.

The layout goes into the VM's layout.json as "counter" (see LAYOUT), where tests read it.

Usage: counter.py --bios PATH      (write the 64 KiB counter BIOS)
       counter.py --bios-dir DIR   (write it as DIR/bios-counter-v<VERSION>.bin, print the path:
                                    a new version is a new path, so lab/up restarts its VMs)
"""

from __future__ import annotations

import struct
import sys

# Bump when the machine code or the page format changes.
COUNTER_VERSION = 1
BASE = 0x10000  # guest-physical start of the counter pages (low RAM, below the VGA hole)
PAGES = 128  # 0x10000..0x8ffff: 512 KiB
PAGE_SIZE = 0x1000
MAGIC = b"MDCOUNT1"
OFF_MAGIC = 0
OFF_COUNTER = 8  # u64 little endian; the low dword is written before the high one
OFF_INDEX = 16  # u32 little endian, the page's index, written once by the init pass
CODE_AT = 0xE000  # where the loop sits in the image (CS = 0xF000, IP = this)

LAYOUT = {
    "version": COUNTER_VERSION,
    "addr": BASE,
    "pages": PAGES,
    "page_size": PAGE_SIZE,
    "magic": MAGIC.decode(),
    "offsets": {"magic": OFF_MAGIC, "counter": OFF_COUNTER, "index": OFF_INDEX},
    "counter_bytes": 8,
}


def rel8(delta: int) -> int:
    if not -128 <= delta <= 127:
        raise ValueError(f"short jump out of range: {delta}")
    return delta & 0xFF


def _code() -> bytes:
    """16-bit real-mode machine code (32-bit operands through the 0x66 prefix), assembled
    here by hand; the comments are the assembly. Page i is reached as ES = 0x1000 + i*0x100,
    offset 0 (physical BASE + i*PAGE_SIZE)."""
    seg0 = BASE >> 4
    step = PAGE_SIZE >> 4
    magic_lo, magic_hi = struct.unpack("<II", MAGIC)
    code = bytearray()

    def emit(hexstr: str, *imm: bytes) -> int:
        code.extend(bytes.fromhex(hexstr))
        for b in imm:
            code.extend(b)
        return len(code)

    w = lambda v: struct.pack("<H", v)  # noqa: E731
    d = lambda v: struct.pack("<I", v)  # noqa: E731
    emit("fa")  # cli
    emit("6631db")  # xor ebx, ebx          ; c, low dword
    emit("6631d2")  # xor edx, edx          ; c, high dword
    emit("6631f6")  # xor esi, esi          ; page index
    emit("b8", w(seg0))  # mov ax, seg0
    emit("b9", w(PAGES))  # mov cx, PAGES
    init = len(code)
    emit("8ec0")  # mov es, ax
    emit("2666c7060000", d(magic_lo))  # mov dword [es:0], magic_lo
    emit("2666c7060400", d(magic_hi))  # mov dword [es:4], magic_hi
    emit("2666891e0800")  # mov [es:8], ebx
    emit("266689160c00")  # mov [es:12], edx
    emit("266689361000")  # mov [es:16], esi
    emit("6646")  # inc esi
    emit("05", w(step))  # add ax, step
    end = emit("e2", b"\0")  # loop init
    code[end - 1] = rel8(init - end)
    outer = len(code)
    emit("6683c301")  # add ebx, 1
    emit("6683d200")  # adc edx, 0
    emit("b8", w(seg0))  # mov ax, seg0
    emit("b9", w(PAGES))  # mov cx, PAGES
    inner = len(code)
    emit("8ec0")  # mov es, ax
    emit("2666891e0800")  # mov [es:8], ebx     ; low dword first
    emit("266689160c00")  # mov [es:12], edx
    emit("05", w(step))  # add ax, step
    end = emit("e2", b"\0")  # loop inner
    code[end - 1] = rel8(inner - end)
    end = emit("eb", b"\0")  # jmp outer
    code[end - 1] = rel8(outer - end)
    return bytes(code)


def bios_bytes() -> bytes:
    rom = bytearray(b"\xff" * 0x10000)
    code = _code()
    rom[CODE_AT : CODE_AT + len(code)] = code
    # Reset vector (0xFFFFFFF0, image offset 0xFFF0): jmp near CODE_AT.
    rel = CODE_AT - (0xFFF0 + 3)
    rom[0xFFF0:0xFFF3] = b"\xe9" + struct.pack("<h", rel)
    return bytes(rom)


def main(argv: list[str] | None = None) -> int:
    from rom import rom_main  # lab/rom.py, next to this file

    return rom_main(argv, __doc__ or "", "counter", COUNTER_VERSION, bios_bytes)


if __name__ == "__main__":
    sys.exit(main())
