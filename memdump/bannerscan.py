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

This module is plain bytes work: no Volatility. The PDB names are Volatility's
``constants.windows.KERNEL_MODULE_NAMES`` (tests/unit/test_volatility_api.py checks they
still are).
"""

from __future__ import annotations

import re

UNIX_PREFIXES = (b"Linux version ", b"Darwin Kernel Version ")
KERNEL_PDB_NAMES = (b"ntkrnlmp", b"ntkrnlpa", b"ntkrpamp", b"ntoskrnl")
# PdbSignatureScanner's pattern (volatility3 framework/symbols/windows/pdbutil.py): RSDS,
# GUID (16) and age (4), the module name, NUL.
_PDB = re.compile(
    b"RSDS.{20}(?:" + b"|".join(re.escape(n + b".pdb") for n in KERNEL_PDB_NAMES) + b")\x00",
    re.DOTALL,
)
_CARRY = 64  # longer than any match above
MAX_CANDIDATES = 4096


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
        found: list[int] = []
        for prefix in UNIX_PREFIXES:
            at = buf.find(prefix, 0, n)
            while at >= 0:
                found.append(base + at)
                at = buf.find(prefix, at + 1, n)
        for offset in sorted(found):
            self._add(self.unix, offset)
        for m in _PDB.finditer(buf, 0, n):
            self._add(self.windows, base + m.start())
        # The last bytes seen, across buffers however small they are.
        self._carry = (carry + bytes(buf[max(0, n - _CARRY) : n]))[-_CARRY:]

    def _add(self, where: list[int], offset: int) -> None:
        if len(where) >= MAX_CANDIDATES:
            self.overflow = True
            return
        where.append(offset)
