"""Stored dumps for retention and location tests: a file named the way memdump names a
dump (or the older way), its manifest beside it, and the record that points at them."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from memdump.manifest import manifest_path
from memdump.records.model import DumpRecord


def stored(
    dump_dir: Path,
    vmid: str,
    when: datetime,
    size: int,
    *,
    hypervisor: str = "lab",
    collector: str = "",
    old_name: bool = False,
    **extras: Any,
) -> DumpRecord:
    """Write a dump of ``size`` bytes (+ manifest) into ``dump_dir`` and return its record.
    ``collector``: the collector holding it ("" = a record from before collectors were
    recorded, with dump_path only). ``old_name``: ``<vmid>_<epoch>.mem.gz``."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    # The names memdump writes, spelled out here so the tests do not take them on trust.
    name = (
        f"{vmid}_{int(when.timestamp())}.mem.gz"
        if old_name
        else f"{hypervisor}_{vmid}_{when:%Y%m%dT%H%M%S.%fZ}_{secrets.token_hex(3)}.mem.gz"
    )
    path = dump_dir / name
    path.write_bytes(b"x" * size)
    manifest_path(path).write_text("{}")
    sha = hashlib.sha256(f"{hypervisor}:{vmid}:{when.isoformat()}".encode()).hexdigest()
    rec = DumpRecord(
        when, vmid, vmid, sha, 1.0, size, 1, 2, 3, str(path), "0" * 64, size, hypervisor,
    )  # fmt: skip
    if collector:
        rec = dataclasses.replace(rec, collector=collector, local_path=str(path))
    return dataclasses.replace(rec, **extras) if extras else rec
