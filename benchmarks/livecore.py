"""Live-capture converter benchmark: memdump.livecore turning a QEMU background-snapshot
migration stream into the ELF core, MB/s of guest RAM and peak RSS.

Run as root on the lab host, after ``lab/up`` (``source .lab/env``)::

    .venv/bin/python benchmarks/livecore.py                 # 1 GiB guest, 3 runs per order
    .venv/bin/python benchmarks/livecore.py --mib 4096 --repeat 1 --json out.json

It starts its own QEMU (as root: QEMU 7.2's background snapshot needs userfaultfd write
protection, which an unprivileged QEMU only gets with vm.unprivileged_userfaultfd=1; this
changes nothing on the host) with the lab's halt BIOS and seeded RAM content
(lab/image.py, ~40 % random, ~35 % text, ~25 % zero), takes one background snapshot into a
file, stops the QEMU, then converts that file in a child process per run (its exact peak
RSS is its VmHWM at exit), the ELF going to /dev/null. Two stream orders:

- ``sweep``: the stream as QEMU sent it (a guest that does not write: pages in address
  order, nothing waits);
- ``fault``: the same records re-framed so that the sweep starts in the middle of pc.ram
  and wraps around, as QEMU 7.2 does after a guest write fault (ram.c
  ram_find_and_save_block continues after the page the fault sent): the first half of RAM
  comes last, so the second half waits, in memory up to the buffer (``--buffer-mib``, 64 as
  MEMDUMP_LIVE_BUFFER_BYTES) and then in the spill file. The worst single fault.

Reported per order, medians: seconds, MB/s of guest RAM (MB = 10^6), peak RSS MiB, spilled
MiB. Every run's ELF SHA-256 is checked to be the same for both orders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QEMU = "/usr/bin/qemu-system-x86_64"

_CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path
from memdump.livecore import GuestLayout, LiveCoreSource, EM_386

class FileSource:
    def __init__(self, path): self.f = open(path, "rb", buffering=0)
    def readinto(self, view): return self.f.readinto(view)
    def close_ok(self): self.f.close()
    def abort(self): self.f.close()

stream, mtree, spill, buffer_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
layout = GuestLayout.from_mtree(Path(mtree).read_text())
core = LiveCoreSource(FileSource(stream), layout, spill_dir=Path(spill),
                      buffer_bytes=buffer_bytes, machine=EM_386)
sha = hashlib.sha256()
buf = bytearray(4 << 20)
view = memoryview(buf)
t0 = time.perf_counter()
while True:
    n = core.readinto(view)
    if not n:
        break
    sha.update(view[:n])
core.close_ok()
secs = time.perf_counter() - t0
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"secs": secs, "rss_kib": hwm, "elf_sha256": sha.hexdigest(),
                  "ram": sum(s.size for s in layout.segments), **core.live}))
"""


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, command: str, args: dict[str, Any] | None = None) -> Any:
        doc: dict[str, Any] = {"execute": command, **({"arguments": args} if args else {})}
        self.f.write(json.dumps(doc).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]


def capture(mib: int, work: Path) -> tuple[Path, Path]:
    """A background snapshot of a lab-style guest into work/stream.mig; its mtree."""
    lab = Path(os.environ.get("MEMDUMP_LAB_DIR", REPO / ".lab"))
    bios = lab / "images" / "bios-halt.bin"
    if not bios.is_file():
        subprocess.run(
            [sys.executable, str(REPO / "lab/image.py"), "--bios", str(bios)], check=True
        )
    name = f"lc-bench-{mib}"
    subprocess.run(
        [sys.executable, str(REPO / "lab/image.py"), "--name", name, "--mib", str(mib),
         "--out", str(work), "--images", str(lab / "images" / name)],
        check=True,
    )  # fmt: skip
    img = json.loads((work / "layout.json").read_text())
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    argv = [
        QEMU, "-name", name, "-machine", f"pc,accel={accel}", "-m", str(mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-bios", str(bios),
        "-qmp", f"unix:{work / 'qmp'},server=on,wait=off", "-pidfile", str(work / "pid"),
        "-daemonize",
    ]  # fmt: skip
    for r in img["regions"]:
        argv += ["-device", f"loader,file={r['file']},addr={r['addr']:#x},force-raw=on"]
    subprocess.run(argv, check=True)
    pid = int((work / "pid").read_text())
    try:
        qmp = Qmp(work / "qmp")
    except BaseException:
        os.kill(pid, 9)
        raise
    try:
        (work / "mtree").write_text(
            qmp.cmd("human-monitor-command", {"command-line": "info mtree -f"})
        )
        qmp.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": True}]},
        )
        qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        stream = work / "stream.mig"
        qmp.cmd("migrate", {"uri": f"exec:cat > {stream}"})
        while (st := qmp.cmd("query-migrate")["status"]) in ("setup", "active", "device"):
            time.sleep(0.2)
        if st != "completed":
            raise RuntimeError(f"migration {st}")
    finally:
        try:
            qmp.cmd("quit")
        except (OSError, RuntimeError, ValueError):
            os.kill(pid, 9)
    return stream, work / "mtree"


def fault_order(stream: Path, out: Path) -> None:
    """Re-frame the RAM records so that the sweep starts mid pc.ram and wraps around."""
    data = stream.read_bytes()
    setup_end = data.index(b"\x7e\x00\x00\x00\x02") + 5  # footer of the RAM set-up (id 2)
    recs: list[tuple[str, int, bytes]] = []  # (block, offset, payload incl. flags' data)
    i, block = setup_end, ""
    while data[i] in (2, 3):
        i += 5
        while True:
            (word,) = struct.unpack_from(">Q", data, i)
            i += 8
            flags, off = word & 0xFFF, word & ~0xFFF
            if flags & 0x10:
                if data[i] == 0x7E:
                    i += 5
                break
            if not flags & 0x20:
                block = data[i + 1 : i + 1 + data[i]].decode()
                i += 1 + data[i]
            size = 1 if flags & 0x02 else 4096
            recs.append((block, off | (flags & 0x0A), data[i : i + size]))
            i += size
    tail = data[i:]
    ram = [r for r in recs if r[0] == "pc.ram"]
    half = len(ram) // 2
    order = ram[half:] + [r for r in recs if r[0] != "pc.ram"] + ram[:half]
    with out.open("wb") as f:
        f.write(data[:setup_end] + b"\x02\x00\x00\x00\x02")
        for blk, word, payload in order:
            name = blk.encode()
            f.write(struct.pack(">Q", word) + bytes([len(name)]) + name + payload)
        f.write(struct.pack(">Q", 0x10) + b"\x7e\x00\x00\x00\x02" + tail)


def convert(stream: Path, mtree: Path, spill: Path, buffer_bytes: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(stream), str(mtree), str(spill), str(buffer_bytes)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--buffer-mib", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memdump-livecore-bench-"))
    os.chmod(work, 0o700)
    try:
        stream, mtree = capture(a.mib, work)
        streams = {"sweep": stream, "fault": work / "fault.mig"}
        fault_order(stream, streams["fault"])
        spill = work / "spill"
        spill.mkdir(mode=0o700)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in streams}
        for _ in range(a.repeat):
            for order, path in streams.items():
                runs[order].append(convert(path, mtree, spill, a.buffer_mib << 20))
        shas = {r["elf_sha256"] for rs in runs.values() for r in rs}
        if len(shas) != 1:
            print(f"FAIL: ELF differs between runs/orders: {shas}", file=sys.stderr)
            return 1
        rows = []
        print(f"guest {a.mib} MiB, buffer {a.buffer_mib} MiB, medians of {a.repeat}")
        print(f"{'order':6} {'stream MB':>9} {'s':>7} {'MB/s':>7} {'RSS MiB':>8} {'spill MiB':>9}")
        for order, rs in runs.items():
            secs = statistics.median(r["secs"] for r in rs)
            row = {
                "order": order,
                "stream_mb": rs[0]["stream_bytes"] / 1e6,
                "secs": secs,
                "mb_per_s": rs[0]["ram"] / 1e6 / secs,
                "rss_mib": statistics.median(r["rss_kib"] for r in rs) / 1024,
                "spill_mib": rs[0]["spill_peak_bytes"] / 2**20,
                "pages": rs[0]["pages"],
            }
            rows.append(row)
            print(
                f"{order:6} {row['stream_mb']:9.0f} {secs:7.2f} {row['mb_per_s']:7.0f} "
                f"{row['rss_mib']:8.1f} {row['spill_mib']:9.0f}"
            )
        if a.json:
            a.json.write_text(json.dumps({"mib": a.mib, "rows": rows}, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
