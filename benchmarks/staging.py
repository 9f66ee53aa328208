"""Staging benchmark: how long the guest is paused, FIFO against file-staged dumps.

Run it as root on the lab hypervisor itself, after ``lab/up`` (QEMU's pause events are read
with a local ``virsh``; the inventory comes from ``MEMDUMP_INVENTORY_FILE``, else
``<repo>/.lab/inventory.yaml``; SSH goes to its first hypervisor, or ``--hypervisor``)::

    .venv/bin/python benchmarks/staging.py                  # vm-stage-01, 1 GiB, 3 runs each
    .venv/bin/python benchmarks/staging.py --repeat 5 --rate-mbs 50 --json out.json
    .venv/bin/python benchmarks/staging.py --vm vm-web-01   # an existing VM, never removed

Unless ``--vm`` is given it makes the lab VM ``vm-stage-01`` (``lab/up --vm
vm-stage-01:MIB``, ``--mib`` 1024) and removes it at the end if this run created it
(``--keep-vm`` keeps it).

Every run is ``memdump.capture.capture`` of the same VM (its memory never changes, so every
dump is the same byte stream), post-capture analysis off, with the driver's
``open_dump(ref, staging=..., margin=settings.disk_space_margin)``, i.e. the call
capture.py makes once it passes ``Settings.staging``. Two consumers: ``fast`` reads as
fast as memdump can (hash + gzip + fsync); ``slow`` is throttled to ``--rate-mbs`` MB/s of
raw bytes (MB = 10^6), like a slow disk or link on the collector's side. Each staging mode
runs ``--repeat`` times per consumer, modes interleaved.

Reported per (consumer, staging), medians over the runs:

- ``window s``: the pause window the hypervisor-side script reports around ``virsh dump``
  (``memdump-pause-window``, the manifest's ``pause_window_sec``): for a FIFO dump the
  whole transfer, for a staged one the local write of the file only;
- ``QEMU pause s``: the guest's real pause, from QEMU's own STOP and RESUME events
  (``virsh qemu-monitor-event``, QEMU timestamps), as in benchmarks/capture.py;
- ``total s``: wall time of the whole ``capture()`` call (dominfo, dump, transfer, gzip,
  fsync, manifest); ``MB/s``: raw ELF bytes / total.

then the file/fifo ratios of those medians per consumer. Every run is verified: the same
raw SHA-256 and length each time, exactly one completed dump per run in QEMU's events,
the manifest's staging; otherwise the benchmark fails (exit 1). Dumps are deleted as they
are checked.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LAB_INVENTORY = REPO / ".lab" / "inventory.yaml"
if "MEMDUMP_INVENTORY_FILE" not in os.environ and LAB_INVENTORY.is_file():
    os.environ["MEMDUMP_INVENTORY_FILE"] = str(LAB_INVENTORY)

from benchmarks.capture import BenchError, PauseMonitor, _stop_all  # noqa: E402
from memdump.capture import capture  # noqa: E402
from memdump.hypervisors import open_driver  # noqa: E402
from memdump.hypervisors.libvirt import LibvirtDriver, Staging  # noqa: E402
from memdump.pipeline import DumpSource  # noqa: E402
from memdump.settings import AnalysisSettings, Settings  # noqa: E402

MB = 1_000_000
MODES: tuple[Staging, ...] = ("fifo", "file")
CONSUMERS = ("slow", "fast")


class Throttled:
    """A dump source read no faster than ``rate`` bytes/s (from its first byte on); the
    driver's attributes (pause_window, staging, dump_format) show through."""

    def __init__(self, inner: DumpSource, rate: float) -> None:
        self._inner = inner
        self._rate = rate
        self._n = 0
        self._t0: float | None = None

    def readinto(self, view: memoryview) -> int:
        got = self._inner.readinto(view)
        if got and self._rate:
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now
            self._n += got
            ahead = self._t0 + self._n / self._rate - now
            if ahead > 0:
                time.sleep(ahead)
        return got

    def close_ok(self) -> None:
        self._inner.close_ok()

    def abort(self) -> None:
        self._inner.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class Run:
    staging: str
    consumer: str
    window_sec: float  # the script's memdump-pause-window (manifest pause_window_sec)
    qemu_pause_sec: float  # QEMU STOP -> RESUME
    total_sec: float  # wall time of capture()
    engine_sec: float  # the record's duration_sec (open_dump -> file on disk)
    raw_bytes: int
    raw_sha256: str


def one_run(
    driver: LibvirtDriver,
    settings: Settings,
    uri: str,
    vm: str,
    staging: Staging,
    rate: float,
    work: Path,
) -> Run:
    ref = driver.resolve(vm)
    open_dump = functools.partial(
        LibvirtDriver.open_dump, driver, staging=staging, margin=settings.disk_space_margin
    )

    def staged_open(r: Any) -> DumpSource:
        src = open_dump(r)
        return Throttled(src, rate) if rate else src

    driver.open_dump = staged_open  # type: ignore[method-assign, assignment]
    os.sync()  # no dirty pages of the previous run pending
    try:
        with PauseMonitor(uri, vm, work / "events.txt") as mon:
            t0 = time.perf_counter()
            result = capture(driver, ref, settings, trigger={"source": "benchmark"})
            total = time.perf_counter() - t0
            mon.wait_resumed()
        pause, _ = mon.pause()
    finally:
        del driver.open_dump
    cap = result.manifest["capture"]
    if cap["staging"] != staging or cap["pause_window_sec"] is None:
        raise BenchError(f"manifest says staging {cap['staging']}, window {cap}")
    rec = result.record
    for p in settings.dump_dir.iterdir():  # the dump and its manifest
        p.unlink()
    return Run(
        staging,
        "slow" if rate else "fast",
        float(cap["pause_window_sec"]),
        pause,
        total,
        rec.duration_sec,
        rec.raw_size_bytes,
        rec.sha256,
    )


@contextmanager
def lab_vm(uri: str, name: str, mib: int, keep: bool) -> Iterator[str]:
    existed = (
        subprocess.run(
            ["virsh", "-c", uri, "dominfo", name], capture_output=True, stdin=subprocess.DEVNULL
        ).returncode
        == 0
    )
    print(f"lab/up --vm {name}:{mib}", file=sys.stderr, flush=True)
    subprocess.run(
        [str(REPO / "lab" / "up"), "--vm", f"{name}:{mib}"],
        stdout=sys.stderr,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    try:
        yield name
    finally:
        if not existed and not keep:
            print(f"lab/down --vm {name}", file=sys.stderr, flush=True)
            subprocess.run(
                [str(REPO / "lab" / "down"), "--vm", name],
                stdout=sys.stderr,
                stdin=subprocess.DEVNULL,
                check=False,
            )


def median(runs: list[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def report(runs: list[Run], vm: str, mib: int, rate_mbs: float, repeat: int) -> str:
    raw = runs[0].raw_bytes
    out = [
        f"{vm}: {mib} MiB, raw ELF {raw} bytes ({raw / MB:.1f} MB), "
        f"median of {repeat} run(s); slow consumer: {rate_mbs:g} MB/s",
        "",
        "| consumer | staging | window s | QEMU pause s | total s | MB/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for consumer in CONSUMERS:
        for mode in MODES:
            rs = [r for r in runs if r.staging == mode and r.consumer == consumer]
            total = median(rs, "total_sec")
            out.append(
                f"| {consumer} | {mode} | {median(rs, 'window_sec'):.3f} | "
                f"{median(rs, 'qemu_pause_sec'):.3f} | {total:.2f} | {raw / MB / total:.1f} |"
            )
    out += [
        "",
        "| consumer | window file/fifo | QEMU pause file/fifo | total file/fifo |",
        "| --- | ---: | ---: | ---: |",
    ]
    for consumer in CONSUMERS:
        by = {
            mode: [r for r in runs if r.staging == mode and r.consumer == consumer]
            for mode in MODES
        }

        def ratio(attr: str, by: dict[Staging, list[Run]] = by) -> str:
            return f"{median(by['file'], attr) / median(by['fifo'], attr):.3f}"

        out.append(
            f"| {consumer} | {ratio('window_sec')} | {ratio('qemu_pause_sec')} | "
            f"{ratio('total_sec')} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="FIFO vs file staging (see module docstring)")
    ap.add_argument("--vm", help="an existing running VM (default: make vm-stage-01)")
    ap.add_argument("--name", default="vm-stage-01", help="name of the VM to make")
    ap.add_argument("--mib", type=int, default=1024, help="memory of the VM to make")
    ap.add_argument("--repeat", type=int, default=3, help="runs per staging and consumer")
    ap.add_argument("--rate-mbs", type=float, default=100.0, help="slow consumer, MB/s")
    ap.add_argument("--keep-vm", action="store_true", help="do not remove the VM made")
    ap.add_argument("--hypervisor", help="inventory hypervisor (default: the first)")
    ap.add_argument("--json", type=Path, help="write every run to this file")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.rate_mbs <= 0:
        ap.error("--repeat must be >= 1 and --rate-mbs > 0")

    base = Settings()
    if not base.inventory:
        raise BenchError("no hypervisor in the inventory (lab/up, then source .lab/env)")
    hv = base.hypervisor(args.hypervisor) if args.hypervisor else base.inventory[0]
    work = Path(tempfile.mkdtemp(prefix="memdump-staging-bench-"))
    settings = base.model_copy(
        update={"dump_dir": work / "dumps", "analysis": AnalysisSettings(enabled=False)}
    )
    runs: list[Run] = []
    driver = open_driver(hv, settings.ssh)
    assert isinstance(driver, LibvirtDriver)
    try:
        vms = (
            _given(args.vm)
            if args.vm
            else lab_vm(hv.libvirt_uri, args.name, args.mib, args.keep_vm)
        )
        with vms as vm:
            mib = driver.snapshot(driver.resolve(vm)).memory_bytes >> 20
            for i in range(args.repeat):
                for consumer in CONSUMERS:
                    for mode in MODES:
                        rate = args.rate_mbs * MB if consumer == "slow" else 0.0
                        print(
                            f"{vm} run {i + 1}/{args.repeat}: {mode} {consumer} ...",
                            file=sys.stderr,
                            end=" ",
                            flush=True,
                        )
                        run = one_run(driver, settings, hv.libvirt_uri, vm, mode, rate, work)
                        if runs and (run.raw_sha256, run.raw_bytes) != (
                            runs[0].raw_sha256,
                            runs[0].raw_bytes,
                        ):
                            raise BenchError(f"{mode} {consumer}: a different dump: {run}")
                        runs.append(run)
                        print(
                            f"window {run.window_sec:.3f} s, QEMU pause "
                            f"{run.qemu_pause_sec:.3f} s, total {run.total_sec:.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        driver.close()
        _stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs, vm, mib, args.rate_mbs, args.repeat))
    if args.json:
        doc = {"vm": vm, "memory_mib": mib, "rate_mbs": args.rate_mbs, "repeat": args.repeat}
        doc["runs"] = [asdict(r) for r in runs]
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


@contextmanager
def _given(vm: str) -> Iterator[str]:
    yield vm


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"benchmark error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
