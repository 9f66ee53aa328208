"""Just enough ELF64 to know how long a core dump must be and where guest memory lies.

``virsh dump --memory-only --format elf`` and QEMU's ``dump-guest-memory`` write an ELF
core: header, program headers (one PT_NOTE with CPU state, one PT_LOAD per guest RAM
block), then the notes and the memory. The headers declare the file's full length, so a
stream cut short (or padded) is detected by comparing against them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from memdump.errors import InvalidDumpError

PT_LOAD = 1
PT_NOTE = 4
_PN_XNUM = 0xFFFF
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class CoreLayout:
    segments: tuple[Segment, ...]
    header_end: int  # bytes needed to parse the headers

    @property
    def file_size(self) -> int:
        return max([self.header_end] + [s.offset + s.filesz for s in self.segments])

    @property
    def memory_bytes(self) -> int:
        return sum(s.filesz for s in self.segments if s.type == PT_LOAD)

    def offset_of(self, paddr: int) -> int | None:
        """File offset of guest-physical address ``paddr``, or None if not in the dump."""
        for s in self.segments:
            if s.type == PT_LOAD and s.paddr <= paddr < s.paddr + s.filesz:
                return s.offset + (paddr - s.paddr)
        return None


def parse_core(head: bytes) -> CoreLayout | None:
    """Parse the headers at the start of a core. None means: give me more bytes."""
    if len(head) < _EHDR.size:
        return None
    (
        ident,
        e_type,
        _machine,
        _version,
        _entry,
        phoff,
        shoff,
        _flags,
        _ehsize,
        phentsize,
        phnum,
        shentsize,
        _shnum,
        _shstrndx,
    ) = _EHDR.unpack_from(head)
    if ident[:4] != b"\x7fELF":
        raise InvalidDumpError("dump does not start with an ELF header", magic=ident[:4].hex())
    if ident[4] != 2 or ident[5] != 1:
        raise InvalidDumpError("dump is not a little-endian ELF64 core", ident=ident.hex())
    if e_type != 4:  # ET_CORE
        raise InvalidDumpError(f"ELF type {e_type} is not a core file", e_type=e_type)
    if phentsize != _PHDR.size:
        raise InvalidDumpError(f"unexpected program header size {phentsize}")
    end = 0
    if phnum == _PN_XNUM:
        # More than 65534 segments: the real count is in section header 0's sh_info.
        if shentsize != _SHDR.size:
            raise InvalidDumpError(f"unexpected section header size {shentsize}")
        end = shoff + _SHDR.size
        if len(head) < end:
            return None
        phnum = _SHDR.unpack_from(head, shoff)[7]
    end = max(end, phoff + phnum * _PHDR.size)
    if end > 64 << 20:
        raise InvalidDumpError("ELF program headers are implausibly large", bytes=end)
    if len(head) < end:
        return None
    segs = []
    for i in range(phnum):
        p_type, _fl, off, _vaddr, paddr, filesz, memsz, _al = _PHDR.unpack_from(
            head, phoff + i * _PHDR.size
        )
        segs.append(Segment(p_type, off, paddr, filesz, memsz))
    return CoreLayout(tuple(segs), end)
