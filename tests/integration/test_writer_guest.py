"""A live capture of a guest that writes across all its RAM (issue 12: the converter's
early-page buffer and spill file end to end; lab/writer.py).

The writer guest keeps storing its pass number into every 4 KiB page from 1 MiB to the end
of its RAM. Through the libvirt driver's live mode (open_dump(mode="live") + write_dump),
with a 1 MiB buffer so that early pages also go to the spill file:

- the guest wrote before, during (QEMU sent pages ahead of the sweep: the converter's
  ``pages.early`` > 0, and with the small buffer ``pages.spilled`` > 0) and after the
  capture, and ran throughout: running at the end, no migration active, the
  background-snapshot capability off, no spill file left;
- the image is complete (its ELF headers declare exactly its length, write_dump's check
  too) and one instant of the guest: every written page holds pass n up to some page and
  n - 1 after it, so no page was read at another time or put at another address by the
  buffer or the spill file.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memdump.hypervisors import Driver
from memdump.pipeline import write_dump
from tests.helpers.lab import virsh
from tests.helpers.writer_guest import (
    FIRST_ADDR,
    check_one_instant,
    pass_numbers,
    wait_pass_changes,
    writer_domain,
)

pytestmark = pytest.mark.lab

NAME = "wr-it-256"
MIB = 256


@pytest.fixture(scope="module")
def writer_vm(lab_dir: Path) -> Iterator[str]:
    with writer_domain(NAME, MIB) as name:
        yield name


def qmp(domain: str, command: str) -> Any:
    return json.loads(virsh("qemu-monitor-command", domain, json.dumps({"execute": command})))[
        "return"
    ]


def test_live_capture_of_a_writing_guest(
    writer_vm: str, libvirt_window_driver: Driver, tmp_path: Path
) -> None:
    wait_pass_changes(writer_vm, FIRST_ADDR)  # writing, and past its first pass
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    # 1 MiB of buffer: the early pages beyond it go to the spill file.
    live_kw: dict[str, Any] = {"mode": "live", "spill_dir": spill, "buffer_bytes": 1 << 20}
    src = libvirt_window_driver.open_dump(libvirt_window_driver.resolve(writer_vm), **live_kw)
    res = write_dump(src, tmp_path, "live.mem.gz")
    live: dict[str, Any] = src.live  # type: ignore[attr-defined]
    pages = live["pages"]
    print(f"writer guest live capture: pages {pages}")
    assert live["mode"] == "live"
    assert pages["early"] > 0, "no page came ahead of the sweep: the guest did not write"
    assert pages["spilled"] > 0, "early pages beyond the 1 MiB buffer did not go to the spill"
    assert list(spill.iterdir()) == []

    assert virsh("domstate", writer_vm).strip() == "running"
    assert qmp(writer_vm, "query-migrate").get("status", "none") in ("none", "completed")
    caps = qmp(writer_vm, "query-migrate-capabilities")
    assert not any(c["capability"] == "background-snapshot" and c["state"] for c in caps)
    wait_pass_changes(writer_vm, FIRST_ADDR)  # still writing

    raw = tmp_path / "live.mem"
    with gzip.open(res.path, "rb") as f, raw.open("wb") as out:
        shutil.copyfileobj(f, out, 4 << 20)
    assert raw.stat().st_size == res.raw_bytes
    n, k = check_one_instant(pass_numbers(raw, MIB << 20))
    print(f"one instant: pass {n} up to page {k}, {n - 1} after")
