"""Small recorded chunked dumps for the verify and diff tests (issue 14, items 4 and 5): a
synthetic ELF core (tests.helpers.elfgen) written with memdump.chunkedgz's own writer, its
manifest (with ``output.chunks``) beside it, named the way memdump names a dump, and its
record. Also the older single-stream kind, for "old dumps still verify"."""

from __future__ import annotations

import hashlib
import secrets
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memdump import manifest
from memdump.chunkedgz import compress_bytes, read_index
from memdump.elfcore import PT_LOAD, parse_core
from memdump.records.model import DumpRecord
from memdump.settings import Settings
from tests.helpers.elfgen import make_core

KiB = 1 << 10
CHUNK = 64 * KiB  # the format's smallest chunk: many chunks from a small image
# Guest RAM as QEMU lays it out, shrunk: two blocks with a hole between.
LOW = 0x0
HIGH = 0x100000


@dataclass(frozen=True)
class Made:
    path: Path
    raw: bytes
    row: dict[str, Any]  # the record, as /records shows it
    record: DumpRecord


def guest_ram(seed: int, low: int = 512 * KiB, high: int = 768 * KiB) -> list[tuple[int, bytes]]:
    """Two RAM blocks of deterministic, half-compressible bytes."""

    def block(size: int, s: int) -> bytes:
        out = bytearray()
        h = hashlib.sha256(str(s).encode()).digest()
        while len(out) < size:
            h = hashlib.sha256(h).digest()
            out += h + bytes(32)
        return bytes(out[:size])

    return [(LOW, block(low, seed)), (HIGH, block(high, seed + 1))]


def core(blocks: list[tuple[int, bytes]]) -> bytes:
    return make_core(blocks)


def file_offset(raw: bytes, paddr: int) -> int:
    """Where guest-physical ``paddr`` lies in the raw image."""
    layout = parse_core(raw)
    assert layout is not None
    off = layout.offset_of(paddr)
    assert off is not None, hex(paddr)
    return off


def loads(raw: bytes) -> list[tuple[int, int, int]]:
    """(file offset, paddr, size) of each PT_LOAD."""
    layout = parse_core(raw)
    assert layout is not None
    return [(s.offset, s.paddr, s.filesz) for s in layout.segments if s.type == PT_LOAD]


def guest_of(raw: bytes, lo: int, hi: int) -> list[tuple[int, int]]:
    """Guest-physical ranges of raw bytes [lo, hi), worked out here from the PT_LOADs."""
    out = []
    for off, paddr, size in loads(raw):
        a, b = max(lo, off), min(hi, off + size)
        if a < b:
            out.append((paddr + a - off, paddr + b - off))
    return out


def write_dump(
    dump_dir: Path,
    raw: bytes,
    *,
    vmid: str = "vm1",
    hypervisor: str = "hv",
    when: datetime | None = None,
    chunked: bool = True,
    chunk_size: int = CHUNK,
    with_chunks_section: bool = True,
    settings: Settings | None = None,
) -> Made:
    """``raw`` written as a dump named the way memdump names one, with its manifest
    (signed by the collector key of ``settings``, when given: memdump.signing)."""
    when = when or datetime.now(UTC)
    dump_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{hypervisor}_{vmid}_{when:%Y%m%dT%H%M%S.%fZ}_{secrets.token_hex(3)}.mem.gz"
    path = dump_dir / name
    if chunked:
        gz = compress_bytes(raw, chunk_size=chunk_size)
    else:
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        gz = c.compress(raw) + c.flush()
    path.write_bytes(gz)
    raw_sha, gz_sha = hashlib.sha256(raw).hexdigest(), hashlib.sha256(gz).hexdigest()
    doc: dict[str, Any] = {
        "manifest_version": 3,
        "output": {"file": name, "raw_sha256": raw_sha, "gz_sha256": gz_sha},
    }
    if chunked and with_chunks_section:
        with open(path, "rb") as f:
            index = read_index(f)
        assert index is not None
        doc["output"]["chunks"] = index.summary()  # where memdump.manifest puts it
    _, msha = manifest.write(path, doc, settings=settings)
    record = DumpRecord(
        when, vmid, vmid, raw_sha, 1.0, len(gz), 1, 1, 1, str(path), gz_sha, len(raw),
        hypervisor, manifest_sha256=msha, local_path=str(path),
    )  # fmt: skip
    return Made(path, raw, record.api_dict(), record)


def flip(path: Path, offset: int) -> None:
    """Flip one bit of the stored file at ``offset``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)
