"""A QEMU background-snapshot migration stream -> the ELF64 core ``dump-guest-memory`` writes.

Live capture (issue 12) has QEMU save guest RAM *as it was when the migration started*
while the guest runs (``background-snapshot``: write-protected RAM, a page the guest
writes is sent first). This module turns that stream, while it arrives, into the same
ELF core a paused ``virsh dump --memory-only --format elf`` / QMP ``dump-guest-memory``
(paging=false) produces for the guest, so everything downstream (gzip, hashes, the
Volatility check, verify) is unchanged.

The stream (QEMU >= 6.0 up to at least 7.2; migration/savevm.c, migration/ram.c,
migration/migration.c ``bg_migration_thread``):

- ``QEVM`` + version 3, an optional configuration section (machine type, and
  subsections: target-page-bits, validated capabilities, uuid);
- iterable sections: ``SECTION_START`` "ram" (the RAMBlock list: idstr + used length,
  in the order the sweep visits them), then ``SECTION_PART`` "ram" records, each a run
  of pages (be64 ``offset | flags``, the block's idstr unless ``CONTINUE``; ``ZERO``: one
  fill byte; ``PAGE``: 4 KiB) ended by ``EOS``, each section with a footer (0x7e + id);
- after the last RAM section, the device state QEMU saved *before* RAM (vCPUs, devices:
  ``SECTION_FULL`` records whose length only the device's own code knows), ``QEMU_VM_EOF``
  and the JSON vmdescription. Only the end is checked (QEMU_VM_EOF and a vmdescription
  that ends exactly at the end of the stream); the rest is hashed and counted.

The guest-physical layout comes from HMP ``info mtree -f`` (:meth:`GuestLayout.from_mtree`),
merged into PT_LOADs exactly as QEMU's ``guest_phys_blocks_region_add`` does.

Data order: segment data are laid out in the file in the order QEMU sweeps RAM (blocks
largest first, offsets ascending), so for a guest that does not write only alias copies
(the BIOS mapped twice) wait. A page that arrives before the file needs it waits in
memory up to ``buffer_bytes``, then in a 0600 spill file in ``spill_dir`` (unlinked as soon
as it is opened: nothing is left behind on any exit path). QEMU 7.2 sends a page the guest
writes at once and then continues its sweep *after* that page, wrapping around at the end
(ram.c ram_find_and_save_block), so on a busy guest a large part of RAM can wait.
p_offset is not always increasing with p_paddr (a >3.5 GiB guest's RAM above 4 GiB comes
before the BIOS).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import secrets
import struct
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memdump.errors import MigrationStreamError, StorageError
from memdump.pipeline import DumpSource

PAGE_SIZE = 4096  # TARGET_PAGE_SIZE on x86
EM_386 = 3
EM_X86_64 = 62

# migration/savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_SECTION_FOOTER = 0x7E

# migration/ram.c
RAM_SAVE_FLAG_FULL = 0x01  # obsolete, never sent
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
_FLAG_NAMES = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK (RDMA)",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}
_UNSUPPORTED_FLAGS = sum(_FLAG_NAMES)
_PAGE_MASK = ~(PAGE_SIZE - 1)

_BE64 = struct.Struct(">Q")
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NHDR = struct.Struct("<III")
_PN_XNUM = 0xFFFF
_SHSTRTAB = b"\0.shstrtab\0"
_NOTE_NAME = b"MEMDUMP\0"
NT_MEMDUMP_LIVE = 0x4C495645  # "LIVE"
NOTE_TEXT = (
    b"memdump live capture: guest RAM at the instant a QEMU background-snapshot migration "
    b"started, converted from the migration stream. No vCPU registers: QEMU's own notes "
    b"(NT_PRSTATUS, QEMU CPU state) are not in this core.\n"
)
_ZERO_PAGE = bytes(PAGE_SIZE)
_TAIL_KEEP = 8 << 20  # the end of the stream kept to find the vmdescription in
_RUN = 256  # pages: records in sweep order are taken up to 1 MiB at a time
_ZEROS = memoryview(bytes(_RUN * PAGE_SIZE))
_ZERO_CONT = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_PAGE_CONT = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_PAGE_RECORD = 8 + PAGE_SIZE  # a PAGE record of the block named last: its word, its page
_ZERO_RECORD = 8 + 1  # a ZERO record of the block named last: its word, the fill byte
_ONES = b"\x01" * _RUN
_NOTHING = bytes(_RUN)


def _common_prefix(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """The length of the longest common prefix of two byte strings of one length: slice
    comparisons (memcmp) halving the range, not a Python step per byte."""
    if a == b:
        return len(a)
    lo, hi = 0, len(a)  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _records_matching(buf: bytearray, pos: int, size: int, word: int, k: int) -> int:
    """How many of the ``k`` records of ``size`` bytes from buf[pos] are, one after
    another, the words ``word``, ``word`` + one page, ... (for a ZERO record, with fill
    byte 0). Each byte position of the words is compared as one column (a strided slice
    against the same column of the expected words), so a batch costs a few slices, not a
    Python step per record; a record that differs ends the batch where it is."""
    if k <= 0:
        return 0
    words = struct.pack(f">{k}Q", *range(word, word + k * PAGE_SIZE, PAGE_SIZE))
    span = (k - 1) * size + 1
    m = k
    for j in range(8):
        m = _common_prefix(buf[pos + j : pos + j + span : size], words[j : m * 8 : 8])
        if not m:
            return 0
        span = (m - 1) * size + 1
    if size == _ZERO_RECORD:
        m = _common_prefix(buf[pos + 8 : pos + 8 + span : size], _NOTHING[:m])
    return m


class LayoutError(MigrationStreamError):
    """The guest-physical memory layout (``info mtree -f``) cannot be mapped safely."""


@dataclass(frozen=True)
class RamSegment:
    """One PT_LOAD of the core."""

    phys_start: int  # guest-physical address
    size: int  # bytes
    block: str  # memory region name (the RAMBlock idstr, or its last "/" component)
    block_offset: int  # offset of phys_start inside that block

    @property
    def phys_end(self) -> int:
        return self.phys_start + self.size


# "  0000000000000000-000000000009ffff (prio 0, ram): pc.ram @00000000000c0000 KVM": the
# name may hold spaces ("vga ioports remapped"); "@offset" when the range starts inside
# its region; then the accelerators that map the range (softmmu/memory.c
# mtree_print_flatview; only KVM implements has_memory in 7.2).
_RANGE = re.compile(
    r"^\s+([0-9a-f]{1,16})-([0-9a-f]{1,16}) \(prio (-?\d+), ([a-z/-]+)\): (.+?)"
    r"(?: @([0-9a-f]{1,16}))?((?: (?:KVM|HVF|WHPX|NVMM))*)\s*$"
)
_FLATVIEW = re.compile(r"^FlatView #\d+\s*$")
_AS = re.compile(r'^ AS "([^"]*)", root: (.*?)\s*$')
_ROOT = re.compile(r"^ Root memory region: (.*?)\s*$")
# What QEMU's mtree printer writes for a flat range (memory_region_type() or "rom" for a
# read-only range), and whether guest_phys_blocks_region_add keeps it: RAM and ROM, not a
# ram device (ramd), not nonvolatile (nv-), not a ROM device (romd: memory_region_is_ram
# is false) nor I/O.
_TYPES = {
    "ram": True,
    "rom": True,
    "nv-ram": False,
    "nv-rom": False,
    "ramd": False,
    "nv-ramd": False,
    "romd": False,
    "nv-romd": False,
    "i/o": False,
    "nv-i/o": False,
}


@dataclass(frozen=True)
class GuestLayout:
    """The PT_LOAD segments of the guest's core, in the order dump-guest-memory writes them."""

    segments: tuple[RamSegment, ...]

    @classmethod
    def from_mtree(cls, text: str) -> GuestLayout:
        """Parse HMP ``info mtree -f``: the flat view of address space "memory" (root
        "system"), merged as QEMU's ``guest_phys_blocks_region_add`` merges sections:
        physically adjacent and adjacent in the same region (same host mapping)."""
        views: list[tuple[list[str], list[tuple[int, str]]]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if _FLATVIEW.match(line):
                views.append(([], []))
            elif views:
                m = _AS.match(line)
                if m:
                    views[-1][0].append(m.group(1))
                else:
                    views[-1][1].append((lineno, line))
        chosen = [v for v in views if "memory" in v[0]]
        if len(chosen) != 1:
            raise LayoutError(
                f"`info mtree -f` output has {len(chosen)} flat views of address space "
                '"memory" (expected exactly one)',
                found=len(chosen),
            )
        segs: list[RamSegment] = []
        last_end = -1
        seen_range = False
        for lineno, line in chosen[0][1]:
            if not line.strip() or _ROOT.match(line):
                continue
            if line.strip() == "No rendered FlatView":
                continue
            m = _RANGE.match(line)
            if m is None:
                raise LayoutError(
                    f"`info mtree -f` line {lineno} is not a flat range: {line.strip()[:120]!r}",
                    line=lineno,
                )
            seen_range = True
            start, last = int(m.group(1), 16), int(m.group(2), 16)
            kind, name = m.group(4), m.group(5)
            offset = int(m.group(6), 16) if m.group(6) else 0
            if last < start or start <= last_end:
                raise LayoutError(
                    f"`info mtree -f` line {lineno}: range {start:#x}-{last:#x} overlaps or "
                    "is out of order",
                    line=lineno,
                )
            last_end = last
            if kind not in _TYPES:
                raise LayoutError(
                    f"`info mtree -f` line {lineno}: unknown region type {kind!r}",
                    line=lineno,
                    region_type=kind,
                )
            if not _TYPES[kind]:
                continue
            size = last - start + 1
            prev = segs[-1] if segs else None
            if (
                prev is not None
                and prev.phys_end == start
                and prev.block == name
                and prev.block_offset + prev.size == offset
            ):
                segs[-1] = RamSegment(prev.phys_start, prev.size + size, name, prev.block_offset)
            else:
                segs.append(RamSegment(start, size, name, offset))
        if not seen_range or not segs:
            raise LayoutError('`info mtree -f` shows no RAM in address space "memory"')
        return cls(tuple(segs))


def elf_machine_from_registers(text: str) -> int:
    """e_machine as QEMU's dump picks it (target/i386/arch_dump.c): EM_X86_64 when the
    first vCPU is in long mode (EFER.LMA), else EM_386; from HMP ``info registers``."""
    m = re.search(r"\bEFER=([0-9a-fA-F]+)", text)
    if m is None:
        raise LayoutError("`info registers` shows no EFER")
    return EM_X86_64 if int(m.group(1), 16) & (1 << 10) else EM_386


# -- the stream -------------------------------------------------------------------------


class _StreamHash(threading.Thread):
    """SHA-256 of the stream on its own thread (hashlib lets go of the GIL): on the
    converter's thread it cost a third of its time. At most ``_DEPTH`` chunks wait."""

    _DEPTH = 8

    def __init__(self) -> None:
        super().__init__(name="memdump-stream-sha", daemon=True)
        self._sha = hashlib.sha256()
        self._work: queue.Queue[bytes | None] = queue.Queue(self._DEPTH)

    def update(self, data: bytes) -> None:
        if not self.is_alive():
            self.start()
        self._work.put(data)

    def run(self) -> None:
        while (data := self._work.get()) is not None:
            self._sha.update(data)

    def hexdigest(self) -> str:
        if self.is_alive():
            self._work.put(None)
            self.join()
        return self._sha.hexdigest()

    def stop(self) -> None:
        """Drop what waits and end the thread (abort, error): never blocks the caller."""
        while self.is_alive():
            with contextlib.suppress(queue.Empty):
                self._work.get_nowait()
            with contextlib.suppress(queue.Full):
                self._work.put_nowait(None)
                self.join()


class _Reader:
    """Buffered, hashing reader over a DumpSource; knows its offset in the stream."""

    _CHUNK = 1 << 20

    def __init__(self, source: DumpSource) -> None:
        self.source = source
        self.sha = _StreamHash()
        self.buf = bytearray(self._CHUNK)
        self.start = 0
        self.end = 0
        self.consumed = 0  # stream offset of buf[start]
        self.total = 0  # bytes read from the source
        self.eof = False

    @property
    def offset(self) -> int:
        return self.consumed

    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes available at buf[start:]; False at the end of the stream."""
        while self.end - self.start < need:
            if self.eof:
                return False
            if self.start:
                rest = self.end - self.start
                self.buf[:rest] = self.buf[self.start : self.end]
                self.start, self.end = 0, rest
            if len(self.buf) - self.end < self._CHUNK // 4:
                self.buf.extend(bytes(max(need, self._CHUNK)))
            view = memoryview(self.buf)
            try:
                n = self.source.readinto(view[self.end :])
                if n:
                    self.sha.update(bytes(view[self.end : self.end + n]))
            finally:
                view.release()
            if not n:
                self.eof = True
            self.end += n
            self.total += n
        return True

    def read(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise MigrationStreamError(
                f"migration stream truncated at offset {self.consumed}: expected {n} bytes "
                f"({what}), got {self.end - self.start}",
                offset=self.consumed,
            )
        out = bytes(self.buf[self.start : self.start + n])
        self.start += n
        self.consumed += n
        return out

    def peek_byte(self) -> int | None:
        if not self._fill(1):
            return None
        return self.buf[self.start]

    def u8(self, what: str) -> int:
        if self.end - self.start < 1 and not self._fill(1):
            self.read(1, what)  # raises: truncated
        v = self.buf[self.start]
        self.start += 1
        self.consumed += 1
        return v

    def be32(self, what: str) -> int:
        return int.from_bytes(self.read(4, what), "big")

    def be64(self, what: str) -> int:
        if self.end - self.start < 8 and not self._fill(8):
            self.read(8, what)  # raises: truncated
        (v,) = _BE64.unpack_from(self.buf, self.start)
        self.start += 8
        self.consumed += 8
        return int(v)

    def string(self, what: str) -> str:
        n = self.u8(what)
        raw = self.read(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise MigrationStreamError(
                f"migration stream offset {self.consumed - n}: {what} is not ASCII: {raw[:64]!r}",
                offset=self.consumed - n,
            ) from None

    def drain(self, keep: int) -> tuple[int, bytes]:
        """Hash everything up to the end of the stream: the number of bytes, and the last
        ``keep`` of them."""
        n = 0
        last = bytearray()
        while self._fill(1):
            last += self.buf[self.start : self.end]
            if len(last) > 2 * keep:
                del last[:-keep]
            n += self.end - self.start
            self.consumed += self.end - self.start
            self.start = self.end
        return n, bytes(last[-keep:])


# Where a page waiting for its place in the file is (``_Block.slot``); >= 0: spill slot.
_NONE = -1  # not waiting (not arrived yet, or already written)
_IN_MEMORY = -2
_FILL = -3  # _FILL - byte: a page of one repeated byte (0: a zero page)


@dataclass
class _Block:
    idstr: str
    used_length: int
    index: int  # position in the sweep
    received: bytearray  # one byte per page: 1 once it arrived
    # Per page, how many PT_LOAD bytes ranges need it (0: dropped; 2: e.g. the BIOS, mapped
    # twice), its uses left while it waits, and where it waits (8 bytes a page: bounded
    # bookkeeping whatever the guest writes ahead of the sweep).
    need: bytearray | None = None
    uses: bytearray | None = None
    slot: array[int] | None = None


class _Spill:
    """Pages waiting in a private file: created O_EXCL 0600 and unlinked at once (the open
    descriptor keeps it), so no path on any exit leaves it behind."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f".memdump-live-{secrets.token_hex(8)}.spill"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd: int | None = None
        try:
            self.fd = os.open(self.path, flags, 0o600)
            os.unlink(self.path)
        except OSError as exc:
            self.close()
            raise self._error(exc) from exc
        self.free: list[int] = []
        self.slots = 0
        self.used = 0
        self.peak = 0

    def _error(self, exc: OSError) -> StorageError:
        why = "no space left" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return StorageError(
            f"live capture spill file {self.path}: {why}", path=str(self.path), errno=exc.errno
        )

    def put(self, data: bytes) -> int:
        slot = self.free.pop() if self.free else self._grow()
        try:
            if os.pwrite(self._fd(), data, slot * PAGE_SIZE) != PAGE_SIZE:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            raise self._error(exc) from exc
        self.used += 1
        self.peak = max(self.peak, self.used)
        return slot

    def _grow(self) -> int:
        self.slots += 1
        return self.slots - 1

    def _fd(self) -> int:
        if self.fd is None:
            raise MigrationStreamError("spill file used after it was closed")
        return self.fd

    def read(self, slot: int) -> bytes:
        try:
            data = os.pread(self._fd(), PAGE_SIZE, slot * PAGE_SIZE)
        except OSError as exc:
            raise self._error(exc) from exc
        if len(data) != PAGE_SIZE:
            raise MigrationStreamError("spill file lost a page", slot=slot)
        return data

    def take(self, slot: int) -> bytes:
        data = self.read(slot)
        self.free.append(slot)
        self.used -= 1
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _Piece:
    """One PT_LOAD's bytes in the file: block bytes [block_offset, +size)."""

    segment: int
    block: _Block
    block_offset: int
    size: int
    file_offset: int = 0


class LiveCoreSource:
    """A :class:`memdump.pipeline.DumpSource` producing the ELF core of a migration stream."""

    dump_format = "elf"

    def __init__(
        self,
        stream: DumpSource,
        layout: GuestLayout,
        *,
        spill_dir: Path,
        buffer_bytes: int = 64 << 20,
        machine: int = EM_X86_64,
    ) -> None:
        self.stream = stream
        self.layout = layout
        self.spill_dir = Path(spill_dir)
        self.buffer_bytes = buffer_bytes
        self.machine = machine
        self._reader = _Reader(stream)
        self._gen: Iterator[memoryview | bytes | int] | None = None
        self._chunk: memoryview = memoryview(b"")
        self._dest: memoryview | None = None  # readinto's view while the generator runs
        self._dest_at = 0
        self._finished = False
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._aborted = False
        self._spill: _Spill | None = None
        # Pages waiting in memory, (block index, page offset) -> data; at most buffer_bytes.
        self._store: dict[tuple[int, int], bytes] = {}
        self._waiting = 0
        self._hit: bytes | None = None
        self._mem = 0
        self._mem_peak = 0
        self._blocks: dict[str, _Block] = {}
        self._order: list[_Block] = []
        self._ram_section: int | None = None
        self._last_block: _Block | None = None
        self._ram_done = False
        self._want: tuple[int, int] | None = None
        self.machine_type: str | None = None
        self.counts = {
            "normal": 0,  # 4 KiB pages sent as data
            "zero": 0,  # sent as one fill byte
            "early": 0,  # arrived ahead of the file position (guest writes, aliases)
            "spilled": 0,  # of those, written to the spill file
            "dropped": 0,  # of blocks or offsets no PT_LOAD holds (ROMs, ACPI tables...)
        }
        self.tail_bytes = 0
        self.stream_bytes = 0
        self.stream_sha256 = ""

    # -- DumpSource -------------------------------------------------------------------

    def readinto(self, view: memoryview) -> int:
        if self._failed is not None:
            raise self._failed
        with self._lock:
            if self._aborted:
                raise MigrationStreamError("live capture aborted", offset=self._reader.offset)
            self._busy = True
        if self._gen is None:
            self._gen = self._produce()
        done = 0
        try:
            # Fill the whole view (many pages a call): the pipeline hands 4 MiB buffers.
            while done < len(view):
                if not self._chunk:
                    # The sweep's fast path (_run) writes straight into the caller's view.
                    self._dest, self._dest_at = view, done
                    try:
                        nxt = next(self._gen, None)
                    finally:
                        self._dest = None
                    if nxt is None:
                        break
                    if isinstance(nxt, int):
                        done += nxt
                        continue
                    self._chunk = memoryview(nxt)
                n = min(len(view) - done, len(self._chunk))
                view[done : done + n] = self._chunk[:n]
                self._chunk = self._chunk[n:]
                done += n
            return done
        except BaseException as exc:
            self._failed = exc
            self._cleanup()
            raise
        finally:
            with self._lock:
                self._busy = False
                if self._aborted:
                    self._cleanup()

    def close_ok(self) -> None:
        if self._failed is not None:
            raise self._failed
        if not self._finished:
            raise MigrationStreamError(
                "migration stream conversion did not reach its end",
                offset=self._reader.offset,
            )
        self.stream.close_ok()

    def abort(self) -> None:
        """Stop the producer; may come from another thread (the pipeline's deadline) while
        readinto runs: then the reading thread drops the spill file when it returns, never
        closing a descriptor under it."""
        try:
            self.stream.abort()
        finally:
            with self._lock:
                self._aborted = True
                if not self._busy:
                    self._cleanup()

    @property
    def pause_window(self) -> Any:
        return getattr(self.stream, "pause_window", None)

    @property
    def staging(self) -> Any:
        return getattr(self.stream, "staging", "fifo")

    @property
    def live(self) -> dict[str, Any]:
        return {
            "mode": "live",
            "stream_sha256": self.stream_sha256,
            "stream_bytes": self.stream_bytes,
            "machine_type": self.machine_type,
            "pages": dict(self.counts),
            "buffer_peak_bytes": self._mem_peak,
            "spill_peak_bytes": self._spill.peak * PAGE_SIZE if self._spill else 0,
            **getattr(self.stream, "live", {}),
        }

    def _cleanup(self) -> None:
        self._reader.sha.stop()
        if self._spill is not None:
            self._spill.close()
        self._store.clear()
        self._mem = 0

    # -- conversion -------------------------------------------------------------------

    def _produce(self) -> Iterator[memoryview | bytes | int]:
        r = self._reader
        self._read_header()
        pieces = self._plan()
        yield self._elf_head(pieces)
        for piece in pieces:
            yield from self._piece_bytes(piece)
        while not self._ram_done:
            self._record()
        self._check_complete()
        # RAM is whole: the stream's producer (the hypervisor script) need not be waited
        # for at the last byte, only in close_ok, which the pipeline calls once the file
        # is written (its tail then runs beside the pipeline's). Should the device state
        # be cut, the script's own error comes first: it says why.
        defer_end = getattr(self.stream, "defer_end", None)
        if defer_end is not None:
            defer_end()
        tail_at = r.offset
        self.tail_bytes, last = r.drain(_TAIL_KEEP)
        try:
            self._check_tail(tail_at, last)
        except MigrationStreamError:
            if defer_end is not None:
                self.stream.close_ok()
            raise
        self.stream_bytes = r.total
        self.stream_sha256 = r.sha.hexdigest()
        self._finished = True
        self._cleanup()
        yield _SHSTRTAB

    def _err(self, msg: str, at: int | None = None, **fields: Any) -> MigrationStreamError:
        off = self._reader.offset if at is None else at
        return MigrationStreamError(f"migration stream offset {off}: {msg}", offset=off, **fields)

    def _read_header(self) -> None:
        r = self._reader
        magic = r.be32("file magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._err(f"not a QEMU migration stream (magic {magic:#010x})", at=0)
        version = r.be32("file version")
        if version != QEMU_VM_FILE_VERSION:
            raise self._err(f"unsupported stream version {version}", at=4)
        if r.peek_byte() == QEMU_VM_CONFIGURATION:
            r.u8("section type")
            n = r.be32("configuration length")
            if n > 255:
                raise self._err(f"machine type name of {n} bytes")
            self.machine_type = r.read(n, "machine type").decode("ascii", "replace")
            self._subsections("configuration")
        at = r.offset
        kind = r.u8("section type")
        if kind != QEMU_VM_SECTION_START:
            raise self._err(f"expected the RAM section's start, found section type {kind:#x}", at)
        section_id, idstr = self._section_header(at)
        if idstr != "ram":
            raise self._err(f"unsupported iterable section {idstr!r} (only RAM is)", at)
        self._ram_section = section_id
        self._ram_setup()
        self._footer()
        self._next_section()

    def _subsections(self, parent: str) -> None:
        r = self._reader
        while r.peek_byte() == QEMU_VM_SUBSECTION:
            at = r.offset
            r.u8("subsection")
            name = r.string("subsection name")
            version = r.be32("subsection version")
            if name == "configuration/target-page-bits" and version == 1:
                bits = r.be32("target page bits")
                if bits != 12:
                    raise self._err(f"target page bits {bits} (expected 12)", at)
            elif name == "configuration/capabilities" and version == 1:
                count = r.be32("capability count")
                caps = [r.string("capability") for _ in range(count)]
                if caps:
                    # Validated capabilities (x-ignore-shared, mapped-ram) change which
                    # pages are sent or where: not a stream this converter can read.
                    raise self._err(f"capabilities {caps} change the RAM format", at)
            elif name == "configuration/uuid" and version == 1:
                r.read(16, "uuid")
            else:
                raise self._err(f"unknown subsection {name!r} v{version} of {parent}", at)
            self._subsections(name)

    def _section_header(self, at: int) -> tuple[int, str]:
        r = self._reader
        section_id = r.be32("section id")
        idstr = r.string("section name")
        instance = r.be32("instance id")
        version = r.be32("version id")
        if idstr == "ram" and (instance != 0 or version != 4):
            raise self._err(f"RAM section instance {instance} version {version}", at)
        return section_id, idstr

    def _footer(self) -> None:
        r = self._reader
        if r.peek_byte() == QEMU_VM_SECTION_FOOTER:
            at = r.offset
            r.u8("footer")
            sid = r.be32("footer section id")
            if sid != self._ram_section:
                raise self._err(f"footer of section {sid} in RAM section {self._ram_section}", at)

    def _ram_setup(self) -> None:
        r = self._reader
        at = r.offset
        word = r.be64("RAM size")
        flags, total = word & ~_PAGE_MASK, word & _PAGE_MASK
        if flags != RAM_SAVE_FLAG_MEM_SIZE:
            raise self._err(f"RAM set-up starts with flags {flags:#x}, not MEM_SIZE", at)
        seen = 0
        while seen < total:
            at = r.offset
            idstr = r.string("RAM block name")
            used = r.be64("RAM block length")
            if idstr in self._blocks or not idstr:
                raise self._err(f"RAM block {idstr!r} listed twice or unnamed", at)
            if used % PAGE_SIZE or used == 0:
                raise self._err(f"RAM block {idstr!r} has length {used:#x}", at)
            blk = _Block(idstr, used, len(self._order), bytearray(used // PAGE_SIZE))
            self._blocks[idstr] = blk
            self._order.append(blk)
            seen += used
        if seen != total:
            raise self._err(f"RAM blocks add up to {seen:#x}, the stream said {total:#x}")
        at = r.offset
        eos = r.be64("end of RAM set-up")
        if eos != RAM_SAVE_FLAG_EOS:
            raise self._err(f"RAM set-up ends with {eos:#x}, not EOS", at)

    def _resolve(self, name: str) -> _Block:
        """A memory region's name -> its RAMBlock: same idstr, or a device's block
        ("<qdev path>/<name>")."""
        if name in self._blocks:
            return self._blocks[name]
        found = [b for b in self._order if b.idstr.endswith("/" + name)]
        if len(found) != 1:
            raise LayoutError(
                f"memory region {name!r} matches {len(found)} RAM blocks of the stream "
                f"({', '.join(b.idstr for b in self._order)})",
                region=name,
            )
        return found[0]

    def _plan(self) -> list[_Piece]:
        pieces: list[_Piece] = []
        for i, seg in enumerate(self.layout.segments):
            blk = self._resolve(seg.block)
            if (
                seg.size <= 0
                or seg.block_offset < 0
                or seg.block_offset + seg.size > blk.used_length
            ):
                raise LayoutError(
                    f"PT_LOAD at {seg.phys_start:#x} ({seg.size:#x} bytes at {seg.block_offset:#x}"
                    f" of {seg.block!r}) lies outside its RAM block ({blk.used_length:#x} bytes)",
                    region=seg.block,
                )
            pieces.append(_Piece(i, blk, seg.block_offset, seg.size))
        # Sweep order: the file is written in the order the stream brings the bytes.
        pieces.sort(key=lambda p: (p.block.index, p.block_offset, p.segment))
        for p in pieces:
            blk = p.block
            pages = blk.used_length // PAGE_SIZE
            if blk.need is None:
                blk.need = bytearray(pages)
                blk.uses = bytearray(pages)
                blk.slot = array("q", [_NONE]) * pages
            first = p.block_offset // PAGE_SIZE
            last = (p.block_offset + p.size - 1) // PAGE_SIZE + 1
            if not any(blk.need[first:last]):
                blk.need[first:last] = b"\x01" * (last - first)
            else:
                for i in range(first, last):
                    if blk.need[i] == 255:
                        raise LayoutError(f"a page of {blk.idstr!r} is mapped 255 times")
                    blk.need[i] += 1
        return pieces

    def _elf_head(self, pieces: list[_Piece]) -> bytes:
        """ELF header, section headers, program headers and the note; assigns each
        piece its file offset (in sweep order)."""
        nseg = len(self.layout.segments)
        phnum = 1 + nseg
        shnum = 2
        shoff = _EHDR.size
        phoff = shoff + shnum * _SHDR.size
        note_off = phoff + phnum * _PHDR.size
        note = self._note()
        data = note_off + len(note)
        pos = data
        for p in pieces:
            p.file_offset = pos
            pos += p.size
        strtab_off = pos
        ehdr = _EHDR.pack(
            b"\x7fELF\x02\x01\x01" + bytes(9),  # ELF64, LSB, EV_CURRENT
            4,  # ET_CORE
            self.machine,
            1,
            0,
            phoff,
            shoff,
            0,
            _EHDR.size,
            _PHDR.size,
            min(phnum, _PN_XNUM),
            _SHDR.size,
            shnum,
            shnum - 1,
        )
        sh0 = _SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum if phnum >= _PN_XNUM else 0, 0, 0)
        sh1 = _SHDR.pack(1, 3, 0, 0, strtab_off, len(_SHSTRTAB), 0, 0, 0, 0)  # SHT_STRTAB
        phdrs = [_PHDR.pack(4, 0, note_off, 0, 0, len(note), len(note), 0)]  # PT_NOTE
        by_seg = {p.segment: p for p in pieces}
        for i, seg in enumerate(self.layout.segments):
            # dump-guest-memory with paging=false (dump/dump.c write_elf64_load): p_vaddr is
            # the virtual address, 0 without paging, hence p_paddr; p_flags 0, p_align 0.
            off = by_seg[i].file_offset
            phdrs.append(
                _PHDR.pack(1, 0, off, seg.phys_start, seg.phys_start, seg.size, seg.size, 0)
            )
        return ehdr + sh0 + sh1 + b"".join(phdrs) + note

    @staticmethod
    def _note() -> bytes:
        desc = NOTE_TEXT + bytes(-len(NOTE_TEXT) % 4)
        return _NHDR.pack(len(_NOTE_NAME), len(NOTE_TEXT), NT_MEMDUMP_LIVE) + _NOTE_NAME + desc

    def _piece_bytes(self, piece: _Piece) -> Iterator[memoryview | bytes | int]:
        blk = piece.block
        slots = blk.slot
        if slots is None:
            raise MigrationStreamError(f"no page map for {blk.idstr!r}")
        pos = piece.block_offset
        end = pos + piece.size
        while pos < end:
            page = pos & _PAGE_MASK
            lo = pos - page
            hi = min(PAGE_SIZE, end - page)
            idx = page // PAGE_SIZE
            if lo == 0 and slots[idx] == _NONE and self._last_block is blk:
                run = self._run(blk, idx, min(_RUN, (end - page) // PAGE_SIZE))
                if run:
                    yield run  # bytes written into readinto's view
                    pos = page + run
                    continue
            if lo == 0 and slots[idx] != _NONE and end - page >= 2 * PAGE_SIZE:
                # Pages that came early (after a write fault QEMU's sweep jumps ahead, so
                # half of RAM may wait): many at once, one chunk, zero pages not copied.
                got = self._waiting_run(blk, idx, min(_RUN, (end - page) // PAGE_SIZE))
                yield got
                pos = page + len(got)
                continue
            if slots[idx] == _NONE:
                # Not here yet: read the stream until it comes (usually the next record).
                self._want = (blk.index, page)
                self._hit = None
                while self._hit is None and slots[idx] == _NONE:
                    self._record()
                self._want = None
            if self._hit is not None:
                data, self._hit = self._hit, None
            else:
                data = self._take(blk, idx)
            yield data if lo == 0 and hi == PAGE_SIZE else memoryview(data)[lo:hi]
            pos = page + hi

    def _run(self, blk: _Block, idx: int, limit: int) -> int:
        """Fast path for the bulk of the stream: the records of pages idx, idx+1, ... of the
        block just named (ZERO with fill 0, or PAGE), taken straight from the read buffer
        while each is the very page the file needs next and needed once, and written
        straight into readinto's view (as many as fit in it, at most ``limit``). The
        records are checked a batch at a time (:func:`_records_matching`), so that per page
        only the one memcpy costs Python: this loop is the converter's cost per page. The
        number of bytes written (0: nothing here for it; anything else is left to
        _record, which parses and checks it in full)."""
        dest = self._dest
        if dest is None:
            return 0
        at0 = self._dest_at
        limit = min(limit, (len(dest) - at0) // PAGE_SIZE)
        r = self._reader
        if limit <= 0:
            return 0
        if r.end - r.start < _PAGE_RECORD:
            r._fill(_PAGE_RECORD)
        need, received = blk.need, blk.received
        if need is None:
            return 0
        # Only pages needed once and not here yet: a page that came early waits elsewhere.
        limit = _common_prefix(need[idx : idx + limit], _ONES[:limit])
        limit = _common_prefix(received[idx : idx + limit], _NOTHING[:limit])
        buf, pos, stop = r.buf, r.start, r.end
        src = memoryview(buf)
        n = normal = 0
        at = at0
        try:
            while n < limit:
                word = (idx + n) * PAGE_SIZE
                k = min(limit - n, (stop - pos) // _PAGE_RECORD)
                m = _records_matching(buf, pos, _PAGE_RECORD, word | _PAGE_CONT, k)
                if m:
                    for p in range(pos + 8, pos + 8 + m * _PAGE_RECORD, _PAGE_RECORD):
                        dest[at : at + PAGE_SIZE] = src[p : p + PAGE_SIZE]
                        at += PAGE_SIZE
                    pos += m * _PAGE_RECORD
                    normal += m
                    n += m
                    continue
                k = min(limit - n, (stop - pos) // _ZERO_RECORD)
                m = _records_matching(buf, pos, _ZERO_RECORD, word | _ZERO_CONT, k)
                if not m:
                    break
                # The caller's buffer is reused: zero pages are written too.
                dest[at : at + m * PAGE_SIZE] = _ZEROS[: m * PAGE_SIZE]
                at += m * PAGE_SIZE
                pos += m * _ZERO_RECORD
                n += m
        finally:
            src.release()
        received[idx : idx + n] = _ONES[:n]
        self.counts["zero"] += n - normal
        self.counts["normal"] += normal
        r.consumed += pos - r.start
        r.start = pos
        return at - at0

    def _waiting_run(self, blk: _Block, idx: int, limit: int) -> memoryview:
        """Pages idx, idx+1, ... that wait (slot set), up to ``limit``, as one chunk."""
        slots = blk.slot
        if slots is None:
            raise MigrationStreamError(f"no page map for {blk.idstr!r}")
        n = 0
        while n < limit and slots[idx + n] != _NONE:
            n += 1
        out = bytearray(n * PAGE_SIZE)  # zero-filled: zero pages need no copy
        for k in range(n):
            data = self._take(blk, idx + k)
            if data is not _ZERO_PAGE:
                out[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] = data
        return memoryview(out)

    def _take(self, blk: _Block, idx: int) -> bytes:
        """A waiting page, for one of its uses."""
        if blk.slot is None or blk.uses is None:
            raise MigrationStreamError(f"no page map for {blk.idstr!r}")
        where = blk.slot[idx]
        blk.uses[idx] -= 1
        last = blk.uses[idx] == 0
        if last:
            blk.slot[idx] = _NONE
            self._waiting -= 1
        if where == _IN_MEMORY:
            key = (blk.index, idx * PAGE_SIZE)
            if last:
                self._mem -= PAGE_SIZE
                return self._store.pop(key)
            return self._store[key]
        if where <= _FILL:
            return _ZERO_PAGE if where == _FILL else bytes([_FILL - where]) * PAGE_SIZE
        if self._spill is None:
            raise MigrationStreamError("a spilled page without a spill file")
        return self._spill.take(where) if last else self._spill.read(where)

    def _put(self, blk: _Block, page: int, value: bytes | int, at: int) -> None:
        """A page from the stream: ``value`` its bytes, or the byte a ZERO record fills it
        with."""
        idx = page // PAGE_SIZE
        if page >= blk.used_length:
            raise self._err(
                f"page at {page:#x} of RAM block {blk.idstr!r} lies past its end "
                f"({blk.used_length:#x})",
                at,
                block=blk.idstr,
            )
        if blk.received[idx]:
            raise self._err(
                f"page at {page:#x} of RAM block {blk.idstr!r} sent twice", at, block=blk.idstr
            )
        blk.received[idx] = 1
        uses = blk.need[idx] if blk.need is not None else 0
        if not uses:
            self.counts["dropped"] += 1
            return
        if self._want == (blk.index, page):
            if uses == 1:  # the page the file needs next: no waiting
                if isinstance(value, int):
                    value = _ZERO_PAGE if value == 0 else bytes([value]) * PAGE_SIZE
                self._hit = value
                return
        else:
            self.counts["early"] += 1
        if blk.slot is None or blk.uses is None:
            raise MigrationStreamError(f"no page map for {blk.idstr!r}")
        blk.uses[idx] = uses
        self._waiting += 1
        if isinstance(value, int):
            blk.slot[idx] = _FILL - value
        elif self._mem + PAGE_SIZE <= self.buffer_bytes:
            self._store[(blk.index, page)] = value
            self._mem += PAGE_SIZE
            self._mem_peak = max(self._mem_peak, self._mem)
            blk.slot[idx] = _IN_MEMORY
        else:
            if self._spill is None:
                self._spill = _Spill(self.spill_dir)
            blk.slot[idx] = self._spill.put(value)
            self.counts["spilled"] += 1

    def _record(self) -> None:
        """Parse one RAM record (or a section boundary). Raises if RAM has ended."""
        r = self._reader
        if self._ram_done:
            raise self._missing()
        at = r.offset
        word = r.be64("RAM page header")
        flags, addr = word & ~_PAGE_MASK, word & _PAGE_MASK
        if flags & RAM_SAVE_FLAG_EOS:
            if flags != RAM_SAVE_FLAG_EOS or addr:
                raise self._err(f"RAM end-of-section word {word:#x} carries other flags", at)
            self._footer()
            self._next_section()
            return
        if flags & _UNSUPPORTED_FLAGS:
            name = next(n for bit, n in _FLAG_NAMES.items() if flags & bit)
            raise self._err(f"RAM record with flag {name} (not supported)", at, flags=flags)
        kind = flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE)
        if flags & ~(
            RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
        ) or kind not in (
            RAM_SAVE_FLAG_ZERO,
            RAM_SAVE_FLAG_PAGE,
        ):
            raise self._err(f"RAM record with unknown flags {flags:#x}", at, flags=flags)
        if flags & RAM_SAVE_FLAG_CONTINUE:
            blk = self._last_block
            if blk is None:
                raise self._err("RAM record continues a block but none was named", at)
        else:
            name_at = r.offset
            idstr = r.string("RAM block name")
            found = self._blocks.get(idstr)
            if found is None:
                raise self._err(f"RAM record for unknown block {idstr!r}", name_at)
            blk = self._last_block = found
        if kind == RAM_SAVE_FLAG_ZERO:
            fill = r.u8("zero page fill byte")
            self.counts["zero"] += 1
            self._put(blk, addr, fill, at)
        else:
            data = r.read(PAGE_SIZE, "RAM page")
            self.counts["normal"] += 1
            self._put(blk, addr, data, at)

    def _next_section(self) -> None:
        """After a RAM section's EOS and footer: another RAM part, or the device state."""
        r = self._reader
        at = r.offset
        kind = r.peek_byte()
        if kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            r.u8("section type")
            sid = r.be32("section id")
            if sid != self._ram_section:
                raise self._err(
                    f"section {sid} in the RAM phase (an iterable section other than RAM)",
                    at,
                    section_id=sid,
                )
            return
        if kind in (QEMU_VM_SECTION_FULL, QEMU_VM_EOF):
            # The device state a background snapshot saved before RAM, then EOF and the
            # vmdescription: hashed, not parsed.
            self._ram_done = True
            return
        if kind is None:
            raise self._err("migration stream truncated after a RAM section")
        raise self._err(
            f"unknown section type {kind:#x} after a RAM section", at, section_type=kind
        )

    def _missing(self) -> MigrationStreamError:
        for seg in self.layout.segments:
            blk = self._resolve(seg.block)
            first = seg.block_offset // PAGE_SIZE
            last = (seg.block_offset + seg.size - 1) // PAGE_SIZE
            for i in range(first, last + 1):
                if not blk.received[i]:
                    phys = seg.phys_start + i * PAGE_SIZE - seg.block_offset
                    return self._err(
                        f"RAM ended without page {i * PAGE_SIZE:#x} of block {blk.idstr!r} "
                        f"(guest-physical {max(phys, seg.phys_start):#x})",
                        block=blk.idstr,
                    )
        return self._err("RAM ended before the core was complete")

    def _check_tail(self, tail_at: int, last: bytes) -> None:
        """The device state is not parsed, but its end is known: QEMU_VM_EOF, then the
        vmdescription (QEMU_VM_VMDESCRIPTION, be32 length, JSON) that ends the stream (sent
        unless the machine suppresses it; x86 machines do not). A stream cut anywhere after
        RAM lacks it."""
        end = len(last)
        p = last.rfind(bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]))
        while p >= 0:
            if p + 6 <= end and int.from_bytes(last[p + 2 : p + 6], "big") == end - p - 6:
                try:
                    desc = json.loads(last[p + 6 :])
                except ValueError:
                    desc = None
                if isinstance(desc, dict) and "devices" in desc:
                    if desc.get("page_size", PAGE_SIZE) != PAGE_SIZE:
                        raise self._err(f"vmdescription page size {desc.get('page_size')}")
                    return
            p = last.rfind(bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]), 0, p)
        raise self._err(
            f"the device state after RAM (from offset {tail_at}, {self.tail_bytes} bytes) does "
            "not end with QEMU's vmdescription: stream truncated",
            at=tail_at + self.tail_bytes,
        )

    def _check_complete(self) -> None:
        if self._waiting:
            raise self._err(f"{self._waiting} pages were received but never written")
