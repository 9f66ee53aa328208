"""Pipeline benchmark (issue 14): a raw image from a file into the chunked .mem.gz, against
the single-stream pipeline memdump had before (its code, taken from git), same image, same run.

    .venv/bin/python benchmarks/pipeline.py                       # 1024 MiB, repeat 3
    .venv/bin/python benchmarks/pipeline.py --mib 4096 --repeat 1 --json out.json
    .venv/bin/python benchmarks/pipeline.py --chunk-sizes 65536,262144,1048576,4194304

The image is the lab's seeded guest RAM (lab/image.py's block mix: ~40 % random, ~35 %
text, ~25 % zero, in 4 MiB blocks), generated once into a temp dir (or ``--image FILE``).
It is read from the page cache (read once before timing), so the numbers are the
pipeline's: SHA-256 of the whole image, compression, chunk hashes, write, fsync.

Rows:
- ``single``: ``memdump.pipeline`` at ``--baseline`` (default ``0579577``, the last
  single-stream version), loaded from ``git show`` into a private module: one gzip
  stream, the digest thread hashing and compressing.
- ``chunked C/T``: today's pipeline, chunk size C, T compression threads.

Columns: wall seconds (median), MB/s of raw image (MB = 10^6), CPU seconds of the process,
compressed size and its ratio to the single stream's (target: within 1 %), and the
speed-up over ``single``. Each run's file is checked: ``gzip -dc`` of a chunked file is not
run here (the tests do it), but its index is read back and must tile the image, and the
whole-image SHA-256 must be the same for every row.

Random access (``--random N``, default 1000): N random 4 KiB reads through
``memdump.chunkedgz.ChunkReader`` (cache of 8 chunks) from each chunked file: ms per read,
the cost the chunk size sets for the Volatility layer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdump import chunkedgz  # noqa: E402
from memdump.pipeline import write_dump  # noqa: E402


class FileSource:
    def __init__(self, path: Path) -> None:
        self.f = path.open("rb", buffering=0)

    def readinto(self, view: memoryview) -> int:
        return self.f.readinto(view) or 0

    def close_ok(self) -> None:
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def baseline_module(commit: str) -> ModuleType:
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:memdump/pipeline.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("memdump_pipeline_baseline", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    exec(compile(src, f"{commit}:memdump/pipeline.py", "exec"), mod.__dict__)  # noqa: S102
    return mod


def make_image(path: Path, mib: int) -> None:
    sys.path.insert(0, str(REPO / "lab"))
    import image as lab_image  # lab/image.py

    seed = 20261129
    pool = lab_image.make_pool(seed)
    with path.open("wb") as f:
        for addr in range(0, mib << 20, lab_image.BLOCK):
            kind = lab_image.block_kind(seed, addr)
            data = lab_image.block_data(kind, seed, addr, lab_image.BLOCK, pool)
            f.write(data if data is not None else bytes(lab_image.BLOCK))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(fn: Any, image: Path, out_dir: Path, name: str, size: int, **kw: Any) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), cpu()
    res = fn(FileSource(image), out_dir, name, expected_size=lambda head: size, **kw)
    wall, used = time.perf_counter() - t0, cpu() - c0
    return {"s": wall, "cpu_s": used, "gz": res.gz_bytes, "sha": res.raw_sha256, "path": res.path}


def random_reads(path: Path, n: int, size: int) -> float:
    rng = random.Random(1)
    with path.open("rb") as f:
        index = chunkedgz.read_index(f)
        assert index is not None and index.raw_size == size
        reader = chunkedgz.ChunkReader(f, index, cache_chunks=8)
        t0 = time.perf_counter()
        for _ in range(n):
            page = rng.randrange(size // 4096) * 4096
            assert len(reader.read(page, 4096)) == 4096
        return (time.perf_counter() - t0) / n * 1000


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--image", type=Path, help="a raw image file instead of a generated one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-sizes", default=str(chunkedgz.DEFAULT_CHUNK_SIZE))
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--baseline", default="0579577")
    ap.add_argument("--random", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=None, help="directory for the files")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base = baseline_module(args.baseline)
    with tempfile.TemporaryDirectory(dir=args.work, prefix="memdump-bench-pipe-") as tmp:
        work = Path(tmp)
        image = args.image
        if image is None:
            image = work / "image.raw"
            print(f"generating a {args.mib} MiB seeded image ...", file=sys.stderr)
            make_image(image, args.mib)
        size = image.stat().st_size
        with image.open("rb") as f:  # into the page cache: time the pipeline, not the disk
            while f.read(16 << 20):
                pass
        configs: list[tuple[str, Any, dict[str, Any]]] = [("single", base.write_dump, {})]
        for c in (int(x) for x in args.chunk_sizes.split(",")):
            for t in (int(x) for x in args.threads.split(",")):
                label = f"chunked {c >> 10} KiB/{t}"
                configs.append((label, write_dump, {"chunk_size": c, "threads": t}))
        rows: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in configs}
        reads: dict[str, float] = {}
        for rep in range(args.repeat):
            for label, fn, kw in configs:  # interleaved: drift hits every row alike
                r = run(fn, image, work, f"{rep}-{len(rows[label])}.mem.gz", size, **kw)
                print(f"run {rep + 1}/{args.repeat} {label}: {r['s']:.2f} s", file=sys.stderr)
                if label != "single" and label not in reads and args.random:
                    reads[label] = random_reads(r["path"], args.random, size)
                r["path"].unlink()
                rows[label].append(r)
        shas = {r["sha"] for rs in rows.values() for r in rs}
        if len(shas) != 1:
            print(f"error: the rows hashed the image differently: {shas}", file=sys.stderr)
            return 1
        single = statistics.median(r["s"] for r in rows["single"])
        single_gz = statistics.median(r["gz"] for r in rows["single"])
        print(f"\nimage: {size} bytes ({size / 1e6:.0f} MB), {os.cpu_count()} cores, "
              f"medians of {args.repeat}, baseline {args.baseline}")  # fmt: skip
        print("| pipeline | s | MB/s | CPU s | gz bytes | gz / single | speed-up | 4 KiB read ms |")
        print("|---|---|---|---|---|---|---|---|")
        table = []
        for label, rs in rows.items():
            s = statistics.median(r["s"] for r in rs)
            gz = statistics.median(r["gz"] for r in rs)
            row = {
                "pipeline": label,
                "s": round(s, 3),
                "mb_s": round(size / s / 1e6, 1),
                "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 2),
                "gz_bytes": int(gz),
                "gz_vs_single": round(gz / single_gz, 4),
                "speedup": round(single / s, 2),
                "read_ms": round(reads[label], 3) if label in reads else None,
            }
            table.append(row)
            print(
                f"| {label} | {s:.2f} | {row['mb_s']} | {row['cpu_s']} | {int(gz)} | "
                f"{row['gz_vs_single']:.4f} | {row['speedup']}x | "
                f"{'' if row['read_ms'] is None else row['read_ms']} |"
            )
        if args.json:
            args.json.write_text(json.dumps({"size": size, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
