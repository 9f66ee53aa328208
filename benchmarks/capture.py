"""Capture benchmark: memdump against plain OpenSSH + coreutils pipelines, same VM, same run.

Run it as root on the lab hypervisor itself, after ``lab/up`` (the guest-pause events are
read with a local ``virsh``; the inventory comes from ``MEMDUMP_INVENTORY_FILE``, else
``<repo>/.lab/inventory.yaml``; SSH goes to its first hypervisor, or ``--hypervisor``)::

    .venv/bin/python benchmarks/capture.py                       # 1024 and 4096 MiB VMs
    .venv/bin/python benchmarks/capture.py --sizes 1024 --repeat 3 --json out.json
    .venv/bin/python benchmarks/capture.py --vms vm-web-01       # existing VMs, fast
    .venv/bin/python benchmarks/capture.py --sizes 4096 --writer --methods memdump,memdump-live

``--sizes`` makes lab VMs ``vm-bench-1g``, ``vm-bench-4g`` (``lab/up --vm NAME:MIB``) and
removes the ones it created at the end (``--keep-vms`` keeps them). ``--vms`` uses VMs that
already run and never removes them. Nothing else heavy should run meanwhile: there are
two cores, and every method competes with QEMU, sshd and the ssh client for them.

Every method dumps the same halted VM (its memory never changes, so every dump is the
same byte stream) with the remote script memdump uses (``_DUMP``, quoted exactly as
memdump's SSH transport quotes it) and, except the ceilings, yields a ``.gz`` plus the
SHA-256 of the raw bytes:

- ``memdump``: memdump's command line, unchanged (``memdump.cli`` run by ``runpy`` in a
  child ``python -c`` that only adds an atexit hook reporting its VmHWM), i.e.
  ``memdump capture --mode paused VM`` end-to-end: interpreter start, imports, SSH
  connect, ``virsh dominfo``/``version``, dump, SHA-256, ISA-L gzip, fsync (FIFO
  staging). The record's own ``duration_sec`` (dump + stream + fsync only) is shown as
  ``memdump[engine]`` for reference; it is not a separate run.
- ``memdump-file``: the same with ``MEMDUMP_STAGING=file`` (the guest resumes once the
  hypervisor has written the dump to its disk; then it is streamed).
- ``memdump-live``: ``memdump capture --mode live VM`` (issue 12): QEMU's
  background-snapshot migration, converted into the ELF core on the collector while the
  guest runs. Its ``pause s`` is the sum of QEMU's STOP->RESUME intervals; the driver's
  own measure (QEMU's ``downtime``, the record's ``pause_ms``) is printed beside it. A
  live capture that fell back to paused (``live_fallback_reason``), or a memdump without
  live mode, is an error naming the reason: the benchmark never reports a paused
  capture as live. Its raw ELF differs from the paused dumps' in the notes only (no vCPU
  registers), so it is checked differently: every PT_LOAD (physical address, size and
  SHA-256 of its bytes) must equal those of the paused memdump run (untimed).
  ``--huge-pages restore|keep`` sets the hypervisor's ``live_restore_huge_pages`` for
  the run (default: the inventory's; the lab's is on): with ``keep`` each repeat starts
  from the 4 KiB pages the previous capture left (a longer pause), with ``restore``
  from huge pages, as a VM's first capture does; the line per run says which.
- ``ssh-default`` / ``ssh-aes128gcm``: ``ssh HV SCRIPT > /dev/null`` with OpenSSH's
  default cipher and with ``-c aes128-gcm@openssh.com`` (memdump's cipher): the ceiling.
- ``gzip-6``: ``ssh ... | tee >(sha256sum > f.sha) | gzip -6 > f.gz`` (bash, pipefail).
- ``pigz-1``: the same with ``pigz -1``.

After each method its files are verified and deleted: the raw SHA-256 and byte count
must be the same for every method (the gz files are decompressed, untimed, to check
them), QEMU must report one completed dump of the same size; anything else is an error
(exit 1). The ceilings write to /dev/null, so only their exit status (the remote script
fails unless virsh and the FIFO reader both succeeded) and QEMU's DUMP_COMPLETED are
checked. Once per VM, memdump's output is decompressed and recompressed with ``gzip -1``
(untimed) as the compression reference.

Reading the table (one per VM; with ``--repeat N`` the run with the median wall time,
the faster one of the middle two for even N; every run is in ``--json``):

- ``s``: wall time of the whole child process tree; ``MB/s``: raw ELF bytes / wall
  time, MB = 10^6; ``md x``: memdump's MB/s / this method's MB/s (>1: memdump faster);
  ``ratio``: raw / gz size.
- ``pause s``: how long the guest was paused, from QEMU's own STOP and RESUME events
  (``virsh qemu-monitor-event --loop``, timestamps from QEMU, 1 us resolution) recorded
  around every method in the same way.
- ``host CPU``: busy CPU of the whole machine (every process: QEMU, sshd, the method)
  during the run, in % of all cores (/proc/stat); near 100 % means CPU-bound.
- ``CPU s by process group`` (under each row): CPU seconds every process of the machine
  used during the run, grouped: ``collector`` (the timed child's process tree: memdump's
  Python threads and its ssh client, or a pipeline's processes), ``QEMU`` (the VM's QEMU,
  all threads), ``sshd``, ``libvirt``, ``hv scripts`` (sh, virsh, cat... the
  hypervisor-side scripts), ``kernel`` (kernel threads), ``other``. On the lab the
  hypervisor and the collector share the cores: the groups show which side the CPU went
  to (processes shorter than the 0.1 s poll, such as single virsh calls, are missed).
- ``RSS MiB``: peak RSS (VmHWM). For memdump, exactly that of its one Python process,
  read by the child itself at interpreter exit. For the others (in parentheses) the sum
  of every local process's peak (ssh, bash, tee, gzip, sha256sum...), polled every
  0.1 s through /proc. Not ``ru_maxrss``: Linux carries a forked child's pre-exec peak
  (this ~50 MiB script) over exec. Hypervisor-side processes are not counted.

Live targets (issue 12): the guest's pause <= 50 ms and >= 100x shorter than the paused
FIFO capture's, end-to-end <= 1.2x the paused FIFO capture's wall time, peak RSS <
300 MiB. ``RAM MB/s``: guest memory / wall time. The lab's bench VMs are halted (their
memory never changes): the RSS a guest writing during the capture costs is not exercised
by them.

``--linux``: the bench VMs are Linux guests instead (``vm-lx-bench-1g``, ...; ``lab/up
--linux NAME:MIB``, lab/linux.py: Debian's kernel booted into an idle initramfs), whose RAM
is mostly untouched, i.e. zero: the case where a live capture sends one byte per zero page
and a paused dump every byte. The guest runs, so bytes are not compared across methods,
as with ``--writer``.

``--writer``: the bench VMs are writer guests instead, ``vm-wr-bench-1g``, ... (``lab/up
--vm NAME:MIB:writer``, lab/writer.py: the same seeded RAM, and a BIOS that keeps writing
one dword into every 4 KiB page of its RAM from 1 MiB to the end of RAM below 4 GiB, pass
after pass; RAM above 4 GiB is not written). QEMU sends a page the guest writes before
its sweep got there and continues the sweep after it, so most pages reach the converter
ahead of their place in the file: it buffers them in memory (``MEMDUMP_LIVE_BUFFER_BYTES``)
and then in its spill file in the dump directory (up to the guest's memory: mind the
disk). The live row then shows the converter's page counts (``early``: ahead of their
place, ``spilled``: of those, to the spill file), its buffer and spill peaks, and the RSS
target is checked for a guest that writes; a live capture of a writer guest with no early
page is an error (the guest did not write). Every capture of a writing guest holds other
bytes, so the check that all methods saw the same SHA-256 and that the live PT_LOADs equal
the paused dump's is skipped, with a printed note (sizes and QEMU's dump total are still
compared).

Targets are printed as PASS/FAIL; the exit status is 0 whatever they say (this is a
report) and non-zero only on errors or mismatched dumps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LAB_INVENTORY = REPO / ".lab" / "inventory.yaml"
if "MEMDUMP_INVENTORY_FILE" not in os.environ and LAB_INVENTORY.is_file():
    os.environ["MEMDUMP_INVENTORY_FILE"] = str(LAB_INVENTORY)

from memdump.hypervisors.libvirt import _DUMP  # noqa: E402
from memdump.settings import HypervisorConfig, Settings  # noqa: E402
from memdump.transport.base import sh_command_line  # noqa: E402
from tests.helpers.libvirt_live import guest_thp  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
GCM = "aes128-gcm@openssh.com"
METHODS = (
    "memdump",
    "memdump-file",
    "memdump-live",
    "ssh-default",
    "ssh-aes128gcm",
    "gzip-6",
    "pigz-1",
)
MEMDUMP_METHODS = ("memdump", "memdump-file", "memdump-live")
_EVENT = re.compile(r"^event (\w+) at (\d+)\.(\d+) for domain '([^']*)': (.*)$")
_CHUNK = 4 * MiB

# $1 = gz file, $2 = sha file, $3.. = the ssh argv. `wait $!` waits for the process
# substitution, so sha256sum has written its file when bash exits (and is timed).
_PIPE = """set -o pipefail
gz=$1 sha=$2
shift 2
"$@" | tee >(sha256sum > "$sha") | {compressor} > "$gz"
rc=$?
wait $! || {{ [ "$rc" -ne 0 ] || rc=99; }}
exit "$rc"
"""


class BenchError(Exception):
    """A failed method, a mismatched dump or a broken lab: the benchmark is invalid."""


@dataclass
class Run:
    method: str
    wall_sec: float
    peak_rss_kib: int
    pause_sec: float
    dump_total: int  # QEMU's DUMP_COMPLETED "total" (guest memory, without ELF headers)
    raw_bytes: int | None = None
    raw_sha256: str | None = None
    gz_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    host_cpu_pct: float = 0.0  # machine-wide CPU use during the run, % of all cores
    cpu_by_group: dict[str, float] = field(default_factory=dict)  # CPU seconds, by group

    @property
    def mb_s(self) -> float:
        return 0.0 if self.raw_bytes is None else self.raw_bytes / MB / self.wall_sec


@dataclass
class VMResult:
    vm: str
    memory_mib: int
    writer: bool = False  # a lab/writer.py guest: its memory changes between captures
    linux: bool = False  # a lab/linux.py guest (Debian's kernel, idle): mostly empty RAM

    @property
    def changes(self) -> bool:
        """Its memory changes between captures: methods' bytes are not compared."""
        return self.writer or self.linux

    raw_bytes: int = 0
    raw_sha256: str = ""
    gzip1_bytes: int = 0
    runs: dict[str, list[Run]] = field(default_factory=dict)
    # (paddr, filesz) -> SHA-256 of that PT_LOAD's bytes, from the paused memdump run
    loads: dict[tuple[int, int], str] = field(default_factory=dict)

    def median(self, method: str) -> Run:
        runs = sorted(self.runs[method], key=lambda r: r.wall_sec)
        return runs[(len(runs) - 1) // 2]


# ------------------------------------------------------------------ child processes

_live: list[subprocess.Popen[bytes]] = []


def _spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own session (so its whole tree can be stopped) and track it."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.Popen(list(argv), start_new_session=True, **kw)
    _live.append(p)
    return p


def _reap(p: subprocess.Popen[bytes], status: int) -> int:
    p.returncode = os.waitstatus_to_exitcode(status)
    if p in _live:
        _live.remove(p)
    return p.returncode


def _stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop a child we started and its process group; SIGKILL after ``grace`` seconds."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    if p in _live:
        _live.remove(p)


def _stop_all() -> None:
    for p in list(_live):
        _stop(p)


class _TreeHWM(threading.Thread):
    """Polls VmHWM (peak RSS of the current image) of a child and all its descendants.

    ``ru_maxrss`` from wait4 cannot be used for the shell pipelines: Linux carries the
    pre-exec high-water mark over exec, so every child forked from this (~50 MiB) Python
    process reports at least that. VmHWM belongs to the exec'd image only. Processes are
    found through /proc/PID/task/*/children every ``interval`` seconds, so one that
    lives shorter than that may be missed (the pipelines' processes live for the run).
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="bench-hwm", daemon=True)
        self.root, self.interval = pid, interval
        self.peaks: dict[int, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.poll()
            if self._done.wait(self.interval):
                return

    def poll(self) -> None:
        todo = [self.root]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            self.peaks[pid] = max(self.peaks.get(pid, 0), kib)
                            break
                for task in os.scandir(f"/proc/{pid}/task"):
                    with open(f"{task.path}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue

    def stop(self) -> int:
        """Sum over the processes of each one's peak RSS, KiB."""
        self._done.set()
        self.join()
        return sum(self.peaks.values())


# Process groups of the CPU accounting: by command name, except "collector", the timed
# child's process tree (memdump's Python and its ssh client, or a pipeline's processes).
_CPU_GROUPS = {
    "qemu-system-x86": "QEMU",
    "sshd": "sshd",
    "libvirtd": "libvirt",
    "libvirt_iohelpe": "libvirt",
    "rpc-libvirtd": "libvirt",
    "virsh": "hv scripts",
    "sh": "hv scripts",
    "cat": "hv scripts",
    "tee": "hv scripts",
    "sleep": "hv scripts",
}


class _CpuByGroup(threading.Thread):
    """CPU seconds of every process of the machine during a run, by group: the timed
    child's tree ("collector"), QEMU, sshd, libvirt, the hypervisor-side scripts' tools,
    kernel threads, "other". Process-level utime+stime (dead threads included), polled
    every ``interval``: a process that lives shorter than that is missed (virsh calls),
    one that exits is counted up to its last poll."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        super().__init__(name="bench-cpu", daemon=True)
        self.root, self.interval = root, interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.base = self._snap()
        self.last = dict(self.base)
        self.tree = {root}
        self._done = threading.Event()

    @staticmethod
    def _snap() -> dict[int, tuple[str, int, int]]:
        out: dict[int, tuple[str, int, int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"{entry.path}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(entry.name)] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]))
        return out

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        now = self._snap()
        for pid, (_, ppid, _) in now.items():
            if ppid in self.tree:
                self.tree.add(pid)
        self.last.update(now)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        self._poll()
        groups: dict[str, float] = {}
        for pid, (comm, ppid, ticks) in self.last.items():
            used = ticks - self.base.get(pid, (comm, ppid, 0))[2]
            if used <= 0:
                continue
            if pid in self.tree:
                group = "collector"
            elif ppid == 2 or pid == 2:
                group = "kernel"
            else:
                group = _CPU_GROUPS.get(comm, "other")
            groups[group] = groups.get(group, 0.0) + used / self.tick
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def guest_thp_mib(vm: str) -> int | None:
    """MiB of the lab domain's guest RAM on transparent huge pages right now
    (tests.helpers.libvirt_live.guest_thp). None: not readable."""
    got = guest_thp(vm)
    return None if got is None else got[0] // 1024


def _host_busy() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timed:
    wall_sec: float
    rc: int
    tree_hwm_kib: int  # sum of the child tree's VmHWM
    host_busy_sec: float  # machine-wide busy CPU seconds meanwhile (every process)
    cpu_by_group: dict[str, float] = field(default_factory=dict)  # _CpuByGroup


def _timed(argv: Sequence[str], **kw: Any) -> Timed:
    """Run a child to completion, timing it."""
    busy0 = _host_busy()
    t0 = time.perf_counter()
    p = _spawn(argv, **kw)
    hwm = _TreeHWM(p.pid)
    hwm.start()
    cpu = _CpuByGroup(p.pid)
    cpu.start()
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    busy = _host_busy() - busy0
    return Timed(wall, _reap(p, status), hwm.stop(), busy, cpu.stop())


# --------------------------------------------------------------------- guest pause


class PauseMonitor:
    """QEMU's STOP / DUMP_COMPLETED / RESUME events for one domain, with QEMU's timestamps.

    ``virsh qemu-monitor-event`` (without ``--timestamp``) prints the timestamp QEMU put in
    each QMP event (microseconds), so the pause is measured by QEMU's clock, independent
    of when the event reached us.
    """

    def __init__(self, uri: str, domain: str, out: Path) -> None:
        self.uri, self.domain, self.out = uri, domain, out
        self._p: subprocess.Popen[bytes] | None = None
        self._f: IO[bytes] | None = None

    def __enter__(self) -> PauseMonitor:
        self._f = self.out.open("wb")
        argv = ["virsh", "-c", self.uri, "qemu-monitor-event", "--domain", self.domain, "--loop"]
        self._p = _spawn(argv, stdout=self._f, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # no "ready" message: give it time to register
        if self._p.poll() is not None:
            raise BenchError(f"virsh qemu-monitor-event exited: {self.out.read_text()}")
        return self

    def events(self) -> list[tuple[str, float, str]]:
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            m = _EVENT.match(line.strip())
            if m and m.group(4) == self.domain:
                ts = int(m.group(2)) + int(m.group(3).ljust(6, "0")[:6]) / 1e6
                out.append((m.group(1), ts, m.group(5)))
        return out

    def wait_resumed(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(e[0] == "RESUME" for e in self.events()):
                return
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            _stop(self._p)
        if self._f is not None:
            self._f.close()

    def live_pause(self) -> float:
        """Seconds the guest was stopped during a live capture: the sum of its STOP ->
        RESUME intervals (QEMU stops the vCPUs to arm write tracking); no dump events."""
        ev = self.events()
        if any(n == "DUMP_COMPLETED" for n, _, _ in ev):
            raise BenchError(f"{self.domain}: a live capture ran a dump: {ev}")
        total, stopped = 0.0, None
        for name, t, _ in ev:
            if name == "STOP" and stopped is None:
                stopped = t
            elif name == "RESUME" and stopped is not None:
                total += t - stopped
                stopped = None
        if stopped is not None or not any(n == "RESUME" for n, _, _ in ev):
            raise BenchError(f"{self.domain}: expected STOP/RESUME pairs, got {ev}")
        return total

    def pause(self) -> tuple[float, int]:
        """(seconds paused, DUMP_COMPLETED total bytes); exactly one dump or an error."""
        ev = self.events()
        stops = [t for n, t, _ in ev if n == "STOP"]
        resumes = [t for n, t, _ in ev if n == "RESUME"]
        done = [d for n, _, d in ev if n == "DUMP_COMPLETED"]
        if len(stops) != 1 or len(resumes) != 1 or len(done) != 1 or resumes[0] < stops[0]:
            raise BenchError(f"{self.domain}: expected one STOP, DUMP_COMPLETED, RESUME: {ev}")
        result = json.loads(done[0]).get("result", {})
        if result.get("status") != "completed" or result.get("completed") != result.get("total"):
            raise BenchError(f"{self.domain}: dump not completed: {done[0]}")
        return resumes[0] - stops[0], int(result["total"])


# -------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Lab:
    hv: HypervisorConfig

    def ssh_argv(self, vm: str, cipher: str | None = None) -> list[str]:
        hv = self.hv
        argv = ["ssh", "-F", "/dev/null", "-i", str(hv.key_file), "-o", "IdentitiesOnly=yes"]
        argv += ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={hv.known_hosts}"]
        argv += ["-o", "StrictHostKeyChecking=yes", "-p", str(hv.port)]
        if cipher:
            argv += ["-c", cipher]
        remote = sh_command_line(_DUMP, (hv.libvirt_uri, vm))  # exactly what memdump sends
        return [*argv, f"{hv.user}@{hv.host}", remote]

    def default_cipher(self) -> str:
        argv = self.ssh_argv("x")[:-1] + ["-v", "true"]
        res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        m = re.search(r"kex: server->client cipher: (\S+)", res.stderr)
        return m.group(1) if m else "?"


def digest_of(source: Sequence[str], sink: Sequence[str] | None = None) -> tuple[int, str, int]:
    """(bytes, SHA-256) of ``source``'s stdout; with ``sink``, also piped into it and the
    size of what it writes (used for the gzip -1 reference). Untimed verification."""
    sha = hashlib.sha256()
    n = 0
    with tempfile.TemporaryFile() as out:
        src = _spawn(source, stdout=subprocess.PIPE)
        snk = _spawn(sink, stdin=subprocess.PIPE, stdout=out) if sink else None
        assert src.stdout is not None  # noqa: S101 - stdout=PIPE
        while chunk := src.stdout.read(_CHUNK):
            n += len(chunk)
            sha.update(chunk)
            if snk is not None and snk.stdin is not None:
                snk.stdin.write(chunk)
        src.stdout.close()
        procs = [src] if snk is None else [src, snk]
        if snk is not None and snk.stdin is not None:
            snk.stdin.close()
        for p in procs:
            rc = _reap(p, os.waitpid(p.pid, 0)[1])
            if rc != 0:
                raise BenchError(f"{shlex.join(p.args)} failed ({rc})")  # type: ignore[arg-type]
        sink_bytes = os.fstat(out.fileno()).st_size
    return n, sha.hexdigest(), sink_bytes


# Runs memdump's own command line unchanged (``python -m memdump.cli capture VM``) and, at
# interpreter exit, writes the process's VmHWM: its exact peak RSS (see _TreeHWM on why
# not ru_maxrss).
_MEMDUMP_CHILD = """import atexit, os, runpy, sys
def _hwm():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["MEMDUMP_BENCH_HWM_FILE"], "w") as f:
        f.write(hwm)
atexit.register(_hwm)
runpy.run_module("memdump.cli", run_name="__main__", alter_sys=True)
"""


def run_memdump(
    lab: Lab, vm: str, work: Path, method: str = "memdump"
) -> tuple[Timed, int, dict[str, Any]]:
    dump_dir = work / "memdump"
    hwm_path = work / "memdump.hwm"
    env = {
        **os.environ,
        "MEMDUMP_DUMP_DIR": str(dump_dir),
        # memdump capture records its dumps (as a trigger does): into the bench's own store.
        "MEMDUMP_DATA_DIR": str(work / "data"),
        "MEMDUMP_BENCH_HWM_FILE": str(hwm_path),
        "MEMDUMP_STAGING": "file" if method == "memdump-file" else "fifo",
    }
    out_path, err_path = work / "memdump.out", work / "memdump.err"
    # The mode always explicit: an inventory's capture_mode must not change the baseline.
    mode = "live" if method == "memdump-live" else "paused"
    argv = [sys.executable, "-c", _MEMDUMP_CHILD, "capture", "--mode", mode, vm]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t = _timed(argv, env=env, stdout=out, stderr=err, cwd=REPO)
    if t.rc != 0:
        raise BenchError(f"memdump capture {vm} failed ({t.rc}): {err_path.read_text()[-2000:]}")
    record: dict[str, Any] = json.loads(out_path.read_text().strip().splitlines()[-1])
    path = Path(record["dump_path"])
    if path.stat().st_size != record["gzip_size_bytes"]:
        raise BenchError(f"{path}: size differs from the record's gzip_size_bytes")
    rss_kib = int(hwm_path.read_text())
    hwm_path.unlink()
    extra: dict[str, Any] = {"record": record, "polled_hwm_kib": t.tree_hwm_kib}
    if method == "memdump-live":
        if record.get("capture_mode") != "live":
            why = record.get("live_fallback_reason") or (
                "this memdump has no live capture mode (no capture_mode in its record)"
            )
            raise BenchError(f"memdump-live on {vm} did not capture live: {why}")
        doc = json.loads(path.with_name(path.name.removesuffix(".mem.gz") + ".manifest.json")
                         .read_text())  # fmt: skip
        extra["live"] = doc["capture"]["live"]
        extra["pause_ms"] = record.get("pause_ms")
    return t, rss_kib, extra


def run_method(
    method: str, lab: Lab, vm: str, work: Path, res: VMResult, *, verify_gz: bool
) -> Run:
    """One timed run of ``method``, verified, its files deleted."""
    os.sync()  # start every method with no dirty pages of the previous one pending
    extra: dict[str, Any] = {}
    raw_bytes: int | None = None
    raw_sha: str | None = None
    gz_bytes: int | None = None
    thp = guest_thp_mib(vm)  # untimed, before the run: the guest's page-table state
    with PauseMonitor(lab.hv.libvirt_uri, vm, work / "events.txt") as mon:
        if method in MEMDUMP_METHODS:
            t, rss, extra = run_memdump(lab, vm, work, method)
            record = extra["record"]
            raw_bytes, raw_sha = record["raw_size_bytes"], record["sha256"]
            gz_bytes = record["gzip_size_bytes"]
            extra["engine_duration_sec"] = record["duration_sec"]
            gz_path = Path(record["dump_path"])
        elif method.startswith("ssh-"):
            cipher = GCM if method == "ssh-aes128gcm" else None
            with (work / "ssh.err").open("wb") as err:
                t = _timed(lab.ssh_argv(vm, cipher), stdout=subprocess.DEVNULL, stderr=err)
            if t.rc != 0:
                raise BenchError(f"{method} failed ({t.rc}): {(work / 'ssh.err').read_text()}")
            rss = t.tree_hwm_kib
        else:
            compressor = {"gzip-6": "gzip -6", "pigz-1": "pigz -1"}[method]
            gz_path, sha_path = work / "f.gz", work / "f.sha"
            script = _PIPE.format(compressor=compressor)
            argv = ["bash", "-c", script, "bash", str(gz_path), str(sha_path)]
            with (work / "pipe.err").open("wb") as err:
                t = _timed([*argv, *lab.ssh_argv(vm)], stdout=err, stderr=err)
            if t.rc != 0:
                raise BenchError(f"{method} failed ({t.rc}): {(work / 'pipe.err').read_text()}")
            rss = t.tree_hwm_kib
            raw_sha = sha_path.read_text().split()[0]
            gz_bytes = gz_path.stat().st_size
            sha_path.unlink()
        mon.wait_resumed()
    if method == "memdump-live":
        pause, total = mon.live_pause(), 0
    else:
        pause, total = mon.pause()

    if method == "memdump":
        if not res.gzip1_bytes:
            # Reference, untimed: memdump's own output decompressed, checked, gzip -1'ed.
            n, sha, res.gzip1_bytes = digest_of(["pigz", "-dc", str(gz_path)], ["gzip", "-1"])
            if (n, sha) != (raw_bytes, raw_sha):
                raise BenchError(f"memdump's .gz decompresses to {n} bytes {sha}, not its record")
        if not res.loads and not res.changes:
            res.loads = load_digests(gz_path)
        gz_path.unlink()
    elif method == "memdump-file":
        gz_path.unlink()
    elif method == "memdump-live":
        if res.writer:
            pages = extra["live"].get("pages") or {}
            if not pages.get("early"):
                raise BenchError(
                    f"{vm}: writer guest, yet no page of the live capture came early "
                    f"(pages {pages}): the guest did not write during the capture"
                )
            print(
                f"{vm}: writer guest: live PT_LOADs not compared with the paused dump's "
                "(the guest wrote between them)",
                file=sys.stderr,
            )
            extra["loads_checked"] = False
        elif res.linux:
            print(
                f"{vm}: Linux guest: live PT_LOADs not compared with the paused dump's "
                "(the guest runs between them)",
                file=sys.stderr,
            )
            extra["loads_checked"] = False
        else:
            # Untimed: the live ELF's guest memory is the paused dump's, PT_LOAD by PT_LOAD.
            loads = load_digests(gz_path)
            if res.loads and loads != res.loads:
                raise BenchError(f"{vm}: the live capture's PT_LOADs differ from the paused dump's")
            extra["loads_checked"] = bool(res.loads)
        gz_path.unlink()
    elif method in ("gzip-6", "pigz-1"):
        if verify_gz:
            n, sha, _ = digest_of(["pigz", "-dc", str(gz_path)])
            if sha != raw_sha:
                raise BenchError(f"{method}: tee'd sha256 {raw_sha} != decompressed {sha}")
            raw_bytes = n
        gz_path.unlink()
    shutil.rmtree(work / "memdump", ignore_errors=True)

    extra["guest_thp_mib_at_start"] = thp
    run = Run(method, t.wall_sec, rss, pause, total, raw_bytes, raw_sha, gz_bytes, extra)
    run.host_cpu_pct = 100 * t.host_busy_sec / (t.wall_sec * (os.cpu_count() or 1))
    run.cpu_by_group = t.cpu_by_group
    if method != "memdump-live":  # its notes differ: checked by PT_LOAD above
        _check_same(res, run)
    return run


def load_digests(gz_path: Path) -> dict[tuple[int, int], str]:
    """(paddr, filesz) -> SHA-256 of each PT_LOAD's bytes of a .mem.gz, in one streaming
    pass (``pigz -dc``). A live core may lay its PT_LOADs out in another file order."""
    from memdump.elfcore import PT_LOAD, parse_core

    src = _spawn(["pigz", "-dc", str(gz_path)], stdout=subprocess.PIPE)
    assert src.stdout is not None  # noqa: S101 - stdout=PIPE
    head = bytearray()
    layout = None
    while layout is None:
        chunk = src.stdout.read(_CHUNK)
        if not chunk:
            raise BenchError(f"{gz_path}: no ELF headers")
        head += chunk
        layout = parse_core(bytes(head))
    segs = sorted((s for s in layout.segments if s.type == PT_LOAD), key=lambda s: s.offset)
    sums = {(s.paddr, s.filesz): hashlib.sha256() for s in segs}
    pos, data = 0, bytes(head)
    while data:
        end = pos + len(data)
        for s in segs:
            lo, hi = max(pos, s.offset), min(end, s.offset + s.filesz)
            if lo < hi:
                sums[(s.paddr, s.filesz)].update(data[lo - pos : hi - pos])
        pos, data = end, src.stdout.read(_CHUNK)
    src.stdout.close()
    if _reap(src, os.waitpid(src.pid, 0)[1]) != 0:
        raise BenchError(f"pigz -dc {gz_path} failed")
    return {k: h.hexdigest() for k, h in sums.items()}


def _check_same(res: VMResult, run: Run) -> None:
    """Every method must have seen the same dump: same SHA-256, same length, same total."""
    first = next((r for rs in res.runs.values() for r in rs), None)
    if first is not None and run.dump_total != first.dump_total:
        raise BenchError(f"{res.vm}: QEMU dumped {run.dump_total} bytes, before {first.dump_total}")
    if run.raw_sha256 is not None:
        if not res.raw_sha256:
            res.raw_sha256 = run.raw_sha256
        elif res.changes:
            if run.raw_sha256 != res.raw_sha256:
                print(
                    f"{res.vm}: {'writer' if res.writer else 'Linux'} guest: {run.method}'s "
                    "SHA-256 not compared with the first method's (the guest wrote between "
                    "them)",
                    file=sys.stderr,
                )
        elif run.raw_sha256 != res.raw_sha256:
            raise BenchError(
                f"{res.vm}: {run.method} got sha256 {run.raw_sha256}, expected {res.raw_sha256}"
            )
    if run.raw_bytes is not None:
        if not res.raw_bytes:
            res.raw_bytes = run.raw_bytes
        elif run.raw_bytes != res.raw_bytes:
            raise BenchError(
                f"{res.vm}: {run.method} got {run.raw_bytes} bytes, expected {res.raw_bytes}"
            )


# ----------------------------------------------------------------------- lab VMs


def _virsh(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


def vm_memory_mib(uri: str, vm: str) -> int:
    out = _virsh(uri, "dominfo", vm)
    if out.returncode != 0:
        raise BenchError(f"no VM {vm}: {out.stderr.strip()}")
    if not re.search(r"^State:\s+running", out.stdout, re.M):
        raise BenchError(f"VM {vm} is not running")
    m = re.search(r"^Max memory:\s+(\d+) KiB", out.stdout, re.M)
    return int(m.group(1)) // 1024 if m else 0


def bench_name(mib: int, writer: bool = False, linux: bool = False) -> str:
    prefix = "vm-wr-bench" if writer else "vm-lx-bench" if linux else "vm-bench"
    return f"{prefix}-{mib // 1024}g" if mib % 1024 == 0 else f"{prefix}-{mib}m"


@contextmanager
def lab_vms(
    uri: str, sizes: Sequence[int], keep: bool, writer: bool = False, linux: bool = False
) -> Iterator[list[str]]:
    """Ensure ``vm-bench-*`` VMs (``vm-wr-bench-*`` writer guests with ``writer``,
    ``vm-lx-bench-*`` Linux guests with ``linux``); on the way out remove those this run
    created."""
    created: list[str] = []
    names: list[str] = []
    try:
        for mib in sizes:
            name = bench_name(mib, writer, linux)
            spec = f"{name}:{mib}" + (":writer" if writer else ":linux" if linux else "")
            existed = _virsh(uri, "dominfo", name).returncode == 0
            print(f"lab/up --vm {spec}", file=sys.stderr, flush=True)
            if not existed:
                created.append(name)
            p = _spawn([str(REPO / "lab" / "up"), "--vm", spec], stdout=sys.stderr)
            if _reap(p, os.waitpid(p.pid, 0)[1]) != 0:
                raise BenchError(f"lab/up --vm {spec} failed")
            names.append(name)
        yield names
    finally:
        if not keep:
            for name in created:
                print(f"lab/down --vm {name}", file=sys.stderr, flush=True)
                subprocess.run(
                    [str(REPO / "lab" / "down"), "--vm", name],
                    stdout=sys.stderr,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )


# ----------------------------------------------------------------------- reporting


def _targets(results: list[VMResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(vm: str, name: str, ok: bool, detail: str) -> None:
        checks.append({"vm": vm, "target": name, "pass": ok, "detail": detail})

    for res in results:
        if "memdump" not in methods:
            continue
        md = res.median("memdump")
        for method, want in (
            ("pigz-1", 3.0),
            ("gzip-6", 8.0),
            ("ssh-aes128gcm", 0.8),
            ("ssh-default", 0.8),
        ):
            if method in methods:
                other = res.median(method)
                x = md.wall_sec and other.wall_sec / md.wall_sec
                check(res.vm, f"memdump >= {want:g}x {method}", x >= want, f"{x:.2f}x")
        rss = md.peak_rss_kib / 1024
        check(res.vm, "memdump peak RSS < 200 MiB", rss < 200, f"{rss:.1f} MiB")
        gz = md.gz_bytes or 0
        rel = gz / res.gzip1_bytes - 1
        check(
            res.vm,
            "memdump gz <= 1.05 x gzip -1",
            rel <= 0.05,
            f"{gz} vs {res.gzip1_bytes} bytes ({rel:+.1%})",
        )
    for res in results:
        if "memdump-live" not in methods:
            continue
        live = res.median("memdump-live")
        ms = live.pause_sec * 1000
        check(res.vm, "live: guest pause <= 50 ms (QEMU events)", ms <= 50, f"{ms:.1f} ms")
        # The pause depends on the guest RAM's page tables (guest_thp_mib): the runs that
        # started with it all on huge pages (a VM's first live capture, or one captured
        # long after the last) apart from those after another live capture split them.
        whole = [r for r in res.runs["memdump-live"] if _thp_whole(res, r)]
        if whole and len(whole) < len(res.runs["memdump-live"]):
            ms = statistics.median(r.pause_sec for r in whole) * 1000
            check(res.vm, "live: pause <= 50 ms, guest RAM on huge pages", ms <= 50,
                  f"{ms:.1f} ms (median of {len(whole)} such run(s))")  # fmt: skip
        if "memdump" in methods:
            md = res.median("memdump")
            ratio = md.pause_sec / live.pause_sec if live.pause_sec else float("inf")
            check(res.vm, "live: pause >= 100x shorter than paused fifo", ratio >= 100,
                  f"{ratio:.0f}x ({md.pause_sec:.3f} s / {live.pause_sec:.4f} s)")  # fmt: skip
            x = live.wall_sec / md.wall_sec
            check(res.vm, "live: end-to-end <= 1.2x paused fifo", x <= 1.2, f"{x:.2f}x")
        rss = live.peak_rss_kib / 1024
        if res.writer:
            details = (live.extra.get("live") or {}).get("details") or {}
            pages = (live.extra.get("live") or {}).get("pages") or {}
            check(res.vm, "live: peak RSS < 300 MiB while the guest writes", rss < 300,
                  f"{rss:.1f} MiB (early {pages.get('early')}, spilled {pages.get('spilled')}, "
                  f"spill peak {_mib(details.get('spill_peak_bytes'))})")  # fmt: skip
        else:
            check(res.vm, "live: peak RSS < 300 MiB", rss < 300, f"{rss:.1f} MiB")
    mem = [r for r in results if "memdump" in methods]
    if len(mem) >= 2:
        peaks = [r.median("memdump").peak_rss_kib / 1024 for r in mem]
        lo, hi = min(peaks), max(peaks)
        ok = hi - lo <= max(10.0, 0.10 * lo)
        detail = ", ".join(f"{r.vm} {v:.1f}" for r, v in zip(mem, peaks, strict=True))
        check("all", "memdump peak RSS flat (<= 10 MiB or 10 % apart)", ok, detail + " MiB")
    return checks


def _inventory_of(hv: HypervisorConfig, work: Path) -> Path:
    """An inventory file of ``hv`` alone, in ``work``."""
    if hv.key_passphrase is not None:
        raise BenchError("--huge-pages cannot rewrite an inventory with a key passphrase")
    path = work / "inventory.yaml"
    doc = {"hypervisors": [hv.model_dump(mode="json", exclude_none=True)]}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _thp_whole(res: VMResult, run: Run) -> bool:
    thp = run.extra.get("guest_thp_mib_at_start")
    return isinstance(thp, int) and thp >= res.memory_mib * 0.9


def _mib(n: object) -> str:
    return f"{n / MiB:.1f} MiB" if isinstance(n, int) else "?"


def print_report(
    results: list[VMResult], methods: Sequence[str], cipher: str, repeat: int
) -> list[dict[str, Any]]:
    labels = {"ssh-default": f"ssh-default ({cipher})", "ssh-aes128gcm": "ssh-aes128gcm"}
    for res in results:
        print(
            f"\n{res.vm}: {res.memory_mib} MiB, raw ELF {res.raw_bytes} bytes "
            f"({res.raw_bytes / MB:.1f} MB), sha256 {res.raw_sha256[:16]}..., "
            f"median of {repeat} run(s)"
        )
        if res.writer:
            print(
                "  writer guest (lab/writer.py), writing during every capture: each method's "
                "bytes differ; the live PT_LOADs were not compared with the paused dump's"
            )
        elif res.linux:
            print(
                "  Linux guest (lab/linux.py), idle, running between captures: each method's "
                "bytes differ; the live PT_LOADs were not compared with the paused dump's"
            )
        head = f"{'method':<40} {'s':>7} {'MB/s':>7} {'md x':>6} {'ratio':>6}"
        print(head + f" {'pause s':>8} {'RSS MiB':>8} {'host CPU':>8}")
        md = res.median("memdump") if "memdump" in methods else None
        for method in methods:
            r = res.median(method)
            mbs = res.raw_bytes / MB / r.wall_sec
            x = f"{r.wall_sec / md.wall_sec:.2f}" if md else "-"
            ratio = f"{res.raw_bytes / r.gz_bytes:.3f}" if r.gz_bytes else "-"
            rss = r.peak_rss_kib / 1024
            rss_s = f"{rss:.1f}" if method in MEMDUMP_METHODS else f"({rss:.1f})"
            print(
                f"{labels.get(method, method):<40} {r.wall_sec:7.2f} {mbs:7.1f} {x:>6} "
                f"{ratio:>6} {r.pause_sec:8.3f} {rss_s:>8} {r.host_cpu_pct:7.0f}%"
            )
            if method == "memdump-live":
                live = r.extra.get("live") or {}
                print(
                    f"{'  memdump-live: QEMU downtime, RAM MB/s':<40} "
                    f"{r.extra.get('pause_ms')} ms, "
                    f"{res.memory_mib * MiB / MB / r.wall_sec:.1f} MB/s of guest RAM, "
                    f"stream {live.get('stream_bytes')} bytes, pages {live.get('pages')}, "
                    f"userfaultfd {live.get('userfaultfd')}"
                )
                runs = res.runs[method]
                print(
                    f"{'  memdump-live: pause ms (huge MiB)':<40} "
                    + ", ".join(
                        f"{x.pause_sec * 1000:.1f} ({x.extra.get('guest_thp_mib_at_start')})"
                        for x in runs
                    )
                    + " run by run: the pause and the guest RAM on huge pages at its start"
                )
                huge = [(x.extra.get("live") or {}).get("details", {}).get("huge_pages")
                        for x in runs]  # fmt: skip
                if any(huge):
                    print(
                        f"{'  memdump-live: huge pages put back':<40} "
                        + ", ".join(
                            f"{h.get('restored')}/{h.get('regions_before')} in "
                            f"{h.get('restore_ms')} ms"
                            if h and "restored" in h
                            else str(h)
                            for h in huge
                        )
                        + " run by run: 2 MiB regions restored after the capture / on huge "
                        "pages before it"
                    )
                details = live.get("details") or {}
                print(
                    f"{'  memdump-live: converter':<40} "
                    f"early {(live.get('pages') or {}).get('early')} pages, "
                    f"spilled {(live.get('pages') or {}).get('spilled')} pages, "
                    f"buffer peak {_mib(details.get('buffer_peak_bytes'))}, "
                    f"spill peak {_mib(details.get('spill_peak_bytes'))}"
                )
            if method in MEMDUMP_METHODS:
                label = {"memdump": "memdump", "memdump-file": "file", "memdump-live": "live"}[
                    method
                ]
                eng = r.extra["engine_duration_sec"]
                print(
                    f"{f'  {label}[engine] (record duration_sec)':<40} {eng:7.2f} "
                    f"{res.raw_bytes / MB / eng:7.1f}"
                )
            if r.cpu_by_group:
                groups = ", ".join(f"{g} {v:.1f}" for g, v in r.cpu_by_group.items())
                total = sum(r.cpu_by_group.values())
                print(f"{'  CPU s by process group':<40} {groups} (sum {total:.1f})")
        if md is not None:
            print(
                f"{'gzip -1 reference (untimed)':<40} {'':>7} {'':>7} {'':>6} "
                f"{res.raw_bytes / res.gzip1_bytes:6.3f}"
            )
    print("\n(RSS in parentheses: sum of the peak RSS of the pipeline's local processes)")
    checks = _targets(results, methods)
    if checks:
        print("\ntargets:")
    for c in checks:
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['vm']:<14} {c['target']:<48} {c['detail']}")
    return checks


# ----------------------------------------------------------------------------- main


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="memdump capture benchmark (see module docstring)")
    ap.add_argument("--sizes", type=_parse_ints, help="lab VM sizes in MiB (default 1024,4096)")
    ap.add_argument("--vms", help="comma-separated existing VMs to use instead of/besides sizes")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (median is shown)")
    ap.add_argument("--keep-vms", action="store_true", help="do not remove the VMs created")
    ap.add_argument(
        "--writer",
        action="store_true",
        help="--sizes VMs are writer guests (lab/writer.py, vm-wr-bench-*) writing all along",
    )
    ap.add_argument(
        "--linux",
        action="store_true",
        help="--sizes VMs are Linux guests (lab/linux.py, vm-lx-bench-*): mostly empty RAM",
    )
    ap.add_argument("--json", type=Path, help="write every number to this file")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"subset of {','.join(METHODS)} (memdump is needed for the targets)",
    )
    ap.add_argument("--no-verify-gz", action="store_true", help="skip decompressing gzip/pigz")
    ap.add_argument("--hypervisor", help="inventory hypervisor (default: the first)")
    ap.add_argument("--tmpdir", type=Path, help="where the .gz files go (default: $TMPDIR)")
    ap.add_argument(
        "--huge-pages",
        choices=("inventory", "restore", "keep"),
        default="inventory",
        help="live captures put guest RAM back on huge pages after them (restore) or not "
        "(keep); default: the hypervisor's live_restore_huge_pages",
    )
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in methods if m not in METHODS]:
        ap.error(f"unknown methods {bad}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.writer and args.linux:
        ap.error("--writer and --linux exclude each other")
    vms_given = [v for v in (args.vms or "").split(",") if v]
    sizes = args.sizes if args.sizes is not None else ([] if vms_given else [1024, 4096])

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    settings = Settings()
    hvs = settings.inventory
    if not hvs:
        raise BenchError("no hypervisor in the inventory (lab/up, then source .lab/env)")
    hv = settings.hypervisor(args.hypervisor) if args.hypervisor else hvs[0]
    if hv.transport != "ssh":
        raise BenchError(f"hypervisor {hv.name} is not reached over SSH")
    work = Path(tempfile.mkdtemp(prefix="memdump-bench-", dir=args.tmpdir))
    if args.huge_pages != "inventory":
        # memdump capture (the child) reads this hypervisor alone, with the setting given.
        hv = hv.model_copy(update={"live_restore_huge_pages": args.huge_pages == "restore"})
        os.environ["MEMDUMP_INVENTORY_FILE"] = str(_inventory_of(hv, work))
    print(f"live captures restore huge pages: {hv.live_restore_huge_pages}", file=sys.stderr)
    lab = Lab(hv)
    cipher = lab.default_cipher()
    busy0, t0 = _host_busy(), time.monotonic()
    time.sleep(1.0)
    idle_check = 100 * (_host_busy() - busy0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
    print(f"host CPU busy before the benchmark: {idle_check:.0f}%", file=sys.stderr)
    if idle_check > 15:
        print("warning: something else is using the CPU; numbers will be noisy", file=sys.stderr)
    results: list[VMResult] = []
    try:
        with lab_vms(hv.libvirt_uri, sizes, args.keep_vms, args.writer, args.linux) as created:
            for vm in [*created, *vms_given]:
                res = VMResult(vm, vm_memory_mib(hv.libvirt_uri, vm), writer=vm in created
                               and args.writer, linux=vm in created and args.linux)  # fmt: skip
                results.append(res)
                for i in range(args.repeat):
                    for method in methods:
                        print(
                            f"{vm} run {i + 1}/{args.repeat}: {method} ...",
                            file=sys.stderr,
                            end=" ",
                            flush=True,
                        )
                        run = run_method(
                            method, lab, vm, work, res, verify_gz=not args.no_verify_gz
                        )
                        res.runs.setdefault(method, []).append(run)
                        print(f"{run.wall_sec:.2f} s", file=sys.stderr, flush=True)
                if not res.raw_bytes:
                    raise BenchError(f"{vm}: no method counted the raw bytes (add memdump)")
    finally:
        _stop_all()
        shutil.rmtree(work, ignore_errors=True)

    print(f"host CPU busy just before the benchmark: {idle_check:.0f}% of {os.cpu_count()} cores")
    checks = print_report(results, methods, cipher, args.repeat)
    if args.json:
        doc = {
            "hypervisor": hv.name,
            "ssh_default_cipher": cipher,
            "host_cpu_busy_pct_before": idle_check,
            "cpu_count": os.cpu_count(),
            "methods": methods,
            "repeat": args.repeat,
            "vms": [
                {
                    "vm": r.vm,
                    "memory_mib": r.memory_mib,
                    "writer": r.writer,
                    "linux": r.linux,
                    "raw_bytes": r.raw_bytes,
                    "raw_sha256": r.raw_sha256,
                    "gzip1_bytes": r.gzip1_bytes,
                    "median": {
                        m: {**asdict(r.median(m)), "mb_s": r.raw_bytes / MB / r.median(m).wall_sec}
                        for m in r.runs
                    },
                    "runs": {m: [asdict(x) for x in rs] for m, rs in r.runs.items()},
                    "wall_sec_stdev": {
                        m: statistics.stdev([x.wall_sec for x in rs]) if len(rs) > 1 else 0.0
                        for m, rs in r.runs.items()
                    },
                }
                for r in results
            ],
            "targets": checks,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"benchmark error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
