"""Just enough ELF64 to know how long a core dump must be and where guest memory lies.

``virsh dump --memory-only --format elf`` and QEMU's ``dump-guest-memory`` write an ELF
core: header, section headers (QEMU >= 7.2), program headers (one PT_NOTE with CPU
state, one PT_LOAD per guest RAM block), then the notes, the memory and, last, the
section contents (a .shstrtab). The headers declare the file's full length, so a
stream cut short (or padded) is detected by comparing against them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from memdump.errors import InvalidDumpError

PT_LOAD = 1
PT_NOTE = 4
_PN_XNUM = 0xFFFF
_SHT_NULL = 0
_SHT_NOBITS = 8
_MAX_HEADERS = 64 << 20
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
    # (offset, size) of section contents: QEMU >= 7.2 appends a .shstrtab after memory.
    sections: tuple[tuple[int, int], ...] = ()

    @property
    def file_size(self) -> int:
        ends = [self.header_end]
        ends += [s.offset + s.filesz for s in self.segments]
        ends += [off + size for off, size in self.sections]
        return max(ends)

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
        shnum,
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
    if shoff and shentsize != _SHDR.size:
        raise InvalidDumpError(f"unexpected section header size {shentsize}")
    if shoff:
        # Section 0 carries the real counts when they overflow the ELF header's fields.
        end = shoff + _SHDR.size
        if end > _MAX_HEADERS:
            raise InvalidDumpError("ELF section headers are not at the start of the dump")
        if len(head) < end:
            return None
        sh0 = _SHDR.unpack_from(head, shoff)
        if phnum == _PN_XNUM:
            phnum = sh0[7]
        if shnum == 0:
            shnum = sh0[5]
        end = shoff + shnum * _SHDR.size
    elif phnum == _PN_XNUM:
        raise InvalidDumpError("ELF uses PN_XNUM without section headers")
    end = max(end, phoff + phnum * _PHDR.size)
    if end > _MAX_HEADERS:
        raise InvalidDumpError("ELF headers are implausibly large", bytes=end)
    if len(head) < end:
        return None
    sections = []
    for i in range(shnum if shoff else 0):
        sh = _SHDR.unpack_from(head, shoff + i * _SHDR.size)
        if sh[1] not in (_SHT_NULL, _SHT_NOBITS):
            sections.append((sh[4], sh[5]))
    segs = []
    for i in range(phnum):
        p_type, _fl, off, _vaddr, paddr, filesz, memsz, _al = _PHDR.unpack_from(
            head, phoff + i * _PHDR.size
        )
        segs.append(Segment(p_type, off, paddr, filesz, memsz))
    return CoreLayout(tuple(segs), end, tuple(sections))
