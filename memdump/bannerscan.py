"""Kernel banner candidates found in the dump's bytes as they stream past (issue 14, item 6).

The post-capture check (memdump.analysis) lists the image's kernel banners the way
Volatility 3's banners plugin does: Linux/macOS version strings, then Windows kernels' PDB
signatures. The plugin finds them by scanning the whole image, which for a fresh capture
means reading the whole ``.mem.gz`` back and inflating it. The pipeline's digest thread
already sees every raw byte in order, so it looks for them there instead, and the check
only confirms each candidate through Volatility's ELF layer (memdump.volatility
``banners_at``: the plugin's own acceptance rules and its own PdbSignatureScanner, on a
few bytes at each candidate's guest-physical address).

A candidate is only where a match *starts*: the plugin's literal prefixes
(``Linux version ``, ``Darwin Kernel Version ``) and its PDB signature (``RSDS``, 20
bytes, a kernel module name, ``.pdb``, NUL). Matches that straddle two buffers are found
through the last bytes of the previous one. Past ``MAX_CANDIDATES`` of either kind the
scan gives up (``overflow``) and the check scans the layer as the plugin does: a
candidate list is a shortcut, never a reason to miss a banner.

The scan runs on the digest thread, which every raw byte passes through: Python's
``bytes.find`` and ``re`` hold the GIL (about 1.4 s of CPU per GiB here, three passes), and
on a 2-core collector that time came straight out of the capture (the converter of a live
capture and the pipeline's other threads wait for the GIL). So, where the C library has it,
the search is libc's ``memmem`` through ctypes, which releases the GIL and is 2-3x faster
(about 0.6 s per GiB for the three needles); only its hits are looked at in Python.
Without it (or for small buffers) the same search runs with ``bytes.find``.

This module is plain bytes work: no Volatility. The PDB names are Volatility's
``constants.windows.KERNEL_MODULE_NAMES`` (tests/unit/test_volatility_api.py checks they
still are).
"""

from __future__ import annotations

import ctypes
import itertools
import re
from collections.abc import Iterator

UNIX_PREFIXES = (b"Linux version ", b"Darwin Kernel Version ")
KERNEL_PDB_NAMES = (b"ntkrnlmp", b"ntkrnlpa", b"ntkrpamp", b"ntoskrnl")
# PdbSignatureScanner's pattern (volatility3 framework/symbols/windows/pdbutil.py): RSDS,
# GUID (16) and age (4), the module name, NUL.
_PDB = re.compile(
    b"RSDS.{20}(?:" + b"|".join(re.escape(n + b".pdb") for n in KERNEL_PDB_NAMES) + b")\x00",
    re.DOTALL,
)
_PDB_MAGIC = b"RSDS"
_CARRY = 64  # longer than any match above
MAX_CANDIDATES = 4096
# Below this a ctypes call costs more than it saves.
_NATIVE_MIN = 4096


def _libc_memmem() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's memmem, called without the GIL (ctypes.CDLL releases it), or None."""
    try:
        fn = ctypes.CDLL(None).memmem  # the process's own symbols: libc is among them
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return fn


_memmem = _libc_memmem()


def starts(buf: bytearray | bytes, n: int, needle: bytes) -> Iterator[int]:
    """Offsets in ``buf[:n]`` where ``needle`` starts (overlapping ones too), in order."""
    if _memmem is not None and n >= _NATIVE_MIN and isinstance(buf, bytearray):
        # A view of the bytearray's own memory (no copy); it pins the buffer until the
        # generator ends.
        arr = (ctypes.c_char * n).from_buffer(buf)
        try:
            base = ctypes.addressof(arr)
            pos = 0
            while pos <= n - len(needle):
                hit = _memmem(base + pos, n - pos, needle, len(needle))
                if not hit:
                    return
                yield hit - base
                pos = hit - base + 1
        finally:
            del arr
        return
    at = buf.find(needle, 0, n)
    while at >= 0:
        yield at
        at = buf.find(needle, at + 1, n)


class BannerScan:
    """Fed every buffer of the raw image in order (``feed``); ``unix`` and ``windows``
    are the raw offsets (in the image, i.e. the ELF file) where candidates start."""

    def __init__(self) -> None:
        self.unix: list[int] = []
        self.windows: list[int] = []
        self.overflow = False
        self._carry = b""
        self._next = 0  # raw offset of the next byte expected

    def feed(self, buf: bytearray | bytes, n: int, base: int) -> None:
        """``buf[:n]`` holds raw bytes ``[base, base + n)``."""
        if base != self._next:
            raise ValueError(f"buffers out of order: {base} after {self._next}")
        self._next = base + n
        if self.overflow or n <= 0:
            return
        carry = self._carry
        if carry:
            # Matches that start in the previous buffer's tail and end in this one.
            joined = carry + bytes(buf[: min(n, _CARRY)])
            start = base - len(carry)
            for prefix in UNIX_PREFIXES:
                at = joined.find(prefix)
                while 0 <= at < len(carry):
                    if at + len(prefix) > len(carry):
                        self._add(self.unix, start + at)
                    at = joined.find(prefix, at + 1)
            for m in _PDB.finditer(joined, 0, len(joined)):
                if m.start() < len(carry) < m.end():
                    self._add(self.windows, start + m.start())
        # One more than fits: reaching it sets ``overflow``.
        room = MAX_CANDIDATES + 1 - len(self.unix)
        found = [
            at for prefix in UNIX_PREFIXES for at in itertools.islice(starts(buf, n, prefix), room)
        ]
        for at in sorted(found):
            self._add(self.unix, base + at)
        # Every RSDS, then the pattern at it (two matches cannot overlap: a kernel name
        # and ".pdb" never sit inside another match's GUID and age).
        for at in starts(buf, n, _PDB_MAGIC):
            if self.overflow:
                break
            if _PDB.match(buf, at, n) is not None:
                self._add(self.windows, base + at)
        # The last bytes seen, across buffers however small they are.
        self._carry = (carry + bytes(buf[max(0, n - _CARRY) : n]))[-_CARRY:]

    def _add(self, where: list[int], offset: int) -> None:
        if len(where) >= MAX_CANDIDATES:
            self.overflow = True
            return
        where.append(offset)
