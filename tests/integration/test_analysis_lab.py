"""Volatility 3 on real lab dumps: the ELF layer stacks, every marker reads back at its
guest-physical address through Volatility, the record and manifest say "passed"; a
corrupted dump fails the check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memdump.analysis import analyze
from memdump.capture import capture
from memdump.hypervisors import Driver
from memdump.manifest import manifest_path
from memdump.settings import Settings
from tests.helpers.lab import layout

pytestmark = pytest.mark.lab


def test_lab_dump_passes_with_every_marker(
    driver: Driver, settings: Settings, lab_dir: Path, tmp_path: Path
) -> None:
    cap = capture(driver, driver.resolve("vm-web-01"), settings)
    rec = cap.record
    assert rec.analysis == "passed"
    m = json.loads(manifest_path(Path(rec.dump_path)).read_text())["analysis"]
    assert m["status"] == "passed" and m["layer"] == "Elf64Layer"
    # Guest RAM plus what QEMU dumps besides it (the BIOS ROM of the pc machine).
    ram = layout(lab_dir, "vm-web-01")["memory_bytes"]
    assert ram <= m["physical_bytes"] <= ram + (1 << 20)
    assert m["pages_checked"] >= 32 and m["volatility_version"]

    markers = {
        mk["addr"]: bytes.fromhex(mk["hex"]) for mk in layout(lab_dir, "vm-web-01")["markers"]
    }
    full = analyze(Path(rec.dump_path), expect=markers, banners=False)
    assert full.status == "passed", full
    # A marker that is not where the layout says is caught (the check can fail).
    addr, data = next(iter(markers.items()))
    wrong = analyze(Path(rec.dump_path), expect={addr + 4096: data}, banners=False)
    assert wrong.status == "failed" and hex(addr + 4096) in wrong.detail.lower(), wrong

    bad = tmp_path / "corrupt.mem.gz"
    shutil.copy(rec.dump_path, bad)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    bad.write_bytes(raw)
    broken = analyze(bad, banners=False)
    assert broken.status == "failed", broken
    assert list(tmp_path.glob(".memdump-analysis-*")) == []  # the temp copy is gone
