"""The fleet of issue 17 (``lab/up --many N:MIB[:H]``, lab/many.py) and what one run over
it must hold: every VM recorded exactly once, and the global and per-hypervisor capture
caps held throughout, judged from the records' start (``timestamp``) and end
(``timestamp`` + ``duration_sec``) times. One definition for tests/e2e/test_fleet.py and
benchmarks/fleet.py. No memdump import: the records are the API's JSON rows.

A record's interval lies inside the capture's concurrency slot (memdump.chain takes the
slot around the capture; the record's start and duration are taken inside it), so more
records overlapping than a cap allows means the cap did not hold.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# duration_sec has millisecond precision (the contract's "Durations"): an end may read up
# to half a millisecond late, so two intervals that overlap by less do not count.
ROUNDING = timedelta(seconds=0.0005)

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Span:
    vmid: str
    hypervisor: str
    start: datetime
    end: datetime


def spans(records: Iterable[Record]) -> list[Span]:
    out = []
    for r in records:
        start = datetime.fromisoformat(r["timestamp"])
        end = start + timedelta(seconds=float(r["duration_sec"]))
        out.append(Span(str(r["vmid"]), str(r.get("hypervisor") or ""), start, end))
    return out


def peak(group: Iterable[Span]) -> tuple[int, datetime | None, list[str]]:
    """The most intervals open at one instant, that instant and their VMs."""
    events: list[tuple[datetime, int, Span]] = []
    for s in group:
        events += [(s.start, 1, s), (max(s.start, s.end - ROUNDING), -1, s)]
    # At one instant ends come first: one capture ending as another starts is not two.
    events.sort(key=lambda e: (e[0], e[1]))
    open_: list[Span] = []
    best: tuple[int, datetime | None, list[str]] = (0, None, [])
    for when, step, s in events:
        if step < 0:
            open_.remove(s)
            continue
        open_.append(s)
        if len(open_) > best[0]:
            best = (len(open_), when, sorted(o.vmid for o in open_))
    return best


def cap_violations(
    records: Iterable[Record], *, global_cap: int, per_hypervisor_cap: int
) -> list[str]:
    """What broke the caps (empty: both held): the global cap over all records, the
    per-hypervisor cap over each hypervisor's (the records' ``hypervisor`` field)."""
    all_spans = spans(records)
    out = []
    n, when, vms = peak(all_spans)
    if n > global_cap:
        out.append(f"global cap {global_cap}: {n} captures at once at {when}: {vms}")
    for hv in sorted({s.hypervisor for s in all_spans}):
        n, when, vms = peak(s for s in all_spans if s.hypervisor == hv)
        if n > per_hypervisor_cap:
            out.append(
                f"hypervisor {hv!r} cap {per_hypervisor_cap}: {n} captures at once at {when}: {vms}"
            )
    return out


def recorded_once(records: Iterable[Record], expected: Iterable[str]) -> list[str]:
    """What is wrong with "every VM of ``expected`` recorded exactly once" (empty: all
    right): VMs without a record, VMs with more than one, records of other VMs."""
    want = set(expected)
    seen: dict[str, int] = {}
    for r in records:
        seen[str(r["vmid"])] = seen.get(str(r["vmid"]), 0) + 1
    out = []
    if missing := sorted(want - set(seen)):
        out.append(f"{len(missing)} VM(s) without a record: {missing}")
    if twice := sorted(v for v, k in seen.items() if k > 1):
        out.append(f"{len(twice)} VM(s) recorded more than once: {twice}")
    if other := sorted(set(seen) - want):
        out.append(f"{len(other)} record(s) of VMs not in the fleet: {other}")
    return out


def guest_names(n: int) -> list[str]:
    """The fleet's guests, as lab/many.py names them."""
    width = max(3, len(str(n)))
    return [f"vm-many-{i:0{width}d}" for i in range(1, n + 1)]


# --- the fleet in the lab ------------------------------------------------------------


def lab_dir() -> Path:
    return Path(os.environ.get("MEMDUMP_LAB_DIR") or REPO / ".lab")


def inventory() -> Path:
    return lab_dir() / "inventory-many.yaml"


def _lab(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(REPO / "lab" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"lab/{' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def current() -> tuple[int, int, int] | None:
    """(N, MIB, H) of the fleet lab/up --many left, None if there is none. A fleet with a
    guest stopped, or of mixed sizes, counts as what lab/up --many would make of it."""
    out = subprocess.run(
        [sys.executable, str(REPO / "lab" / "many.py"), "list", "--state", str(lab_dir())],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if not rows:
        return None
    inv = inventory().read_text() if inventory().is_file() else ""
    hvs = len(re.findall(r"^\s*- name: lab-many-", inv, re.M)) or 1
    mibs = [int(r[3]) for r in rows if r[3].isdigit()]  # "?" for a stopped guest
    return len(rows), max(mibs, default=16), hvs


def up(n: int, mib: int = 16, hypervisors: int = 1) -> Path:
    """``lab/up --many N:MIB:H`` (exactly these guests; ~0.25 s a guest to start, ~1 s if
    all are up); the inventory whose "all" is the fleet."""
    _lab("up", "--many", f"{n}:{mib}:{hypervisors}", timeout=120 + 2 * n)
    return inventory()


@contextmanager
def restored(keep: bool = False) -> Iterator[tuple[int, int, int] | None]:
    """Whatever the block does to the fleet, it is as it was found afterwards: brought
    back to the same N:MIB:H, or stopped with ``lab/down --many`` if there was none
    (unless ``keep``). Yields the fleet found."""
    before = current()
    try:
        yield before
    finally:
        if not keep:
            if before is None:
                _lab("down", "--many", timeout=300)
            elif current() != before:
                up(*before)
