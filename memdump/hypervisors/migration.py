"""What QEMU's final ``query-migrate`` says about a live capture, as the manifest's live
fields: one reading for every driver (libvirt through virsh, qemu and proxmox through
memdump's QMP client)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# query-migrate's times (milliseconds) -> the live fields' names
_TIMES = (
    ("downtime", "downtime_ms"),
    ("setup-time", "setup_time_ms"),
    ("total-time", "total_time_ms"),
)
_RAM = ("total", "transferred", "normal", "duplicate", "normal-bytes", "mbps")


def migration_fields(stats: Mapping[str, Any]) -> dict[str, Any]:
    """``migration_status``, ``downtime_ms``, ``setup_time_ms``, ``total_time_ms`` and
    ``ram`` (QEMU's counters) from a query-migrate reply's "return"; what is missing or
    not a number is left out."""
    out: dict[str, Any] = {}
    if stats.get("status"):
        out["migration_status"] = stats["status"]
    for key, name in _TIMES:
        if isinstance(stats.get(key), int):
            out[name] = stats[key]
    ram = stats.get("ram")
    if isinstance(ram, Mapping):
        out["ram"] = {k: ram[k] for k in _RAM if isinstance(ram.get(k), int | float)}
    return out
