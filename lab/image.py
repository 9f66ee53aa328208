#!/usr/bin/env python3
"""Deterministic guest-RAM content for the memdump lab.

Writes one raw image per guest-physical RAM region of an i440fx (`pc`) guest
plus a layout.json describing regions, a coarse block map and marker
addresses.  QEMU preloads the images with `-device loader,force-raw=on`, so a
memory dump of the (halted) guest can be checked byte for byte against what
this module says should be there.

Same name/seed + size -> same bytes, on any machine and Python >= 3.9
(random.Random seeded with a str is hashed with SHA-512, randbytes is stable).

Usage: image.py --name vm-web-01 --mib 256 --out DIR [--images DIR] [--seed N] [--force]
                [--counter]      (layout.json also describes lab/counter.py's pages)
                [--sparse]       (the markers only: one page image per marker, the rest of
                                  RAM zero; a large guest at the cost of a small one)
       image.py --bios PATH      (write the 64 KiB halt-forever BIOS)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

# Bump whenever the bytes produced for a given (seed, size) change, so cached
# images from an older generator are not silently reused.
GENERATOR_VERSION = 1

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4 * MiB
# Below 1 MiB lives legacy stuff (IVT/BDA, VGA hole, option ROM and BIOS
# shadows); keep clear of it so the loader never overlaps a ROM.
RAM_START = 1 * MiB
# i440fx splits RAM at 3 GiB once it no longer fits below the 3.5 GiB PCI hole
# (hw/i386/pc_piix.c: lowmem = 0xe0000000, gigabyte_align).
PC_LOWMEM_LIMIT = 0xE0000000
PC_LOWMEM_SPLIT = 0xC0000000
HIGHMEM_START = 0x1_0000_0000
# QEMU's loader reads an image with one read(2), which Linux caps just below
# 2 GiB, so RAM regions are split into several loader images of at most this.
MAX_IMAGE = 1 * GiB
MARKER_LEN = 64
MARKER_PREFIX = b"MEMDUMP-MARKER:"
# Fractions of blocks: incompressible / compressible / zero.
P_RANDOM = 0.40
P_TEXT = 0.35


def seed_for(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"memdump-lab:{name}".encode()).digest()[:8], "big")


def ram_regions(memory_bytes: int) -> list[tuple[int, int]]:
    """(guest-physical start, size) of loadable RAM, i.e. everything above 1 MiB."""
    if memory_bytes >= PC_LOWMEM_LIMIT:
        low, high = PC_LOWMEM_SPLIT, memory_bytes - PC_LOWMEM_SPLIT
    else:
        low, high = memory_bytes, 0
    if low <= RAM_START:
        raise ValueError("guest needs more than 1 MiB of RAM")
    regions = [(RAM_START, low - RAM_START)]
    if high:
        regions.append((HIGHMEM_START, high))
    return regions


def marker_bytes(name: str, seed: int, n: int) -> bytes:
    head = MARKER_PREFIX + name.encode()[:32] + b":%02d:" % n
    tail = hashlib.sha256(b"%d:%d" % (seed, n)).hexdigest().encode()
    return (head + tail)[:MARKER_LEN]


def marker_addrs(regions: list[tuple[int, int]], seed: int) -> list[int]:
    """At least 8 distinct 64-byte-aligned addresses: the first and last page of
    every region (edges are where off-by-one bugs in dump parsers live) plus
    evenly spread ones in between, each at a seeded offset inside its page."""
    rng = random.Random(f"{seed}:markers")
    want = 8 if len(regions) == 1 else 12
    total = sum(size for _, size in regions)
    pages: list[int] = []
    for start, size in regions:
        pages += [start + 0x1000, start + size - 0x1000]
    extra = want - len(pages)
    for i in range(1, extra + 1):
        # Map a fraction of the concatenated RAM back to a guest address.
        off = (total * i // (extra + 1)) & ~0xFFF
        for start, size in regions:
            if off < size:
                pages.append(start + off)
                break
            off -= size
    addrs = sorted({p + rng.randrange(0, 0x1000 // MARKER_LEN) * MARKER_LEN for p in pages})
    return addrs


def make_pool(seed: int) -> bytes:
    """~256 KiB of compressible filler: log lines interleaved with arrays of
    small fixed-size records, roughly what a guest's page cache and heap look
    like.  zlib level 1 squeezes this ~4-6x."""
    rng = random.Random(f"{seed}:pool")
    words = (
        "GET POST PUT DELETE /api/v1/items /api/v1/users /healthz /static/app.js /login "
        "/orders status=200 status=404 status=500 INFO WARN ERROR DEBUG nginx postgres "
        "redis worker connection accepted closed timeout retrying checkpoint vacuum "
        "user=alice user=bob user=carol session cache miss hit"
    ).split()
    hosts = [f"vm-{rng.randrange(100):02d}" for _ in range(8)]
    parts: list[bytes] = []
    size = 0
    ts = 1_700_000_000 + rng.randrange(10_000_000)
    rec_id = rng.randrange(1 << 20)
    while size < 256 * 1024:
        if rng.random() < 0.6:
            lines = []
            for _ in range(rng.randrange(20, 60)):
                ts += rng.randrange(0, 3)
                msg = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 10)))
                lines.append(
                    f"{ts}.{rng.randrange(1000):03d} {rng.choice(hosts)} "
                    f"app[{rng.randrange(1000, 1100)}]: {msg} "
                    f"id={rng.randrange(1 << 16)} bytes={rng.randrange(1 << 14)}\n"
                )
            chunk = "".join(lines).encode()
        else:
            recs = []
            for _ in range(rng.randrange(32, 128)):
                rec_id += 1
                recs.append(
                    rec_id.to_bytes(8, "little")
                    + (ts + rng.randrange(64)).to_bytes(8, "little")
                    + rng.randrange(16).to_bytes(4, "little")
                    + rng.choice(hosts).encode().ljust(20, b"\0")
                    + bytes(24)
                )
            chunk = b"".join(recs)
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def block_kind(seed: int, addr: int) -> str:
    x = random.Random(f"{seed}:kind:{addr}").random()
    return "random" if x < P_RANDOM else "text" if x < P_RANDOM + P_TEXT else "zero"


def block_data(kind: str, seed: int, addr: int, size: int, pool: bytes) -> bytes | None:
    """Content of one block, or None for zeros (left as a hole in the file)."""
    if kind == "zero":
        return None
    rng = random.Random(f"{seed}:data:{addr}")
    if kind == "random":
        return rng.randbytes(size)
    off = rng.randrange(len(pool))
    rotated = pool[off:] + pool[:off]
    head = b"== memdump-lab block %#x ==\n" % addr
    body = head + rotated * (size // len(rotated) + 1)
    return body[:size]


def write_halt_bios(path: Path) -> None:
    """64 KiB BIOS whose reset vector (0xFFFFFFF0 -> image offset 0xFFF0) is
    `cli; hlt; jmp $-3`: the vCPU parks forever without touching RAM, unlike
    SeaBIOS which would scribble over low memory and make dumps differ."""
    from rom import write_rom  # lab/rom.py, next to this file

    rom = bytearray(b"\xff" * 0x10000)
    rom[0xFFF0:0xFFF4] = bytes.fromhex("faf4ebfd")
    write_rom(path, bytes(rom))


def expected_layout(
    name: str, memory_bytes: int, seed: int, images: Path, sparse: bool = False
) -> dict:
    ram = ram_regions(memory_bytes)
    if sparse:
        # One page image per marker: QEMU's loader copies every image into guest RAM at
        # reset, so whole-RAM images of zeros would cost what seeded ones do.
        pages = sorted({a & ~0xFFF for a in marker_addrs(ram, seed)})
        files = [(a, 0x1000) for a in pages]
    else:
        files = [
            (a, min(MAX_IMAGE, start + size - a))
            for start, size in ram
            for a in range(start, start + size, MAX_IMAGE)
        ]
    return {
        "name": name,
        "memory_bytes": memory_bytes,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "machine": "pc",
        # Only in a sparse guest's layout: RAM is zero but for the markers' pages.
        **({"sparse": True} if sparse else {}),
        # Guest-physical RAM above 1 MiB as the machine maps it.
        "ram_regions": [{"addr": a, "size": s} for a, s in ram],
        # One loader image each; contiguous pieces of ram_regions.
        "regions": [
            {"addr": a, "size": s, "file": str(images / f"ram-{a:#011x}.bin")} for a, s in files
        ],
        "blocks": [],
        "markers": [],
    }


def cached(layout_path: Path, want: dict) -> dict | None:
    try:
        have = json.loads(layout_path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("name", "memory_bytes", "seed", "generator_version", "sparse", "ram_regions", "regions")
    if any(have.get(k) != want.get(k) for k in keys):
        return None
    for r in have["regions"]:
        try:
            if os.stat(r["file"]).st_size != r["size"]:
                return None
        except OSError:
            return None
    return have


def set_counter(layout_path: Path, layout: dict, counter: bool) -> dict:
    """A VM running lab/counter.py's BIOS: its layout.json says where the counter pages
    are ("counter"); any other VM's has no such key. Rewritten only when that changes."""
    import counter as counter_bios  # lab/counter.py, next to this file

    want = dict(counter_bios.LAYOUT) if counter else None
    if layout.get("counter") == want:
        return layout
    layout = dict(layout)
    if want is None:
        layout.pop("counter", None)
    else:
        layout["counter"] = want
    tmp_layout = layout_path.with_suffix(".json.tmp")
    tmp_layout.write_text(json.dumps(layout, indent=1) + "\n")
    os.chmod(tmp_layout, 0o644)
    os.replace(tmp_layout, layout_path)
    return layout


def generate(
    name: str,
    memory_bytes: int,
    seed: int,
    out: Path,
    images: Path,
    force: bool = False,
    counter: bool = False,
    sparse: bool = False,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    layout_path = out / "layout.json"
    layout = expected_layout(name, memory_bytes, seed, images, sparse)
    if not force:
        have = cached(layout_path, layout)
        if have is not None:
            return set_counter(layout_path, have, counter)
    # Invalidate first: a crash mid-generation must not leave a layout that
    # vouches for half-written images.
    layout_path.unlink(missing_ok=True)

    ram = [(r["addr"], r["size"]) for r in layout["ram_regions"]]
    markers = {a: marker_bytes(name, seed, n) for n, a in enumerate(marker_addrs(ram, seed))}
    pool = make_pool(seed)
    blocks = layout["blocks"]
    for region in layout["regions"]:
        start, size, path = region["addr"], region["size"], region["file"]
        end = start + size
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            addr = start
            while addr < end:
                # Blocks are aligned to guest-physical BLOCK boundaries so the
                # map reads the same whatever the region start is.
                bend = min(end, (addr // BLOCK + 1) * BLOCK)
                bsize = bend - addr
                kind = "zero" if sparse else block_kind(seed, addr)
                data = block_data(kind, seed, addr, bsize, pool)
                here = [a for a in markers if addr <= a < bend]
                if data is not None and here:
                    buf = bytearray(data)
                    for a in here:
                        buf[a - addr : a - addr + MARKER_LEN] = markers[a]
                    data = bytes(buf)
                if data is not None:
                    f.write(data)
                else:
                    # Sparse hole; QEMU reads zeros back.
                    for a in here:
                        f.seek(a - start)
                        f.write(markers[a])
                    f.seek(bend - start)
                if (
                    blocks
                    and blocks[-1]["kind"] == kind
                    and blocks[-1]["addr"] + blocks[-1]["size"] == addr
                ):
                    blocks[-1]["size"] += bsize
                else:
                    blocks.append({"addr": addr, "size": bsize, "kind": kind})
                addr = bend
            f.truncate(size)
        # QEMU may run as an unprivileged user (libvirt-qemu).
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    layout["markers"] = [{"addr": a, "hex": m.hex()} for a, m in sorted(markers.items())]
    tmp_layout = layout_path.with_suffix(".json.tmp")
    tmp_layout.write_text(json.dumps(layout, indent=1) + "\n")
    os.chmod(tmp_layout, 0o644)
    os.replace(tmp_layout, layout_path)
    return set_counter(layout_path, layout, counter)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name")
    ap.add_argument("--mib", type=int, help="guest RAM in MiB")
    ap.add_argument("--out", type=Path, help="directory for layout.json")
    ap.add_argument("--images", type=Path, help="directory for the RAM images (default: --out)")
    ap.add_argument("--seed", type=int, help="default: derived from --name")
    ap.add_argument("--force", action="store_true", help="regenerate even if cached")
    ap.add_argument("--bios", type=Path, help="only write the halt BIOS to this path")
    ap.add_argument(
        "--counter", action="store_true", help="the VM runs the counter BIOS (lab/counter.py)"
    )
    ap.add_argument("--sparse", action="store_true", help="zero RAM but for the markers")
    args = ap.parse_args(argv)
    if args.bios:
        write_halt_bios(args.bios)
        return 0
    if not (args.name and args.mib and args.out):
        ap.error("--name, --mib and --out are required")
    seed = args.seed if args.seed is not None else seed_for(args.name)
    images = (args.images or args.out).resolve()
    t0 = time.monotonic()
    layout = generate(
        args.name,
        args.mib * MiB,
        seed,
        args.out.resolve(),
        images,
        args.force,
        args.counter,
        args.sparse,
    )
    print(
        f"image.py: {args.name} {args.mib} MiB seed={seed} "
        f"regions={len(layout['regions'])} markers={len(layout['markers'])} "
        f"({time.monotonic() - t0:.1f}s)",
        file=sys.stderr,
    )
    print(args.out.resolve() / "layout.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
