"""``memdump diff`` of two 4 GiB dumps (issue 14's target: under a second).

Two synthetic chunked ``.mem.gz`` files of a ``--size-gib`` guest, written with memdump's
own writer (memdump.chunkedgz: real data members, the real index and trailer), laid out as
QEMU lays out a guest of that size (an ELF core: PT_NOTE, then PT_LOADs for RAM below
3 GiB and above 4 GiB). The second differs from the first in ``--changed`` chunks spread
over the image (and the ELF notes, as two captures' CPU state does). Memory is zero pages
but for the chunk's number in its first 8 bytes: every chunk's SHA-256 is distinct (as in a
real guest, so nothing is gained from equal digests), yet the files are small and quick to
write. diff never inflates memory chunks, so what it costs depends on the number of chunks
(index entries), not their contents.

Timed, ``--repeat`` times each (best and median): ``memdump diff A B`` as an operator runs
it (a new process: interpreter start and imports included), and memdump.changes.diff in
process (two index reads with their SHA-256 and Merkle checks, one header chunk inflated,
the comparison and the PT_LOAD mapping). Every run's ranges are checked against the
changes made. ``--dumps DIR`` keeps the two dumps in DIR (written there if missing or made
with other parameters) so that runs of two checkouts compare the same files. Run::

    .venv/bin/python benchmarks/diff.py                      # 4 GiB, 64 KiB chunks
    .venv/bin/python benchmarks/diff.py --size-gib 16 --json out.json
    .venv/bin/python benchmarks/diff.py --dumps /tmp/diffbench   # then delete /tmp/diffbench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memdump.changes import diff  # noqa: E402
from memdump.chunkedgz import DEFAULT_CHUNK_SIZE, IndexBuilder, data_member  # noqa: E402
from memdump.locations import Location  # noqa: E402
from memdump.stored import LocalDump  # noqa: E402

GiB = 1 << 30
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # ELF64 header
PHDR = struct.Struct("<IIQQQQQQ")  # ELF64 program header
LOW_RAM = 3 * GiB  # QEMU's pc machine: RAM below the 4 GiB PCI hole, the rest above 4 GiB
NOTE = 4096


def layout(size: int) -> tuple[bytes, list[tuple[int, int, int]]]:
    """ELF header + program headers of a ``size``-byte guest, and its PT_LOADs as
    (file offset, paddr, size)."""
    blocks = [(0, min(size, LOW_RAM))]
    if size > LOW_RAM:
        blocks.append((4 * GiB, size - LOW_RAM))
    phnum = 1 + len(blocks)
    phoff = EHDR.size
    head_end = phoff + phnum * PHDR.size
    ident = b"\x7fELF\x02\x01\x01" + b"\x00" * 9
    ehdr = EHDR.pack(ident, 4, 62, 1, 0, phoff, 0, 0, EHDR.size, PHDR.size, phnum, 0, 0, 0)
    phdrs = [PHDR.pack(4, 0, head_end, 0, 0, NOTE, 0, 0)]
    loads = []
    off = head_end + NOTE
    for paddr, length in blocks:
        phdrs.append(PHDR.pack(1, 0, off, paddr, paddr, length, length, 0))
        loads.append((off, paddr, length))
        off += length
    return ehdr + b"".join(phdrs), loads


def write(path: Path, head: bytes, raw_size: int, chunk: int, changed: set[int], seed: int) -> None:
    """The dump: chunk 0 holds the headers and notes (``seed`` in the notes), the chunks in
    ``changed`` hold ``seed``-dependent bytes, every other chunk is zero pages after its
    number (8 bytes)."""
    builder = IndexBuilder(chunk)
    zero = bytes(chunk - 8)
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for number in range(-(-raw_size // chunk)):
            size = min(chunk, raw_size - number * chunk)
            if number == 0:
                data = (head + bytes([seed]) * NOTE).ljust(size, b"\0")
            elif number in changed:
                data = rnd.randbytes(size)
            else:
                data = (number.to_bytes(8, "little") + zero)[:size]
            member = data_member(number, data, 1)
            builder.add(member)
            f.write(member.data)
        tail, _ = builder.finish()
        f.write(tail)


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="guest memory (default 4)")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--changed", type=int, default=200, help="memory chunks that differ")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, help="where the two dumps go (default: a temp dir)")
    ap.add_argument("--dumps", type=Path, help="keep the two dumps here and reuse them")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    size = int(args.size_gib * GiB)
    head, loads = layout(size)
    raw_size = loads[-1][0] + loads[-1][2]
    chunks = -(-raw_size // args.chunk_size)
    changed = set(random.Random(1).sample(range(1, chunks), min(args.changed, chunks - 1)))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        where = args.dumps or Path(tmp)
        a, b = where / "a.mem.gz", where / "b.mem.gz"
        made = where / "made.json"  # the parameters the kept dumps were written with
        params = {"raw_size": raw_size, "chunk_size": args.chunk_size, "changed": sorted(changed)}
        t0 = time.perf_counter()
        if (
            not (a.is_file() and b.is_file() and made.is_file())
            or json.loads(made.read_text()) != params
        ):
            where.mkdir(parents=True, exist_ok=True)
            write(a, head, raw_size, args.chunk_size, set(), 1)
            write(b, head, raw_size, args.chunk_size, changed, 2)
            made.write_text(json.dumps(params))
        built = time.perf_counter() - t0

        def in_process() -> Any:
            return diff(LocalDump(Location.of(str(a)), a), LocalDump(Location.of(str(b)), b))

        result = in_process()
        assert set(result.changed) == changed | {0}, "diff missed or invented a chunk"
        assert result.outside, "the changed notes are outside guest memory"
        cli = [sys.executable, "-m", "memdump.cli", "diff", "--json", str(a), str(b)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDUMP_")}
        env["MEMDUMP_DATA_DIR"] = tmp

        def command() -> None:
            out = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True)
            assert out.returncode == 1, out.stderr  # 1: the dumps differ (as diff(1))
            assert json.loads(out.stdout)["chunks_changed"] == len(changed) + 1

        t_proc = timed(in_process, args.repeat)
        t_cli = timed(command, args.repeat)
        report = {
            "guest_bytes": size,
            "raw_bytes": raw_size,
            "chunk_size": args.chunk_size,
            "chunks": chunks,
            "chunks_changed": len(result.changed),
            "ranges": len(result.ranges),
            "file_bytes": [a.stat().st_size, b.stat().st_size],
            "build_sec": round(built, 1),
            "diff_in_process_sec": {
                "best": round(min(t_proc), 4),
                "median": round(statistics.median(t_proc), 4),
            },
            "memdump_diff_cli_sec": {
                "best": round(min(t_cli), 4),
                "median": round(statistics.median(t_cli), 4),
            },
        }
    print(
        f"{args.size_gib:g} GiB guest, {chunks} chunks of {args.chunk_size} bytes,"
        f" {report['chunks_changed']} changed -> {report['ranges']} ranges\n"
        f"  memdump diff (new process): best {min(t_cli):.3f} s,"
        f" median {statistics.median(t_cli):.3f} s\n"
        f"  changes.diff (in process):  best {min(t_proc):.4f} s,"
        f" median {statistics.median(t_proc):.4f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
