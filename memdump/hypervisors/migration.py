"""What QEMU's final ``query-migrate`` says about a live capture, as the manifest's live
fields: one reading for every driver (libvirt through virsh, qemu and proxmox through
memdump's QMP client); likewise the huge-page restore after it (sh/hugepages.pl, which
every driver's live side runs the same way) and the FIFO's reader (sh/fiforeader.pl)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from memdump.hypervisors.scripts import read


def _perl_program(name: str) -> str:
    """sh/NAME (a perl program run as `perl -e TEXT`) without its comment lines."""
    return "".join(
        ln for ln in read(name).splitlines(keepends=True) if not ln.lstrip().startswith("#")
    )


# The huge-page restore (HypervisorConfig.live_restore_huge_pages), run on the hypervisor
# as `perl -e HUGEPAGES scan|collapse ...`.
HUGEPAGES = _perl_program("hugepages.pl")
# The reader of a live capture's FIFO, which hands the stream on in large writes (QEMU's
# snapshot writes it 4 KiB at a time), run as `perl -e FIFO_READER [drain]` where the
# hypervisor has perl (cat otherwise).
FIFO_READER = _perl_program("fiforeader.pl")

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


# Why the huge-page restore did not run (live.sh's "unavailable WHY", hugepages.pl's
# exit statuses).
_HUGE_UNAVAILABLE = {
    "no-perl": "perl is missing on the hypervisor",
    "not-completed": "the capture did not complete",
    "3": "the QEMU process ended or is not the one scanned",
    "4": "the hypervisor's kernel has no process_madvise MADV_COLLAPSE (Linux >= 6.1)",
    "5": "the hypervisor user cannot read /proc/kpageflags (root needed)",
}


def huge_pages(line: str | None) -> dict[str, Any] | None:
    """The manifest's ``live.huge_pages`` from live.sh's ``memdump-live-hugepages`` line:
    the 2 MiB regions on huge pages before the capture, how many were put back after
    it, how many not, and how long that took; or why it did not run. None: not asked."""
    if line is None:
        return None
    m = re.fullmatch(r"(\d{1,9}) (\d{1,9}) (\d{1,9}) (\d{1,9})(?: ([A-Za-z0-9 ]{1,80}))?", line)
    if m:
        out: dict[str, Any] = {
            "regions_before": int(m.group(1)),
            "restored": int(m.group(2)),
            "not_restored": int(m.group(3)),
            "restore_ms": int(m.group(4)),
        }
        if m.group(5):
            out["error"] = m.group(5)
        return out
    why = line.removeprefix("unavailable ").strip()
    step, _, code = why.rpartition("-")
    reason = _HUGE_UNAVAILABLE.get(why) or _HUGE_UNAVAILABLE.get(code)
    if reason is None:
        reason = f"{step or why} failed (exit {code})" if code.isdigit() else "unknown"
    return {"unavailable": reason}
