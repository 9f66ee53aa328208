"""Plain-QEMU driver: QEMU processes not managed by libvirt, reached through QMP.

Each VM is a QEMU process with a QMP unix socket ``<qmp_dir>/<name>.qmp`` on the
hypervisor (e.g. ``-qmp unix:/run/memdump-qemu/vm-01.qmp,server=on,wait=off``). The
driver runs fixed sh scripts (sh/qemu/) through a Transport, like the libvirt driver;
QMP itself is spoken by a small Python program, memdump/hypervisors/remote/qmp.py, which
the scripts run with the hypervisor's ``python3`` (its text in a quoted here-document,
values as arguments). Python, not socat, because a dump hands QEMU an open file descriptor over the
socket (SCM_RIGHTS), which socat cannot send. Replies are parsed here, not on the
hypervisor.

Who serves a socket is checked before anything is sent on it: the connection's peer
credentials (SO_PEERCRED: the pid of the process that listens) and that process's
``/proc/PID/exe``, which must be an allowed QEMU binary (``qemu_binaries``) owned and
writable by root only. A socket served by anything else is not a VM: not listed, and
refused (a non-retryable HypervisorError) when asked for by name. The manifest's pid and
command-line digest are that peer's, never a process found by its name.

The dump is ``dump-guest-memory`` (``paging: false``, ``format: elf``) into a private
FIFO whose reader (``cat``) is started first, as the libvirt driver does. QEMU never gets
a path: the QMP client opens the FIFO's write end (without blocking: no reader, no dump),
passes the descriptor with ``getfd`` and asks for ``protocol: fd:memdump``, so the FIFO
stays 0600 root in the script's 0700 directory whatever uid QEMU runs as, and no other
process can open it. Without ``detach`` QEMU runs the dump to its end before it answers,
so the reply marks the end of the pause. Aborting = closing the stream: the reader gets
EPIPE, so does QEMU, which fails the dump and resumes the guest.

Limits: while QEMU dumps a VM its QMP socket (one client at a time) and main loop are
busy, so listing or snapshotting that VM meanwhile waits for the dump (list_vms skips a
socket that does not answer within a few seconds). ``staging="file"`` is not supported (a
ConfigError): QMP has no way to cancel a running dump-guest-memory, so a file-staged dump
could not be stopped once QEMU writes the file. The hypervisor needs ``python3`` (3.6 or
later; Debian's qemu-system does not pull it in): without it every operation fails with a
non-retryable HypervisorError saying so.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from memdump.errors import (
    ConfigError,
    DumpFailedError,
    HypervisorError,
    LiveCaptureUnsupportedError,
    MemdumpError,
    MigrationStreamError,
    VMNotFoundError,
)
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.hypervisors.exitcodes import Exit
from memdump.hypervisors.fifo import (
    TokenFifoDump,
    clean_stale,
    fifo_only,
)
from memdump.hypervisors.migration import FIFO_READER, HUGEPAGES, huge_pages, migration_fields
from memdump.hypervisors.scripts import load
from memdump.identifiers import validate_id
from memdump.livecore import EM_X86_64, GuestLayout, LiveCoreSource, elf_machine_from_registers
from memdump.pipeline import DumpSource
from memdump.settings import DISK_SPACE_MARGIN, QEMU_MAX_BANDWIDTH, HypervisorConfig
from memdump.transport.base import CommandResult, Transport

Staging = Literal["fifo", "file"]
DEFAULT_QMP_DIR = "/run/memdump-qemu"

# The QMP client, run by the scripts as `python3 -I -S - MODE ARG...` with this text on
# stdin (memdump_qmp, sh/qemu/common.sh).
QMP_SOURCE = resources.files("memdump.hypervisors.remote").joinpath("qmp.py").read_text("utf-8")


def _compact(text: str) -> str:
    """The client as the scripts carry it: without its module docstring and whole-line
    comments. A script is one argument of ``sh -c`` (at most 128 KiB on Linux,
    MAX_ARG_STRLEN)."""
    head, _, rest = text.partition('"""')
    body = rest.partition('"""')[2]
    return "".join(
        ln for ln in (head + body).splitlines(keepends=True) if not ln.lstrip().startswith("#")
    )


QMP_CLIENT = _compact(QMP_SOURCE)
_EOF = "MEMDUMP_QMP_CLIENT"  # ends the here-document of memdump_qmp (sh/qemu/common.sh)
if any(line.strip() == _EOF for line in QMP_CLIENT.splitlines()):  # pragma: no cover
    raise RuntimeError(f"{_EOF} ends the here-document: it must not be a line of qmp.py")


def _script(name: str) -> str:
    """A qemu script (sh/qemu/NAME.sh) after lib.sh and sh/qemu/common.sh (the python3
    check and memdump_qmp, which holds the QMP client once)."""
    return load(
        "qemu/common.sh",
        f"qemu/{name}.sh",
        QMP_CLIENT=QMP_CLIENT.removesuffix("\n"),
        HUGEPAGES=shlex.quote(HUGEPAGES),
        FIFO_READER=shlex.quote(FIFO_READER),
    )


_STATUS = '{"execute":"query-status","id":"memdump-1"}'
_NAME = '{"execute":"query-name","id":"memdump-2"}'
_UUID = '{"execute":"query-uuid","id":"memdump-3"}'
_MEM = '{"execute":"query-memory-size-summary","id":"memdump-4"}'
_VERSION = '{"execute":"query-version","id":"memdump-5"}'

# The scripts: $1 = qmp_dir for those that name a VM (sh/qemu/ says what each takes).
_SCAN = _script("scan")
_INFO = _script("info")
_DUMP = _script("dump")
_PREFLIGHT = _script("preflight")
_LIVE = _script("live")
_REPAIR = _script("repair")
# Without the client (it needs no python3): $1 = the live script's directory.
_ABORT_LIVE = load("qemu/abort-live.sh")

_REPLY = re.compile(r"^memdump-qmp-reply (.*)$", re.M)
_ERROR = re.compile(r"^memdump-error (\d+) (.*)$", re.M)
_STATES = {"suspended": "pmsuspended"}


def _replies(text: str) -> dict[str, Any]:
    """QMP replies by id ("memdump-1" ...); unparsable lines are skipped."""
    out: dict[str, Any] = {}
    for m in _REPLY.finditer(text):
        try:
            doc = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            out[doc["id"]] = doc
    return out


def _ret(replies: dict[str, Any], n: int) -> dict[str, Any]:
    doc = replies.get(f"memdump-{n}", {}).get("return")
    return doc if isinstance(doc, dict) else {}


def _qmp_error(text: str) -> str:
    """The desc of the last QMP error reply in ``text``, "" if none."""
    for doc in reversed(list(_replies(text).values())):
        err = doc.get("error")
        if isinstance(err, dict):
            return str(err.get("desc") or err.get("class") or err)
    return ""


class _Sock:
    """What the QMP client printed for one socket."""

    def __init__(self, text: str) -> None:
        self.replies = _replies(text)
        m = _ERROR.search(text)
        self.error = (int(m.group(1)), m.group(2).strip()) if m else None
        self.peer: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("memdump-peer "):
                parts = line.split(" ", 5)
                if len(parts) == 6:
                    keys = ("pid", "uid", "gid", "cmdline_sha256", "exe")
                    self.peer = dict(zip(keys, parts[1:], strict=True))

    @property
    def is_qemu(self) -> bool:
        return bool(self.peer) and not (self.error and self.error[0] == Exit.NOT_QEMU)


def _blocks(text: str) -> list[tuple[str, _Sock]]:
    """(socket path, what was printed for it) for each "memdump-sock" block."""
    parts = re.split(r"^memdump-sock (.*)$", text, flags=re.M)
    return [(parts[i].strip(), _Sock(parts[i + 1])) for i in range(1, len(parts) - 1, 2)]


def _no_python(hv: str, output: str = "", **fields: Any) -> HypervisorError:
    """python3 is not there (Exit.NO_PYTHON from sh/qemu/common.sh) or cannot run the
    client (the client's Exit.NO_PYTHON: too old, a module missing; ``output`` holds its
    memdump-error line)."""
    m = _ERROR.search(output)
    what = f"cannot run the QMP client ({m.group(2).strip()})" if m else "is missing"
    return HypervisorError(
        f"{hv}: python3 on the hypervisor {what}; the qemu driver needs python3 (3.6 or later, "
        "with its standard library) to speak QMP and pass the dump's file descriptor to QEMU",
        hypervisor=hv,
        retryable=False,
        **fields,
    )


def _not_qemu(hv: str, vm: str, why: str) -> HypervisorError:
    return HypervisorError(
        f"{hv}: the QMP socket of {vm} is not served by an allowed QEMU binary, nothing was "
        f"sent to it ({why}); see qemu_binaries",
        hypervisor=hv,
        vm_id=vm,
        retryable=False,
    )


# The migration stream's header: QEMU_VM_FILE_MAGIC "QEVM", QEMU_VM_FILE_VERSION 3.
_STREAM_HEAD = b"QEVM\x00\x00\x00\x03"
_MIN_QEMU = (6, 0)  # background-snapshot


@dataclass(frozen=True)
class LivePreflight:
    """What the preflight found on a VM that can be captured live."""

    qemu_version: str
    userfaultfd: str  # "root" | "unprivileged-allowed" | "sysctl-window"
    mtree: str  # HMP ``info mtree -f``: the guest-physical layout of its RAM blocks
    registers: str = ""  # HMP ``info registers`` (first vCPU): the core's e_machine
    pid: str = ""  # of the QEMU that answered (the socket's peer, checked to be QEMU)


def judge_preflight(text: str, policy: str, hv: str, vm: str) -> LivePreflight:
    """The client's preflight output -> LivePreflight, or LiveCaptureUnsupportedError
    (``reason``: a short sentence) for a VM that cannot be captured live."""
    sock = _blocks("memdump-sock x\n" + text)[0][1]
    if sock.error and sock.error[0] == Exit.NOT_QEMU:
        raise _not_qemu(hv, vm, sock.error[1])
    rep = sock.replies

    def unsupported(reason: str) -> LiveCaptureUnsupportedError:
        return LiveCaptureUnsupportedError(
            f"{hv}: {vm} cannot be captured live: {reason}", hypervisor=hv, vm_id=vm, reason=reason
        )

    if sock.error or "memdump-7" not in rep:
        why = sock.error[1] if sock.error else "no complete answer"
        raise HypervisorError(
            f"{hv}: live preflight of {vm} failed: {_qmp_error(text) or why}",
            hypervisor=hv,
            vm_id=vm,
            retryable=True,
        )
    q = _ret(rep, 1).get("qemu")
    try:
        ver = (int(q["major"]), int(q["minor"]), int(q["micro"]))  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise unsupported("QEMU did not report its version") from None
    version = ".".join(map(str, ver))
    if ver[:2] < _MIN_QEMU:
        raise unsupported(f"QEMU {version} is older than 6.0 (no background-snapshot)")
    status = _ret(rep, 2).get("status")
    if status != "running":
        raise unsupported(f"the guest is {status}, not running")
    mig = _ret(rep, 3)
    if str(mig.get("status", "none")) not in ("none", "completed", "failed", "cancelled"):
        raise unsupported(f"another migration is in progress (status {mig.get('status')})")
    if mig.get("blocked-reasons"):
        raise unsupported("migration is blocked: " + "; ".join(map(str, mig["blocked-reasons"])))
    caps = rep.get("memdump-4", {}).get("return")
    names = (
        {c.get("capability") for c in caps if isinstance(c, dict)}
        if isinstance(caps, list)
        else set()
    )
    if "background-snapshot" not in names:
        raise unsupported(f"QEMU {version} does not know the capability background-snapshot")
    for n in (5, 6):
        devs = rep.get(f"memdump-{n}", {}).get("return")
        for dev in devs if isinstance(devs, list) else []:
            if isinstance(dev, dict) and str(dev.get("type", "")).startswith("child<vfio"):
                raise unsupported(
                    f"VFIO device {dev.get('name')} (its memory is not RAM QEMU can snapshot)"
                )
    mtree = rep["memdump-7"].get("return")
    if not isinstance(mtree, str):
        raise unsupported(f"no memory layout (info mtree -f): {_qmp_error(text) or 'no answer'}")
    uid = re.search(r"^memdump-qemu-uid (\d+)$", text, re.M)
    uffd = re.search(r"^memdump-uffd (.*)$", text, re.M)
    value = uffd.group(1).strip() if uffd else ""
    if uid is not None and uid.group(1) == "0":
        method = "root"
    elif policy == "sysctl-window":
        # Always the window then: a 1 read here may be another capture's window.
        method = "sysctl-window"
    elif value == "1":
        method = "unprivileged-allowed"
    else:
        raise unsupported(
            f"QEMU runs as uid {uid.group(1) if uid else '?'} and vm.unprivileged_userfaultfd "
            f"is {value or 'absent'}, so QEMU cannot track the guest's writes; set the "
            "hypervisor's live_userfaultfd: sysctl-window to allow it for the set-up of each "
            "capture"
        )
    regs = rep.get("memdump-8", {}).get("return")
    return LivePreflight(
        qemu_version=version,
        userfaultfd=method,
        mtree=mtree,
        registers=regs if isinstance(regs, str) else "",
        pid=sock.peer.get("pid", ""),
    )


class QmpLive:
    """Live capture over a VM's QMP socket ``<qmp_dir>/<name>.qmp`` with the QMP client
    (remote/qmp.py): the ``qemu`` driver's, and the ``proxmox`` driver's on the socket
    Proxmox gives each VM (``/var/run/qemu-server/<vmid>.qmp``)."""

    def __init__(self, transport: Transport, hv: HypervisorConfig, qmp_dir: str) -> None:
        self._t = transport
        self._hv = hv.name
        self._dir = qmp_dir
        self._bins = "\n".join(hv.qemu_binaries)
        self._policy = hv.live_userfaultfd
        self._huge = "restore" if hv.live_restore_huge_pages else "keep"

    def preflight(self, ref: VMRef, name: str, pid: str | None = None) -> LivePreflight:
        """Whether the VM on socket ``name`` can be captured live (one remote command;
        changes nothing). ``pid``: the VM's QEMU as its manager knows it; a socket served
        by another process is refused."""
        res = self._t.run(_PREFLIGHT, (self._dir, name, self._bins), timeout=60.0)
        if res.returncode == Exit.NO_VM:
            raise VMNotFoundError(
                f"no VM {ref.name!r} on hypervisor {self._hv} (no QMP socket {name}.qmp in "
                f"{self._dir})",
                vm_id=ref.vmid,
                hypervisor=self._hv,
            )
        if res.returncode == Exit.NO_PYTHON:
            raise _no_python(self._hv, res.stdout.decode("utf-8", "replace"), vm_id=ref.vmid)
        pre = judge_preflight(
            res.stdout.decode("utf-8", "replace"), self._policy, self._hv, ref.vmid
        )
        if pid is not None and pre.pid != pid:
            raise HypervisorError(
                f"{self._hv}: the QMP socket {self._dir}/{name}.qmp is served by pid "
                f"{pre.pid or '?'}, but VM {ref.vmid} runs as pid {pid or '?'}; nothing was "
                "changed",
                hypervisor=self._hv,
                vm_id=ref.vmid,
                retryable=False,
            )
        return pre

    def open_stream(
        self,
        ref: VMRef,
        name: str,
        pid: str | None = None,
        max_bandwidth: int | None = None,
    ) -> tuple[_LiveDump, LivePreflight]:
        """``max_bandwidth``: a cap (bytes/s) on the snapshot, QEMU's migration
        max-bandwidth set once it runs and put back after it; None: no cap (QEMU does not
        rate-limit a background snapshot), max-bandwidth untouched."""
        if max_bandwidth is not None and not 0 < max_bandwidth <= QEMU_MAX_BANDWIDTH:
            raise ConfigError(f"max_bandwidth {max_bandwidth} is not 1 to 2**64-1 bytes/s")
        pre = self.preflight(ref, name, pid)
        bw = "" if max_bandwidth is None else str(max_bandwidth)
        args = (self._dir, name, self._bins, self._policy, bw, self._huge)
        raw = _LiveDump.start(self._t, _LIVE, args, self._hv, ref)
        raw.qemu_version = pre.qemu_version
        try:
            raw.check_head()
        except BaseException:
            raw.abort()
            raise
        return raw, pre

    def open(
        self,
        ref: VMRef,
        name: str,
        spill_dir: Path | None,
        buffer_bytes: int,
        pid: str | None = None,
        max_bandwidth: int | None = None,
    ) -> LiveCoreSource:
        """The ELF core of a live capture (memdump.livecore over the raw stream)."""
        raw, pre = self.open_stream(ref, name, pid, max_bandwidth)
        try:
            layout = GuestLayout.from_mtree(pre.mtree)
            # QEMU's dump picks EM_X86_64 or EM_386 from the first vCPU's EFER.LMA
            # (read here just before the snapshot).
            machine = elf_machine_from_registers(pre.registers) if pre.registers else EM_X86_64
            return LiveCoreSource(
                raw,
                layout,
                spill_dir=spill_dir or Path("."),
                buffer_bytes=buffer_bytes,
                machine=machine,
            )
        except BaseException:
            raw.abort()
            raise

    def repair(self) -> list[str]:
        """What live scripts killed outright left in QEMU and the sysctl (_REPAIR)."""
        try:
            res = self._t.run(_REPAIR, (self._bins,), timeout=120.0)
        except MemdumpError:
            return []  # the directories are still cleaned; the next clean-up tries again
        return [
            ln
            for ln in res.stdout.decode("utf-8", "replace").splitlines()
            if ln.startswith(("memdump-repaired", "memdump-uffd-restored", "memdump-repair-failed"))
        ]


class QemuDriver:
    kind = "qemu"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._dir = hv.qmp_dir or DEFAULT_QMP_DIR
        self._bins = "\n".join(hv.qemu_binaries)
        self._t = transport
        self._live = QmpLive(transport, hv, self._dir)

    def _run(self, script: str, *args: str, timeout: float = 60.0) -> CommandResult:
        return self._t.run(script, (self._dir, *args), timeout=timeout)

    def _scan(self) -> list[tuple[str, _Sock]]:
        """(socket name, what its QEMU answered) for every socket in qmp_dir served by an
        allowed QEMU; one that did not answer has no replies."""
        res = self._run(_SCAN, "\n".join((_STATUS, _NAME, _UUID)), self._bins, timeout=120.0)
        if res.returncode == Exit.NO_PYTHON:
            raise _no_python(self.name, res.stdout.decode("utf-8", "replace"))
        if res.returncode != 0:
            raise HypervisorError(
                f"{self.name}: listing QMP sockets in {self._dir} failed: {res.stderr_text}",
                hypervisor=self.name,
                retryable=True,
            )
        out = []
        for path, sock in _blocks(res.stdout.decode("utf-8", "replace")):
            if sock.is_qemu:  # anything else serving a socket is not a VM
                out.append((path.rpartition("/")[2].removesuffix(".qmp"), sock))
        return out

    def list_vms(self) -> list[VMRef]:
        refs = []
        for name, sock in self._scan():
            if _ret(sock.replies, 1).get("status") in ("running", "paused"):
                refs.append(VMRef(self.name, name, name))
        return refs

    def _info(self, vm_id: str) -> tuple[_Sock, str]:
        """What the VM's QEMU answered, and the hypervisor's host name."""
        validate_id(vm_id)
        cmds = "\n".join((_STATUS, _NAME, _UUID, _MEM, _VERSION))
        res = self._run(_INFO, vm_id, cmds, self._bins)
        if res.returncode == Exit.NO_VM:
            raise VMNotFoundError(
                f"no VM {vm_id!r} on hypervisor {self.name}", vm_id=vm_id, hypervisor=self.name
            )
        if res.returncode == Exit.NO_PYTHON:
            raise _no_python(self.name, res.stdout.decode("utf-8", "replace"), vm_id=vm_id)
        text = res.stdout.decode("utf-8", "replace")
        blocks = _blocks(text)
        sock = blocks[0][1] if blocks else _Sock("")
        host = ""
        for line in text.splitlines():
            if line.startswith("memdump-host "):
                host = line.removeprefix("memdump-host ").strip()
        if sock.error and sock.error[0] == Exit.NOT_QEMU:
            raise _not_qemu(self.name, vm_id, sock.error[1])
        if res.returncode != 0 or "memdump-1" not in sock.replies:
            err = sock.error[1] if sock.error else res.stderr_text
            if "Connection refused" in err:  # a socket left by a QEMU that is gone
                raise VMNotFoundError(
                    f"no VM {vm_id!r} on hypervisor {self.name} (its QMP socket is stale)",
                    vm_id=vm_id,
                    hypervisor=self.name,
                )
            raise HypervisorError(
                f"{self.name}: QMP query of {vm_id} failed (exit {res.returncode}): "
                f"{_qmp_error(text) or err or 'no answer'}",
                vm_id=vm_id,
                hypervisor=self.name,
                retryable=True,
            )
        return sock, host

    def resolve(self, vm_id: str) -> VMRef:
        """By socket name, else by QEMU's ``-name`` (query-name) or ``-uuid``."""
        try:
            self._info(vm_id)
            return VMRef(self.name, vm_id, vm_id)
        except VMNotFoundError:
            pass
        hits = set()
        for name, sock in self._scan():
            qname = _ret(sock.replies, 2).get("name")
            uuid = str(_ret(sock.replies, 3).get("UUID", ""))
            if vm_id == qname or (vm_id.lower() == uuid.lower() and uuid.strip("0-")):
                hits.add(name)
        if len(hits) == 1:
            name = hits.pop()
            return VMRef(self.name, validate_id(name, what="QMP socket name"), name)
        raise VMNotFoundError(
            f"no VM {vm_id!r} on hypervisor {self.name}"
            + (f" (ambiguous: {', '.join(sorted(hits))})" if hits else ""),
            vm_id=vm_id,
            hypervisor=self.name,
        )

    def snapshot(self, ref: VMRef) -> VMInfo:
        sock, host = self._info(ref.name)
        rep = sock.replies
        status = str(_ret(rep, 1).get("status", "unknown"))
        mem = _ret(rep, 4)
        ver = _ret(rep, 5)
        versions = {}
        q = ver.get("qemu")
        if isinstance(q, dict):
            versions["hypervisor"] = f"QEMU {q.get('major')}.{q.get('minor')}.{q.get('micro')}"
        if ver.get("package"):
            versions["qemu_package"] = str(ver["package"])
        uuid = str(_ret(rep, 3).get("UUID", ""))
        return VMInfo(
            # The peer that answered (SO_PEERCRED), checked to be QEMU: its pid and the
            # digest of its command line.
            domain_xml_sha256=sock.peer.get("cmdline_sha256", ""),
            host_key=self._t.host_key_fingerprint(),
            ref=ref,
            uuid=uuid,
            domain_id=sock.peer.get("pid"),
            state=_STATES.get(status, status),
            memory_bytes=int(mem.get("base-memory", 0)) + int(mem.get("plugged-memory", 0)),
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
    ) -> DumpSource:
        """Only ``staging="fifo"``. "paused": the guest stays paused for the whole
        transfer. "live": the guest keeps running; the ELF core is built from QEMU's
        background snapshot (memdump.livecore) in ``spill_dir``'s bounded buffer;
        LiveCaptureUnsupportedError (``reason``) before anything touched the guest where
        live cannot run. ``max_bandwidth``: a cap (bytes/s) on the snapshot
        (Settings.live_max_bandwidth_bytes; None: none)."""
        validate_id(ref.name, what="VM name")
        fifo_only(self.name, "qemu", staging, "QMP cannot cancel a dump-guest-memory")
        if mode == "paused":
            return _QmpDump.start(self._t, _DUMP, (self._dir, ref.name, self._bins), self.name, ref)
        return self._live.open(ref, ref.name, spill_dir, buffer_bytes, max_bandwidth=max_bandwidth)

    def live_preflight(self, ref: VMRef) -> LivePreflight:
        """Whether ``ref`` can be captured live (one remote command; changes nothing)."""
        return self._live.preflight(ref, ref.name)

    def open_live_stream(
        self, ref: VMRef, max_bandwidth: int | None = None
    ) -> tuple[_LiveDump, LivePreflight]:
        """The raw migration stream of a live capture (it starts with "QEVM", version 3),
        after the preflight; the first bytes are read here, so a capture the client
        refused (Exit.LIVE_UNSUPPORTED) raises LiveCaptureUnsupportedError from here."""
        validate_id(ref.name, what="VM name")
        return self._live.open_stream(ref, ref.name, max_bandwidth=max_bandwidth)

    def clean_stale(self, min_age_sec: float = 60.0) -> list[str]:
        # First what a live script killed outright left in QEMU and the sysctl (it needs
        # that script's directory), then the directories.
        return self._live.repair() + clean_stale(self._t, self.name, min_age_sec)

    def close(self) -> None:
        self._t.close()


class _QmpDump(TokenFifoDump):
    dump_format = "ELF64 core: QMP dump-guest-memory, format elf"

    def close_ok(self) -> None:
        rc, stderr = self.finish()
        if rc == 0:
            return
        desc = _qmp_error(stderr)
        m = _ERROR.search(stderr)
        if rc == Exit.NO_VM:
            raise VMNotFoundError(
                f"no VM {self._ref.name!r} on hypervisor {self._hv}",
                vm_id=self._ref.vmid,
                hypervisor=self._hv,
            )
        if rc == Exit.NO_PYTHON:
            raise _no_python(self._hv, stderr, vm_id=self._ref.vmid)
        if rc == Exit.NOT_QEMU:
            raise _not_qemu(self._hv, self._ref.vmid, m.group(2) if m else stderr[-500:])
        lines = [
            ln
            for ln in stderr.splitlines()
            if not ln.startswith(("memdump-qmp-reply ", "memdump-peer ", "memdump-error "))
        ]
        rest = "\n".join(lines).strip()
        msg = "; ".join(x for x in (desc, m.group(2) if m else "", rest) if x) or "no message"
        raise DumpFailedError(
            f"QMP dump-guest-memory of {self._ref.name} on {self._hv} failed (exit {rc}): {msg}",
            hypervisor=self._hv,
            vm_id=self._ref.vmid,
            exit_code=rc,
            stderr=stderr[-2000:],
        )


class _LiveDump(TokenFifoDump):
    """The raw migration stream of a live capture (QEMU background-snapshot). Its end
    is checked as soon as it comes (the script's exit), so an error of the client is
    raised from ``readinto`` whatever reads it, unless the converter said it has all of
    RAM (``defer_end``): then in ``close_ok``. After the end: ``live`` (for the
    manifest) and ``pause_window`` (the client's, from just before ``migrate`` to QEMU's
    RESUME)."""

    dump_format = "QEMU migration stream (background-snapshot)"
    # The abort also stops the client (it cancels the migration and puts QEMU right);
    # best effort: the closed stream fails the migration, clean_stale repairs the rest.
    abort_script = _ABORT_LIVE
    abort_timeout = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live: dict[str, Any] = {}
        self.qemu_version = ""
        self._head = b""
        self._done: tuple[int, str] | None = None
        self._end_at_eof = True

    def check_head(self) -> None:
        """Read the stream's header (or its end: the client's error)."""
        buf = bytearray(len(_STREAM_HEAD))
        n = 0
        while n < len(buf):
            got = self._s.readinto(memoryview(buf)[n:])
            if not got:
                self._end()
                break
            n += got
        self._head = bytes(buf[:n])
        if self._head != _STREAM_HEAD:
            raise MigrationStreamError(
                f"the live capture of {self._ref.name} on {self._hv} did not start with a "
                f"QEMU migration stream header (got {self._head!r})",
                hypervisor=self._hv,
                vm_id=self._ref.vmid,
            )

    def readinto(self, view: memoryview) -> int:
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        n = self._s.readinto(view)
        if n == 0 and self._end_at_eof:
            self._end()
        return n

    def defer_end(self) -> None:
        """The converter has the whole image: the client's end is waited for in
        close_ok, not at the last byte."""
        self._end_at_eof = False

    def _end(self) -> None:
        if self._done is None:
            self._done = self.finish()
            self._parse(self._done[1])
        self._raise(*self._done)

    def close_ok(self) -> None:
        self._end()

    def _parse(self, stderr: str) -> None:
        stats: dict[str, Any] = {}
        m = re.search(r"^memdump-live-stats (.*)$", stderr, re.M)
        if m:
            try:
                doc = json.loads(m.group(1))
                stats = doc if isinstance(doc, dict) else {}
            except ValueError:
                pass
        live: dict[str, Any] = {"method": "qemu background-snapshot (QMP migrate fd:)"}
        live.update(migration_fields(stats))
        b = re.search(r"^memdump-live-bandwidth (\d+) (\d+)$", stderr, re.M)
        if b:
            # The cap on the snapshot (QEMU's max-bandwidth while it ran, bytes/s) and the
            # VM's own value, put back after it.
            live["max_bandwidth"] = int(b.group(2))
            live["max_bandwidth_before"] = int(b.group(1))
        u = re.search(r"^memdump-live-uffd (\S+) (\d+(?:\.\d+)?)$", stderr, re.M)
        if u:
            live["userfaultfd"] = u.group(1)
            if u.group(1) == "sysctl-window":
                live["userfaultfd_window_ms"] = round(float(u.group(2)) * 1000, 3)
        events = []
        for em in re.finditer(r"^memdump-qmp-event (.*)$", stderr, re.M):
            try:
                ev = json.loads(em.group(1))
                ts = ev["timestamp"]
                t = int(ts["seconds"]) + int(ts["microseconds"]) / 1e6
                events.append((str(ev["event"]), t))
            except (ValueError, KeyError, TypeError):
                continue
        stop = next((t for e, t in events if e == "STOP"), None)
        resume = next(
            (t for e, t in events if e == "RESUME" and stop is not None and t >= stop), None
        )
        if stop is not None:
            # QEMU stops the guest to save its devices and start write tracking: the
            # image is the guest's memory at this instant.
            live["snapshot_instant"] = datetime.fromtimestamp(stop, UTC).isoformat()
            if resume is not None:
                live["pause_ms_events"] = round((resume - stop) * 1000, 3)
        live["events"] = [
            {"event": e, "at": datetime.fromtimestamp(t, UTC).isoformat()} for e, t in events
        ]
        h = re.search(r"^memdump-live-hugepages (.*)$", stderr, re.M)
        huge = huge_pages(h.group(1).strip() if h else None)
        if huge is not None:
            live["huge_pages"] = huge
        if self.qemu_version:
            live["qemu_version"] = self.qemu_version
        self.live = live

    def _raise(self, rc: int, stderr: str) -> None:
        if rc == 0:
            return
        m = _ERROR.search(stderr)
        msg = m.group(2).strip() if m else ""
        fields: dict[str, Any] = {"hypervisor": self._hv, "vm_id": self._ref.vmid}
        if rc == Exit.LIVE_UNSUPPORTED:
            reason = msg or "refused by QEMU"
            raise LiveCaptureUnsupportedError(
                f"{self._hv}: {self._ref.name} cannot be captured live: {reason}",
                reason=reason,
                **fields,
            )
        if rc == Exit.NO_VM:
            raise VMNotFoundError(f"no VM {self._ref.name!r} on hypervisor {self._hv}", **fields)
        if rc == Exit.NO_PYTHON:
            raise _no_python(self._hv, stderr, vm_id=self._ref.vmid)
        if rc == Exit.NOT_QEMU:
            raise _not_qemu(self._hv, self._ref.vmid, msg or stderr[-500:])
        whats: dict[int, str] = {
            Exit.MIGRATION_FAILED: "the migration did not complete",
            Exit.LEFT_PAUSED: "the guest was left paused by the migration and was resumed",
            Exit.STOPPED: "stopped",
        }
        what = whats.get(rc, "failed")
        stats = re.search(r"^memdump-live-stats (.*)$", stderr, re.M)
        detail = ""
        if stats:
            try:
                detail = str(json.loads(stats.group(1)).get("error-desc") or "")
            except (ValueError, AttributeError):
                pass
        errs = "; ".join(x.group(2).strip() for x in _ERROR.finditer(stderr))
        text = "; ".join(x for x in (detail, errs, _qmp_error(stderr)) if x) or "no message"
        raise DumpFailedError(
            f"live capture of {self._ref.name} on {self._hv}: {what} (exit {rc}): {text}",
            exit_code=rc,
            stderr=stderr[-2000:],
            **fields,
        )
