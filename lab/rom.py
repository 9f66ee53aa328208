#!/usr/bin/env python3
"""What the lab's BIOS generators (lab/counter.py, lab/writer.py) share: writing a ROM image
in place and their command line (--bios PATH, or --bios-dir DIR: a versioned file name, so
a new version is a new path and lab/up restarts the VMs that use it)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


def write_rom(path: Path, rom: bytes) -> None:
    """``rom`` at ``path``, replaced atomically; left alone if it holds those bytes."""
    if path.exists() and path.read_bytes() == rom:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(rom)
    # QEMU may run as an unprivileged user (libvirt-qemu).
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def rom_main(
    argv: list[str] | None, doc: str, kind: str, version: int, make: Callable[[], bytes]
) -> int:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--bios", type=Path, help=f"write the {kind} BIOS here")
    group.add_argument("--bios-dir", type=Path, help="write it in this directory, print its path")
    args = ap.parse_args(argv)
    if args.bios:
        write_rom(args.bios, make())
    else:
        path = args.bios_dir.resolve() / f"bios-{kind}-v{version}.bin"
        write_rom(path, make())
        print(path)
    return 0
