"""libvirt driver: ``virsh`` on the hypervisor, reached through a Transport."""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from memdump.errors import (
    ConfigError,
    DumpFailedError,
    HypervisorError,
    InsufficientSpaceError,
    LiveCaptureUnsupportedError,
    MemdumpError,
    StreamStalledError,
    VMNotFoundError,
)
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.hypervisors.exitcodes import Exit
from memdump.hypervisors.fifo import (
    DirStream,
    clean_stale,
    pause_window,
    restore_userfaultfd,
    start_dump,
    token_stdin,
)
from memdump.hypervisors.migration import FIFO_READER, HUGEPAGES, huge_pages, migration_fields
from memdump.hypervisors.scripts import load, read
from memdump.identifiers import validate_id
from memdump.pipeline import DumpSource
from memdump.settings import DISK_SPACE_MARGIN, QEMU_MAX_BANDWIDTH, HypervisorConfig
from memdump.transport.base import CommandResult, Transport

Staging = Literal["fifo", "file"]

# The scripts (sh/libvirt/): $1 = the libvirt URI, then each script's own arguments.
_LIST = load("libvirt/list.sh")
_INFO = load("libvirt/info.sh")
# How old resolve's answer may be for a snapshot to take it instead of asking again: the
# manifest's state_before and XML digest are then at most this much older than the dump
# (which fails on its own if the domain is no longer running).
FRESH_SEC = 2.0


def _info_fields(text: str) -> tuple[dict[str, str], dict[str, str], str]:
    """info.sh's output: dominfo's fields (and the XML digest), virsh version's, the host."""
    info_part, _, rest = text.partition("--memdump-versions--")
    lines = rest.strip().splitlines()
    host = lines[-1].strip() if lines else ""
    return _fields(info_part), _fields("\n".join(lines[:-1])), host


_DUMP = load("libvirt/dump.sh")
_DUMP_FILE = load("libvirt/dump-file.sh")
_ABORT = load("libvirt/abort.sh")
_ABORT_FILE = load("libvirt/abort-file.sh")
_NO_SPACE = re.compile(r"^memdump-insufficient-space (\d+) (\d+) (\d+) (.*)$", re.M)
# While QEMU writes the staged file nothing arrives on the stream, for as long as that
# takes (SSH keepalives still catch a dead peer, the capture deadline a hung dump); past
# this, a silent staged dump is given up as stalled.
_STAGE_WAIT_SEC = 4 * 3600.0

# -- live capture (issue 12): QEMU's background-snapshot through `virsh
# qemu-monitor-command` (sh/libvirt/live.sh says how and why). The FIFO's reader, run by
# live.sh as `setsid sh -c DRAIN` (a constant, quoted into the script's text; without
# its comments: its command line stays one short line).
_DRAIN = "".join(
    ln for ln in read("libvirt/drain.sh").splitlines(keepends=True) if not ln.startswith("#")
).strip()
_LIVE_PREFLIGHT = load("libvirt/live-preflight.sh")
_LIVE = load(
    "libvirt/live.sh",
    DRAIN=shlex.quote(_DRAIN),
    HUGEPAGES=shlex.quote(HUGEPAGES),
    FIFO_READER=shlex.quote(FIFO_READER),
)
_LIVE_ABORT = load("libvirt/live-abort.sh")
_LIVE_REPAIR = load("libvirt/live-repair.sh")
_LIVE_LINE = re.compile(r"^memdump-live-(\w+)(?: (.*))?$")
_SECTION = re.compile(rb"memdump-section ([a-z]+) (\d+)\n")
_QEMU_FIXED_CANCEL = (8, 1)  # QEMU commit 3a8b81f2e639: write tracking stopped on cancel
_MIN_QEMU = (6, 0)  # background-snapshot
_MIN_LIBVIRT = (8, 2)  # virsh qemu-monitor-command --pass-fds
_CAP_SYS_PTRACE = 19

_FIELD = re.compile(r"^([A-Za-z() ]+):\s*(.*)$")


class LibvirtDriver:
    kind = "libvirt"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._uri = hv.libvirt_uri
        self._staging_dir = hv.staging_dir
        self._live_userfaultfd = hv.live_userfaultfd
        self._restore_huge_pages = hv.live_restore_huge_pages
        self._t = transport
        # resolve's answer (when, domain name, info.sh's output), for the snapshot after it.
        self._fresh: tuple[float, str, str] | None = None

    def _run(self, script: str, *args: str, timeout: float = 60.0) -> CommandResult:
        return self._t.run(script, (self._uri, *args), timeout=timeout)

    def list_vms(self) -> list[VMRef]:
        res = self._run(_LIST)
        if res.returncode != 0:
            raise HypervisorError(
                f"{self.name}: virsh list failed: {res.stderr_text}", hypervisor=self.name
            )
        # Replacement, not a crash: a name that is not UTF-8 is then refused as an id when
        # its capture validates it, failing that VM only.
        names = [n.strip() for n in res.stdout.decode("utf-8", "replace").splitlines() if n.strip()]
        return [VMRef(self.name, n, n) for n in names]

    def _info(self, vm_id: str) -> tuple[dict[str, str], dict[str, str], str]:
        return _info_fields(self._dominfo(vm_id))

    def _dominfo(self, vm_id: str) -> str:
        """info.sh's output (it starts with virsh dominfo)."""
        validate_id(vm_id)
        res = self._run(_INFO, vm_id)
        if res.returncode != 0:
            err = res.stderr_text
            if "failed to get domain" in err or "Domain not found" in err:
                raise VMNotFoundError(
                    f"no VM {vm_id!r} on hypervisor {self.name}",
                    vm_id=vm_id,
                    hypervisor=self.name,
                )
            raise HypervisorError(
                f"{self.name}: virsh dominfo {vm_id} failed: {err}",
                vm_id=vm_id,
                hypervisor=self.name,
                retryable=True,
            )
        return res.stdout.decode("utf-8", "replace")

    def resolve(self, vm_id: str) -> VMRef:
        """The domain's name for any of its ids. It asks what snapshot asks (info.sh) and
        keeps the answer for a snapshot of the same domain right after (one remote command
        fewer on the way to a capture: the CLI's and the chain's find, then snapshot)."""
        text = self._dominfo(vm_id)
        name = _fields(text.partition("--memdump-versions--")[0]).get("Name", "")
        ref = VMRef(self.name, validate_id(name, what="domain name"), name)
        self._fresh = (time.monotonic(), name, text)
        return ref

    def snapshot(self, ref: VMRef) -> VMInfo:
        fresh, self._fresh = self._fresh, None
        if fresh is not None and fresh[1] == ref.name and time.monotonic() - fresh[0] < FRESH_SEC:
            info, ver, host = _info_fields(fresh[2])
        else:
            info, ver, host = self._info(ref.name)
        versions = {}
        if "Using library" in ver:
            versions["libvirt"] = ver["Using library"].removeprefix("libvirt ").strip()
        if "Running hypervisor" in ver:
            versions["hypervisor"] = ver["Running hypervisor"].strip()
        dom_id = info.get("Id", "-")
        return VMInfo(
            domain_xml_sha256=info.get("Memdump domain xml digest", ""),
            host_key=self._t.host_key_fingerprint(),
            ref=ref,
            uuid=info.get("UUID", ""),
            domain_id=None if dom_id == "-" else dom_id,
            state=info.get("State", "unknown"),
            memory_bytes=_kib(info.get("Used memory") or info.get("Max memory", "0")),
            hypervisor_host=host,
            versions=versions,
            taken_at=datetime.now(UTC),
        )

    def open_dump(
        self,
        ref: VMRef,
        *,
        staging: Staging = "fifo",
        margin: float = DISK_SPACE_MARGIN,
        mode: Literal["paused", "live"] = "paused",
        spill_dir: Path | None = None,
        buffer_bytes: int = 64 << 20,
        max_bandwidth: int | None = None,
        preflight: LivePreflight | None = None,
    ) -> DumpSource:
        """``staging`` (Settings.staging): "fifo" streams QEMU's output as it is written
        (the guest is paused for the whole transfer); "file" has QEMU write a temp file in
        the hypervisor's ``staging_dir`` first, after checking that memory size x
        ``margin`` (Settings.disk_space_margin) is free there, then streams that file.
        ``mode="live"``: the guest keeps running; QEMU's background snapshot is turned
        into the ELF core on the collector (memdump.livecore, early pages buffered up to
        ``buffer_bytes``, then spilled into ``spill_dir``), capped at ``max_bandwidth``
        bytes/s if set (QEMU's max-bandwidth while it runs, the VM's own value put back
        after it); staging does not apply. ``preflight``: this domain's live_preflight,
        if the caller already has it (memdump.capture runs it beside the snapshot).
        LiveCaptureUnsupportedError (before the guest was touched) if it cannot be."""
        validate_id(ref.name, what="domain name")
        if mode == "live":
            from memdump.livecore import GuestLayout, LayoutError, LiveCoreSource
            from memdump.livecore import elf_machine_from_registers as machine_of

            pre = preflight if preflight is not None else self.live_preflight(ref)
            try:
                layout = GuestLayout.from_mtree(pre.mtree)
                machine = machine_of(pre.registers)
            except LayoutError as exc:
                reason = f"the guest's memory layout is not understood: {exc}"
                raise LiveCaptureUnsupportedError(
                    f"live capture of {ref.name} on {self.name} is not possible: {reason}",
                    reason=reason,
                    hypervisor=self.name,
                    vm_id=ref.vmid,
                ) from exc
            raw = self.open_live_stream(ref, pre, max_bandwidth)
            return LiveCoreSource(
                raw,
                layout,
                spill_dir=spill_dir if spill_dir is not None else Path("."),
                buffer_bytes=buffer_bytes,
                machine=machine,
            )
        if staging == "fifo":
            stream, _ = start_dump(self._t, _DUMP, (self._uri, ref.name), self.name)
            return _VirshDump(stream, self.name, ref, self._stop_dump)
        if staging != "file":
            raise ConfigError(f"unknown staging {staging!r}", hypervisor=self.name)
        milli = max(0, math.ceil(margin * 1000 - 1e-6))
        args = (self._uri, ref.name, self._staging_dir or "", str(milli))
        stream, token = start_dump(self._t, _DUMP_FILE, args, self.name)
        # The abort acts on this script's own directory only (None: it never made one).
        stop = functools.partial(self._stop_staged_dump, token=token, directory=stream.dir)
        return _VirshDump(stream, self.name, ref, stop, staging="file", margin=margin)

    def live_preflight(self, ref: VMRef) -> LivePreflight:
        """One remote command, nothing changed: can this domain be captured live?"""
        validate_id(ref.name, what="domain name")
        res = self._run(_LIVE_PREFLIGHT, ref.name, self._live_userfaultfd, timeout=120.0)
        if res.returncode != 0:
            raise HypervisorError(
                f"{self.name}: live preflight of {ref.name} failed: {res.stderr_text}",
                hypervisor=self.name,
                vm_id=ref.vmid,
                retryable=True,
            )
        return judge_preflight(
            parse_sections(res.stdout), ref.name, self.name, self._live_userfaultfd
        )

    def open_live_stream(
        self, ref: VMRef, pre: LivePreflight, max_bandwidth: int | None = None
    ) -> _LiveStream:
        """Start the live script; returns its raw migration stream once the first bytes
        arrived (a refusal by the script raises here). ``max_bandwidth``: a cap (bytes/s)
        on the snapshot, QEMU's max-bandwidth while it runs, the previous value put back
        after it; None: no cap (QEMU does not rate-limit a background snapshot)."""
        if max_bandwidth is not None and not 0 < max_bandwidth <= QEMU_MAX_BANDWIDTH:
            raise ConfigError(
                f"max_bandwidth {max_bandwidth} is not 1 to 2**64-1 bytes/s", hypervisor=self.name
            )
        how = "window" if pre.userfaultfd == "sysctl-window" else "direct"
        bw = "" if max_bandwidth is None else str(max_bandwidth)
        huge = "restore" if self._restore_huge_pages else "keep"
        args = (self._uri, ref.name, how, pre.stop, bw, huge)
        stream, token = start_dump(self._t, _LIVE, args, self.name)
        live = _LiveStream(stream, self, ref, token, pre)
        try:
            live.start()
        except BaseException:
            live.abort()
            raise
        return live

    def _stop_dump(self, ref: VMRef) -> None:
        # Closing the channel already breaks the FIFO (QEMU gets EPIPE, fails the dump and
        # resumes the guest); asking libvirt to abort the job as well is belt and braces.
        try:
            self._run(_ABORT, ref.name, timeout=15.0)
        except MemdumpError:
            pass

    def _stop_staged_dump(self, ref: VMRef, *, token: str, directory: str | None) -> None:
        if directory is None:
            return  # the script ended before it made its directory: no dump started
        try:
            self._t.run(
                _ABORT_FILE,
                (self._uri, ref.name, directory),
                timeout=30.0,
                stdin=token_stdin(token),
            )
        except MemdumpError:
            pass

    def clean_stale(self, min_age_sec: float = 60.0) -> list[str]:
        # First what killed live scripts left in QEMU (their directories say so), and a
        # userfaultfd window left open; then the directories themselves.
        res = self._run(_LIVE_REPAIR, timeout=300.0)
        if res.returncode != 0:
            raise HypervisorError(
                f"{self.name}: repair after killed live captures failed: {res.stderr_text}",
                hypervisor=self.name,
                retryable=True,
            )
        removed = [ln for ln in res.stdout.decode("utf-8", "replace").splitlines() if ln]
        removed += restore_userfaultfd(self._t, self.name)
        removed += clean_stale(self._t, self.name, min_age_sec)
        if self._staging_dir is not None:
            removed += clean_stale(self._t, self.name, min_age_sec, self._staging_dir)
        return removed

    def close(self) -> None:
        self._t.close()


class _VirshDump:
    def __init__(
        self,
        stream: DirStream,
        hv: str,
        ref: VMRef,
        stop: Callable[[VMRef], None],
        *,
        staging: Staging = "fifo",
        margin: float = DISK_SPACE_MARGIN,
    ) -> None:
        self._s = stream
        self._hv = hv
        self._ref = ref
        self._stop = stop
        self._finished = False
        self._margin = margin
        # Staged: the first byte comes only after QEMU has written the whole file.
        self._flowing = staging == "fifo"
        self._opened = time.monotonic()
        self.pause_window: tuple[datetime, datetime] | None = None
        self.dump_format = "ELF64 core: virsh dump --memory-only --format elf"
        self.staging: Staging = staging

    def readinto(self, view: memoryview) -> int:
        if self._flowing:
            return self._s.readinto(view)
        while True:
            try:
                n = self._s.readinto(view)
            except StreamStalledError:
                if self._s.aborted or time.monotonic() - self._opened > _STAGE_WAIT_SEC:
                    raise
                continue
            self._flowing = True
            return n

    def close_ok(self) -> None:
        res = self._s.finish(timeout=60.0)
        self._finished = True
        stderr, self.pause_window = pause_window(res.stderr_text)
        if self.staging == "file":
            self._check_staging(res.returncode, stderr)
        if res.returncode != 0:
            raise DumpFailedError(
                f"virsh dump of {self._ref.name} on {self._hv} failed "
                f"(exit {res.returncode}): {stderr or 'no message'}",
                hypervisor=self._hv,
                vm_id=self._ref.vmid,
                exit_code=res.returncode,
                stderr=stderr[-2000:],
            )

    def _check_staging(self, rc: int, stderr: str) -> None:
        """The staged script's own refusals, made before the guest was paused."""
        m = _NO_SPACE.search(stderr)
        if rc == Exit.NO_SPACE and m is not None:
            free, need, mem = (int(x) for x in m.groups()[:3])
            where = m.group(4)
            raise InsufficientSpaceError(
                f"not enough space on hypervisor {self._hv} in {where} to stage the dump "
                f"of {self._ref.name}: {free} bytes free, {need} needed ({mem} bytes of "
                f"memory x {self._margin}); the guest was not paused",
                hypervisor=self._hv,
                vm_id=self._ref.vmid,
                path=where,
                free_bytes=free,
                needed_bytes=need,
                memory_bytes=mem,
            )
        if rc == Exit.NO_TEMP_DIR:
            raise HypervisorError(
                f"{self._hv}: cannot make a staging temp dir for {self._ref.name}: "
                f"{stderr or 'no message'}",
                hypervisor=self._hv,
                vm_id=self._ref.vmid,
                exit_code=rc,
                stderr=stderr[-2000:],
            )

    def abort(self) -> None:
        if not self._s.abort():
            return  # aborted already
        if self.staging == "file" and self._finished:
            return  # the script has exited: no dump of ours is left to stop
        self._stop(self._ref)


@dataclass(frozen=True)
class LivePreflight:
    """What the live preflight found (all checks passed)."""

    userfaultfd: str  # "root" | "cap-sys-ptrace" | "unprivileged-allowed" | "sysctl-window"
    qemu_uid: int
    qemu_version: str
    libvirt_version: str
    mtree: str  # HMP `info mtree -f`
    registers: str  # HMP `info registers`
    stop: Literal["drain", "cancel"]  # what an abort does (see _LIVE)
    capability_was_on: bool  # background-snapshot found on before we started


def parse_sections(data: bytes) -> dict[str, str]:
    """The preflight's ``memdump-section NAME LENGTH`` blocks (lengths in bytes)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        m = _SECTION.match(data, pos)
        if m is None:
            raise HypervisorError(
                f"live preflight output not understood at byte {pos}: {data[pos : pos + 80]!r}"
            )
        start = m.end()
        end = start + int(m.group(2))
        if end + 1 > len(data) or data[end : end + 1] != b"\n":
            raise HypervisorError(f"live preflight section {m.group(1).decode()!r} is cut short")
        out[m.group(1).decode()] = data[start:end].decode("utf-8", "replace")
        pos = end + 1
    return out


def _qmp_return(text: str, what: str) -> Any:
    """The ``return`` of a QMP reply printed by virsh; None if it is an error or not JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if isinstance(doc, dict) and "return" in doc:
        return doc["return"]
    return None


def _qmp_error(text: str) -> str:
    """QMP's own words for an error reply (``error.desc``), else the text itself."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return str(doc["error"].get("desc", doc["error"]))[:500]
    return text.strip()[:500]


def _version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x or 0) for x in m.groups()) if m else None


def _vfio_devices(xml_text: str) -> list[str]:
    """PCI/mdev host devices and hostdev interfaces (VFIO) in a domain's XML."""
    found = []
    for tag, attrs in re.findall(r"<(hostdev|interface)\b([^>]*)>", xml_text):
        kind = re.search(r"""\btype=["']([^"']*)["']""", attrs)
        mode = re.search(r"""\bmode=["']([^"']*)["']""", attrs)
        if tag == "hostdev" and kind and kind.group(1) in ("pci", "mdev"):
            if mode is None or mode.group(1) == "subsystem":
                found.append(f"hostdev type {kind.group(1)}")
        elif tag == "interface" and kind and kind.group(1) == "hostdev":
            found.append("interface type hostdev")
    return found


def judge_preflight(
    sec: dict[str, str], domain: str, hv: str, live_userfaultfd: str
) -> LivePreflight:
    """Live capture possible -> what the script needs; else LiveCaptureUnsupportedError
    with a plain reason. Nothing on the guest has been changed at this point."""

    def no(reason: str) -> LiveCaptureUnsupportedError:
        return LiveCaptureUnsupportedError(
            f"live capture of {domain} on {hv} is not possible: {reason}",
            reason=reason,
            hypervisor=hv,
            vm_id=domain,
        )

    state = sec.get("state", "").strip()
    if state != "running":
        raise no(f"the guest is {state or 'in an unknown state'}, not running")
    lib_text = sec.get("libvirt", "")
    m = re.search(r"Using library: libvirt (\S+)", lib_text)
    lib = _version(m.group(1)) if m else None
    if lib is None:
        raise no("the libvirt version is unknown (virsh version)")
    if lib < _MIN_LIBVIRT:
        raise no(f"libvirt {m.group(1) if m else '?'} is older than 8.2 (no --pass-fds)")
    if sec.get("missing", "").strip():
        raise no(f"missing on the hypervisor: {sec['missing'].strip()}")
    xml_text = sec.get("xml", "")
    if "<domain" not in xml_text:
        raise no(f"the domain XML cannot be read: {xml_text.strip()[:200]}")
    vfio = _vfio_devices(xml_text)
    if vfio:
        raise no(f"the domain has VFIO devices ({', '.join(vfio)}), which cannot be migrated")
    pid = sec.get("pid", "").strip()
    if not pid.isdigit():
        raise no("cannot find the domain's QEMU process (libvirt's pid file)")
    status = sec.get("status", "")
    uid_m = re.search(r"^Uid:\s+\d+\s+(\d+)", status, re.M)
    cap_m = re.search(r"^CapEff:\s+([0-9a-fA-F]+)\s*$", status, re.M)
    if uid_m is None or cap_m is None:
        raise no(f"cannot read the credentials of QEMU process {pid}")
    uid = int(uid_m.group(1))
    privileged = bool(int(cap_m.group(1), 16) >> _CAP_SYS_PTRACE & 1)
    sysctl = sec.get("uffd", "").strip()
    if privileged:
        method = "root" if uid == 0 else "cap-sys-ptrace"
    elif sysctl not in ("0", "1"):
        raise no("the kernel has no vm.unprivileged_userfaultfd (userfaultfd unavailable)")
    elif live_userfaultfd == "sysctl-window":
        # Even if the sysctl reads 1 now: that may be another capture's window, closed by
        # the time this one's QEMU needs it. The window reads the value under its lock.
        method = "sysctl-window"
    elif sysctl == "1":
        method = "unprivileged-allowed"
    else:
        raise no(
            f"QEMU runs as uid {uid} without CAP_SYS_PTRACE and vm.unprivileged_userfaultfd "
            f"is 0, so it cannot create the userfaultfd write tracking needs; set "
            f"live_userfaultfd: sysctl-window for hypervisor {hv} to allow it for the "
            "milliseconds QEMU needs (memdump never changes the host's sysctl otherwise)"
        )
    if "version" not in sec:
        raise HypervisorError(
            f"{hv}: the live preflight of {domain} stopped before asking QEMU", hypervisor=hv
        )
    ver = _qmp_return(sec["version"], "query-version")
    try:
        q = ver["qemu"]
        qemu = (int(q["major"]), int(q["minor"]), int(q["micro"]))
    except (TypeError, KeyError, ValueError):
        raise no(f"QEMU's version is unknown: {_qmp_error(sec['version'])}") from None
    qemu_text = ".".join(map(str, qemu))
    if qemu < _MIN_QEMU:
        raise no(f"QEMU {qemu_text} is older than 6.0 (no background-snapshot)")
    mig = _qmp_return(sec.get("migrate", ""), "query-migrate")
    if not isinstance(mig, dict):
        raise no(f"query-migrate failed: {_qmp_error(sec.get('migrate', ''))}")
    mstatus = mig.get("status", "none")
    if mstatus not in ("none", "completed", "failed", "cancelled"):
        raise no(f"a migration is in progress (status {mstatus})")
    caps = _qmp_return(sec.get("caps", ""), "query-migrate-capabilities")
    bg = [
        c
        for c in caps or []
        if isinstance(c, dict) and c.get("capability") == "background-snapshot"
    ]
    if not bg:
        raise no(f"QEMU {qemu_text} does not know the background-snapshot capability")
    mtree = sec.get("mtree", "")
    if "FlatView" not in mtree:
        raise no(f"QEMU did not give its memory layout (info mtree -f): {mtree.strip()[:200]}")
    return LivePreflight(
        userfaultfd=method,
        qemu_uid=uid,
        qemu_version=qemu_text,
        libvirt_version=".".join(map(str, lib)),
        mtree=mtree,
        registers=sec.get("registers", ""),
        stop="cancel" if qemu >= _QEMU_FIXED_CANCEL else "drain",
        capability_was_on=bool(bg[0].get("state")),
    )


def _event_time(text: str) -> datetime | None:
    """``2026-11-29 05:09:50.737`` (virsh qemu-monitor-event --timestamp, UTC)."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None


def parse_live_stderr(stderr: str) -> tuple[str, dict[str, str]]:
    """The live script's ``memdump-live-NAME VALUE`` lines, and the rest of its stderr."""
    lines: dict[str, str] = {}
    rest = []
    for line in stderr.splitlines():
        m = _LIVE_LINE.match(line.strip())
        if m:
            lines[m.group(1)] = (m.group(2) or "").strip()
        else:
            rest.append(line)
    return "\n".join(rest).strip(), lines


def live_metadata(lines: dict[str, str], pre: LivePreflight) -> dict[str, Any]:
    """The ``live`` part of the manifest from the script's lines and the preflight."""
    live: dict[str, Any] = {
        "driver": "libvirt",
        "qemu_version": pre.qemu_version,
        "libvirt_version": pre.libvirt_version,
        "userfaultfd": pre.userfaultfd,
        "abort": pre.stop,
        # libvirt does not know this migration: no job (domjobinfo "None"); the monitor
        # commands taint the domain.
        "libvirt_job": "none",
    }
    stats = _qmp_return(lines.get("stats", ""), "query-migrate")
    if isinstance(stats, dict):
        live["stats"] = stats
        live.update(migration_fields(stats))
    # QEMU's STOP and RESUME events (QEMU's clock, milliseconds as virsh prints them):
    # the vCPUs stopped to arm write tracking, and ran again.
    stop_s, _, resume_s = lines.get("events", "").partition("|")
    stopped, resumed = _event_time(stop_s), _event_time(resume_s)
    if stopped is not None:
        live["stopped_at"] = stopped.isoformat()
        live["snapshot_at"] = stopped.isoformat()
    if stopped is not None and resumed is not None and resumed >= stopped:
        live["resumed_at"] = resumed.isoformat()
        live["pause_ms_events"] = round((resumed - stopped).total_seconds() * 1000, 3)
    # Without the events, the snapshot instant from QEMU's times: the vCPUs stop when its
    # setup ends, setup-time after the migration's start; the start is when the script
    # read total-time at t1 minus that total-time (early by the few ms virsh took).
    t1_time, _, t1_reply = lines.get("t1", "").partition(" ")
    at_t1 = _qmp_return(t1_reply, "query-migrate")
    setup = live.get("setup_time_ms")
    if (
        "snapshot_at" not in live
        and isinstance(at_t1, dict)
        and isinstance(at_t1.get("total-time"), int)
        and setup is not None
    ):
        try:
            start = float(t1_time) - at_t1["total-time"] / 1000
            live["snapshot_at"] = datetime.fromtimestamp(start + setup / 1000, UTC).isoformat()
        except ValueError:
            pass
    uffd = lines.get("uffd", "").split()
    if len(uffd) == 3 and uffd[0] == "window":
        try:
            live["userfaultfd_window_ms"] = round((float(uffd[2]) - float(uffd[1])) * 1000, 1)
        except ValueError:
            pass
    taint = [t for t in lines.get("taint", "").split() if re.fullmatch(r"[a-z0-9-]{1,40}", t)]
    live["taint"] = taint
    bw = re.fullmatch(r"(\d{1,20}) (\d{1,20})", lines.get("bandwidth", ""))
    if bw:
        # The cap on the snapshot (QEMU's max-bandwidth while it ran, bytes/s) and the
        # VM's own value, put back after it.
        live["max_bandwidth"] = int(bw.group(2))
        live["max_bandwidth_before"] = int(bw.group(1))
    huge = huge_pages(lines.get("hugepages"))
    if huge is not None:
        live["huge_pages"] = huge
    return live


class _LiveStream:
    """The live script's migration stream (a DumpSource of raw stream bytes), with what
    the script reported at its end: ``live`` (metadata) and ``pause_window``."""

    dump_format = "QEMU migration stream (background-snapshot)"

    def __init__(
        self,
        stream: DirStream,
        driver: LibvirtDriver,
        ref: VMRef,
        token: str,
        pre: LivePreflight,
    ) -> None:
        self._s = stream
        self._d = driver
        self._ref = ref
        self._token = token
        self._pre = pre
        self._pending = b""
        self._ended = False
        self._end_at_eof = True
        self._error: BaseException | None = None
        self.pause_window: tuple[datetime, datetime] | None = None
        self.live: dict[str, Any] = {}
        self.staging: Staging = "fifo"

    def start(self) -> None:
        """Wait for the stream's first bytes; a script that ends first (refused) raises
        here, so open_dump reports LiveCaptureUnsupportedError before any byte."""
        buf = bytearray(4096)
        got = 0
        while got < 4:
            n = self._s.readinto(memoryview(buf)[got:])
            if n == 0:
                self._end()
                raise DumpFailedError(
                    f"live capture of {self._ref.name} on {self._d.name}: the script ended "
                    "without a migration stream",
                    hypervisor=self._d.name,
                    vm_id=self._ref.vmid,
                )
            got += n
        self._pending = bytes(buf[:got])

    def readinto(self, view: memoryview) -> int:
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        n = self._s.readinto(view)
        if n == 0 and self._end_at_eof:
            self._end()
        return n

    def defer_end(self) -> None:
        """The converter has the whole image: the script's end (its checks of QEMU
        after the stream) is waited for in close_ok, not at the last byte."""
        self._end_at_eof = False

    def _end(self) -> None:
        if self._ended:
            if self._error is not None:
                raise self._error
            return
        self._ended = True
        res = self._s.finish(timeout=600.0)
        stderr, self.pause_window = pause_window(res.stderr_text)
        rest, lines = parse_live_stderr(stderr)
        self.live = live_metadata(lines, self._pre)
        try:
            self._check(res.returncode, rest, lines)
        except MemdumpError as exc:
            self._error = exc
            raise

    def _check(self, rc: int, rest: str, lines: dict[str, str]) -> None:
        hv, name = self._d.name, self._ref.name
        fields: dict[str, Any] = {
            "hypervisor": hv,
            "vm_id": self._ref.vmid,
            "exit_code": rc,
            "stderr": rest[-2000:],
        }
        if rc == 0:
            return
        if rc == Exit.LIVE_UNSUPPORTED and "unsupported" in lines:
            reason = _qmp_error(lines["unsupported"])
            raise LiveCaptureUnsupportedError(
                f"live capture of {name} on {hv} is not possible: {reason}",
                reason=reason,
                hypervisor=hv,
                vm_id=self._ref.vmid,
            )
        status = self.live.get("migration_status")
        whats: dict[int, str] = {
            Exit.MONITOR_FAILED: "a QEMU monitor command failed",
            Exit.NO_RUN_DIR: "the run directory or the userfaultfd window is not usable",
            Exit.MIGRATION_FAILED: f"the migration did not complete (status {status})",
            Exit.WRITE_PROTECTED: "QEMU left the guest's memory write-protected after the "
            "migration (QEMU < 8.1 does not stop write tracking of a failed background "
            "snapshot): the guest will hang on its next write to such a page; restart it",
            Exit.LEFT_PAUSED: "the migration left the guest paused (it was not a background "
            "snapshot); it was resumed",
            Exit.READER_FAILED: "the FIFO reader failed",
        }
        what = whats.get(rc, "the live capture script failed")
        raise DumpFailedError(
            f"live capture of {name} on {hv} failed (exit {rc}): {what}: {rest or 'no message'}",
            retryable=rc in (Exit.MIGRATION_FAILED, Exit.READER_FAILED),
            **fields,
        )

    def close_ok(self) -> None:
        self._end()

    def abort(self) -> None:
        if not self._s.abort():
            return  # aborted already
        d = self._s.dir
        if d is None or self._ended or self._pre.stop != "cancel":
            return  # before 8.1 closing the stream is the whole abort: the reader drains
        try:
            self._d._t.run(
                _LIVE_ABORT,
                (self._d._uri, self._ref.name, d),
                timeout=30.0,
                stdin=token_stdin(self._token),
            )
        except MemdumpError:
            pass


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = _FIELD.match(line.strip())
        if m:
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def _kib(value: str) -> int:
    m = re.match(r"(\d+)\s*KiB", value)
    return int(m.group(1)) * 1024 if m else 0
