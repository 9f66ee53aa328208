"""Random reads through Volatility 3: a chunked .mem.gz (memdump's layer) against the same
dump as one gzip stream (Volatility's own gzip path) and as the uncompressed ELF.

Issue 14's target: reading 1,000 random 4 KiB guest pages, the chunked ``.mem.gz`` is
>= 100x faster than the single-stream ``.mem.gz`` and within 5x of the raw ELF. Run it as
root on the lab host after ``lab/up`` and ``. .lab/env``::

    .venv/bin/python benchmarks/random_read.py --vm vm-web-01          # capture, then read
    .venv/bin/python benchmarks/random_read.py --dump DIR/x.mem.gz     # an existing dump
    .venv/bin/python benchmarks/random_read.py --vm vm-bench-1g --pages 1000 --json out.json

``--vm`` captures the VM with memdump's engine (the pipeline's chunked ``.mem.gz``, no
post-capture check) into the work directory. From that dump, untimed: the raw ELF
(``gunzip``) and a single-stream ``.mem.gz`` of the same image (ISA-L, level 1, as
memdump wrote them before issue 14). Nothing else heavy should run meanwhile.

Each case opens its file as ``vol -f FILE`` would (a FileLayer, then the file-format
stackers, memdump's ChunkedGzipStacker among them: OS stackers are left out, they hunt
for kernels, which is not reading pages) and reads the same pages, in the same random
order, through the top (ELF) layer; ``open s`` is the stacking, ``read s`` the reads.
Every page read is compared with the raw ELF's bytes. ``--repeat N`` reads every case N
times, taking turns, and keeps each one's fastest run (the single-stream case once).

The single-stream case is bounded: Python's gzip restarts from the beginning of the
stream for every backward seek, so 1,000 pages of a 4 GiB dump would take hours. It reads
the first ``--single-pages`` pages (default 20) of the same sequence and its time for the
full count is extrapolated (per-page mean x pages); the output says so. The raw ELF was
just written, so it is read from the page cache; the chunked dump likewise (both are
about decompression and Volatility, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from isal import igzip

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memdump import volatility  # noqa: E402
from memdump.chunkedgz import ChunkReader, IndexBuilder, data_member, read_index  # noqa: E402
from memdump.elfcore import PT_LOAD, CoreLayout, parse_core  # noqa: E402

PAGE = 4096
_COPY = 16 << 20


def capture(vm: str, work: Path) -> Path:
    from memdump.capture import capture as capture_vm
    from memdump.hypervisors import open_driver
    from memdump.settings import AnalysisSettings, Settings

    settings = Settings(dump_dir=work / "dumps", analysis=AnalysisSettings(enabled=False))
    hv = settings.inventory[0]
    drv = open_driver(hv, settings.ssh)
    try:
        return Path(capture_vm(drv, drv.resolve(vm), settings).record.dump_path)
    finally:
        drv.close()


def prepare(dump: Path, work: Path) -> tuple[Path, Path, CoreLayout]:
    """The raw ELF and a single-stream .mem.gz of the same image (untimed)."""
    raw, single = work / "raw.elf", work / "single.mem.gz"
    with open(dump, "rb") as f:
        index = read_index(f)
        if index is None:
            raise SystemExit(f"{dump} is not a chunked .mem.gz (no memdump trailer)")
        reader = ChunkReader(f, index, cache_chunks=1)
        gz_out = igzip.open(single, "wb", compresslevel=1)  # type: ignore[no-untyped-call]
        with open(raw, "wb") as out, gz_out as gz:
            for at in range(0, index.raw_size, _COPY):
                data = reader.read(at, _COPY)
                out.write(data)
                gz.write(data)
    with open(raw, "rb") as f:
        layout = parse_core(f.read(64 << 20))
    if layout is None:
        raise SystemExit(f"{dump}: no ELF headers")
    return raw, single, layout


def rechunk(raw: Path, work: Path, chunk_size: int) -> Path:
    """The same image as a chunked .mem.gz of another chunk size (untimed; level 1)."""
    out = work / f"chunked-{chunk_size}.mem.gz"
    builder = IndexBuilder(chunk_size)
    piece = max(_COPY // chunk_size, 1) * chunk_size
    with open(raw, "rb") as src, open(out, "wb") as dst:
        number = 0
        while data := src.read(piece):
            for at in range(0, len(data), chunk_size):
                member = data_member(number, data[at : at + chunk_size], 1)
                builder.add(member)
                dst.write(member.data)
                number += 1
        dst.write(builder.finish()[0])
    return out


def uncache(*paths: Path) -> None:
    """Drop these files' pages from the page cache (only theirs: nobody else's cache)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pages(layout: CoreLayout, count: int, seed: int) -> list[int]:
    """``count`` distinct random whole pages of guest memory, in random order."""
    spans = [
        (s.paddr + (-s.paddr % PAGE), (s.paddr + s.filesz) // PAGE * PAGE)
        for s in layout.segments
        if s.type == PT_LOAD
    ]
    every = [a for lo, hi in spans if hi > lo for a in range(lo, hi, PAGE)]
    rnd = random.Random(seed)
    return rnd.sample(every, min(count, len(every)))


def read_case(path: Path, addrs: list[int], layout: CoreLayout, raw: Path) -> dict[str, Any]:
    vol = volatility.load()
    ctx = vol.contexts.Context()
    try:
        t0 = time.perf_counter()
        ctx.config["bench.location"] = path.absolute().as_uri()
        ctx.add_layer(vol.physical.FileLayer(ctx, "bench", "bench"))
        stackers = sorted(
            (
                s
                for s in vol.framework_subclasses(vol.interfaces.automagic.StackerLayerInterface)
                if s.__module__.startswith("volatility3.framework.layers.")
                or s is vol.chunklayer.ChunkedGzipStacker
            ),
            key=lambda s: s.stack_order,
        )
        names = vol.stacker.LayerStacker.stack_layer(ctx, "bench", stackers)
        opened = time.perf_counter() - t0
        elf = ctx.layers[names[0]]
        got = []
        t0 = time.perf_counter()
        for addr in addrs:
            got.append(elf.read(addr, PAGE))
        secs = time.perf_counter() - t0
    finally:
        volatility.destroy_layers(ctx)
    with open(raw, "rb") as f:
        for addr, data in zip(addrs, got, strict=True):
            off = layout.offset_of(addr)
            assert off is not None
            f.seek(off)
            if f.read(PAGE) != data:
                raise SystemExit(f"{path.name}: page 0x{addr:x} differs from the raw ELF")
    return {
        "stack": " over ".join(type(ctx.layers[n]).__name__ for n in names),
        "open_s": opened,
        "pages_read": len(addrs),
        "read_s": secs,
        "ms_per_page": secs / len(addrs) * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--vm", help="capture this lab VM first (MEMDUMP_INVENTORY_FILE)")
    src.add_argument("--dump", type=Path, help="an existing chunked .mem.gz")
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--single-pages", type=int, default=20, help="bound for the gzip path")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument(
        "--rechunk",
        default="",
        help="also the same image re-chunked at these sizes (bytes, comma-separated), "
        "to compare chunk sizes",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="also every case with its files dropped from the page cache first",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="read every case this many times, the cases taking turns, and keep each "
        "case's fastest (on a shared machine, the run least disturbed by others)",
    )
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="memdump-random-read-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    try:
        dump = a.dump if a.dump else capture(a.vm, work)
        raw, single, layout = prepare(dump, work)
        addrs = pages(layout, a.pages, a.seed)
        n = len(addrs)
        files = {"chunked .mem.gz": dump, "raw ELF": raw}
        for size in (int(x) for x in a.rechunk.split(",") if x.strip()):
            files[f"chunked, {size >> 10} KiB"] = rechunk(raw, work, size)
        files["single-stream .mem.gz"] = single
        cases: dict[str, dict[str, Any]] = {}
        for cold in (False, True) if a.cold else (False,):
            for turn in range(a.repeat):
                for name, path in files.items():
                    bounded = path == single
                    if bounded and turn:
                        continue  # a second per page: once is enough to show the ratio
                    if cold:
                        uncache(path, raw)
                    got = read_case(
                        path, addrs[: a.single_pages] if bounded else addrs, layout, raw
                    )
                    key = name + (" (cold)" if cold else "")
                    if key not in cases or got["read_s"] < cases[key]["read_s"]:
                        cases[key] = got
        for c in cases.values():
            c["read_s_for_all"] = c["ms_per_page"] * n / 1000
            c["extrapolated"] = c["pages_read"] < n
        chunked = cases["chunked .mem.gz"]["read_s_for_all"]  # the "x chunked" column
        size = raw.stat().st_size
        print(
            f"{dump.name}: {size / 2**20:.0f} MiB ELF, {n} random 4 KiB pages through Volatility 3"
        )
        print(f"{'case':29} {'stack':48} {'open s':>7} {'pages':>6} {'ms/page':>8} "
              f"{'s for all':>10} {'x chunked':>10}")  # fmt: skip
        for name, c in cases.items():
            mark = "*" if c["extrapolated"] else " "
            print(
                f"{name:29} {c['stack']:48} {c['open_s']:7.3f} {c['pages_read']:6d} "
                f"{c['ms_per_page']:8.3f} {c['read_s_for_all']:9.2f}{mark} "
                f"{c['read_s_for_all'] / chunked:10.2f}"
            )
        if any(c["extrapolated"] for c in cases.values()):
            print(f"* extrapolated from {a.single_pages} pages: per-page mean x {n}")
        verdicts = {}
        for suffix in ("", " (cold)") if a.cold else ("",):
            mine = cases["chunked .mem.gz" + suffix]["read_s_for_all"]
            speedup = cases["single-stream .mem.gz" + suffix]["read_s_for_all"] / mine
            vs_raw = mine / cases["raw ELF" + suffix]["read_s_for_all"]
            ok = speedup >= 100 and vs_raw <= 5
            verdicts["warm" if not suffix else "cold"] = {
                "speedup_vs_single": speedup,
                "slowdown_vs_raw": vs_raw,
                "met": ok,
            }
            print(
                f"{'page cache cold' if suffix else 'page cache warm'}: chunked vs "
                f"single-stream {speedup:.0f}x faster (target >= 100x), chunked vs raw ELF "
                f"{vs_raw:.2f}x slower (target <= 5x): {'met' if ok else 'NOT met'}"
            )
        if a.json:
            out = {"dump": str(dump), "elf_bytes": size, "pages": n, "cases": cases}
            out |= {"targets": verdicts}
            a.json.write_text(json.dumps(out, indent=2))
        return 0
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
