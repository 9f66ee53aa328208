"""Plain-QEMU driver: QEMU processes not managed by libvirt, reached through QMP.

Each VM is a QEMU process with a QMP unix socket ``<qmp_dir>/<name>.qmp`` on the
hypervisor (e.g. ``-qmp unix:/run/memdump-qemu/vm-01.qmp,server=on,wait=off``). The
driver runs fixed sh scripts through a Transport, like the libvirt driver; QMP itself is
spoken by a small Python program, memdump/hypervisors/remote/qmp.py, which the scripts run
with the hypervisor's ``python3`` (its text in a quoted here-document, values as
arguments). Python, not socat, because a dump hands QEMU an open file descriptor over the
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
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal

from memdump.errors import (
    DumpFailedError,
    HypervisorError,
    VMNotFoundError,
)
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.hypervisors.fifo import PROLOGUE, TokenFifoDump, clean_stale, fifo_only
from memdump.identifiers import validate_id
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.base import CommandResult, Transport

Staging = Literal["fifo", "file"]
_DEFAULT_MARGIN = float(Settings.model_fields["disk_space_margin"].default)
DEFAULT_QMP_DIR = "/run/memdump-qemu"

# The QMP client, run as `python3 -I -S - MODE ARG...` with this text on stdin: -I ignores
# PYTHON* variables and the user's site directory, -S skips site-packages (root runs it).
QMP_CLIENT = resources.files("memdump.hypervisors.remote").joinpath("qmp.py").read_text("utf-8")
_EOF = "MEMDUMP_QMP_CLIENT"
if any(line.strip() == _EOF for line in QMP_CLIENT.splitlines()):  # pragma: no cover
    raise RuntimeError(f"{_EOF} ends the here-document: it must not be a line of qmp.py")


def _py(args: str, redirections: str = "") -> str:
    """Shell running the QMP client with ``args`` (shell words, only "$x" expansions)."""
    return f"python3 -I -S - {args} {redirections}<<'{_EOF}'\n{QMP_CLIENT}{_EOF}\n"


# Shell: every script starts with these. Exit 95: no python3 (checked first, so the error
# says what is missing rather than "not found" from deep inside).
_COMMON = """export LC_ALL=C
command -v python3 >/dev/null 2>&1 || {
  echo "memdump-no-python3: the qemu driver needs python3 on the hypervisor" >&2; exit 95; }
plain() { case $1 in ''|*[!A-Za-z0-9._/-]*|*..*) return 1 ;; esac; return 0; }
"""

_STATUS = '{"execute":"query-status","id":"memdump-1"}'
_NAME = '{"execute":"query-name","id":"memdump-2"}'
_UUID = '{"execute":"query-uuid","id":"memdump-3"}'
_MEM = '{"execute":"query-memory-size-summary","id":"memdump-4"}'
_VERSION = '{"execute":"query-version","id":"memdump-5"}'

# $1 = qmp_dir, $2 = QMP commands, $3 = allowed QEMU binaries. For every socket: the
# client's "memdump-sock <path>" block (peer, replies, or an error). A socket that does not
# answer within 5 s (a QEMU gone, or busy dumping) gets an error instead.
_SCAN = (
    _COMMON
    + """plain "$1" || { echo "memdump: bad qmp_dir" >&2; exit 97; }
[ -d "$1" ] || { printf 'memdump: no directory %s\\n' "$1" >&2; exit 98; }
dir=$1 cmds=$2 bins=$3
set --
for s in "$dir"/*.qmp; do
  [ -S "$s" ] || continue
  plain "${s##*/}" || continue
  set -- "$@" "$s"
done
[ $# -gt 0 ] || exit 0
"""
    + _py('query 5 "$cmds" "$bins" "$@"')
    + "exit\n"  # the client's status: 95, a python3 it cannot run on
)

# $1 = qmp_dir, $2 = VM (socket) name, $3 = the QMP commands, $4 = allowed QEMU binaries.
# The client's block for that socket, then the host name. Exit 96: no such socket.
_INFO = (
    _COMMON
    + """plain "$1" && plain "$2" || { echo "memdump: bad qmp_dir or VM name" >&2; exit 97; }
s=$1/$2.qmp
[ -S "$s" ] || { printf 'memdump-no-vm %s\\n' "$2" >&2; exit 96; }
"""
    + _py('query 30 "$3" "$4" "$s"')
    + """rc=$?
[ "$rc" -eq 0 ] || exit "$rc"
echo "memdump-host $(uname -n)"
exit 0
"""
)

# $1 = qmp_dir, $2 = VM name, $3 = allowed QEMU binaries; stdin: the token (PROLOGUE;
# ABORT_FIFO checks it: never on a command line). The reader (cat) starts before QEMU
# gets the FIFO's write end; the client opens it, passes it to QEMU (getfd) and closes its
# own copy, so the reader's end of file is QEMU's close at the end of the dump. The FIFO
# and "$d" are never chowned or opened up: QEMU needs no access to the path. A failed
# client: the reader may still wait in open() for a writer, so it is killed.
_DUMP = (
    "umask 077\n"
    + _COMMON
    + """plain "$1" && plain "$2" || { echo "memdump: bad qmp_dir or VM name" >&2; exit 97; }
s=$1/$2.qmp
[ -S "$s" ] || { printf 'memdump-no-vm %s\\n' "$2" >&2; exit 96; }
bins=$3
"""
    + PROLOGUE
    + """plain "$d" || { echo "memdump: temp dir path not plain: $d" >&2; exit 90; }
mkfifo -m 600 "$d/mem" || exit 91
cat "$d/mem" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
t0=$(date +%s.%N)
"""
    + _py('dump "$s" "$d/mem" "$bins" "$reader"', '>"$d/reply" 2>"$d/err" 8>&- ')
    + """rc=$?
t1=$(date +%s.%N)
if [ "$rc" -ne 0 ]; then kill "$reader" 2>/dev/null; fi
wait "$reader"
rrc=$?
reader=
cat "$d/err" "$d/reply" >&2
echo "memdump-pause-window $t0 $t1" >&2
[ "$rc" -eq 0 ] || exit "$rc"
[ "$rrc" -eq 0 ] || exit 92
exit 0
"""
)

_EXIT_NOT_QEMU = 74
_EXIT_NO_PYTHON = 95
_EXIT_NO_VM = 96
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
        return bool(self.peer) and not (self.error and self.error[0] == _EXIT_NOT_QEMU)


def _blocks(text: str) -> list[tuple[str, _Sock]]:
    """(socket path, what was printed for it) for each "memdump-sock" block."""
    parts = re.split(r"^memdump-sock (.*)$", text, flags=re.M)
    return [(parts[i].strip(), _Sock(parts[i + 1])) for i in range(1, len(parts) - 1, 2)]


def _no_python(hv: str, output: str = "", **fields: Any) -> HypervisorError:
    """python3 is not there (exit 95 of _COMMON) or cannot run the client (its exit 95:
    too old, a module missing; ``output`` holds its memdump-error line)."""
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


class QemuDriver:
    kind = "qemu"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._dir = hv.qmp_dir or DEFAULT_QMP_DIR
        self._bins = "\n".join(hv.qemu_binaries)
        self._t = transport

    def _run(self, script: str, *args: str, timeout: float = 60.0) -> CommandResult:
        return self._t.run(script, (self._dir, *args), timeout=timeout)

    def _scan(self) -> list[tuple[str, _Sock]]:
        """(socket name, what its QEMU answered) for every socket in qmp_dir served by an
        allowed QEMU; one that did not answer has no replies."""
        res = self._run(_SCAN, "\n".join((_STATUS, _NAME, _UUID)), self._bins, timeout=120.0)
        if res.returncode == _EXIT_NO_PYTHON:
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
        if res.returncode == _EXIT_NO_VM:
            raise VMNotFoundError(
                f"no VM {vm_id!r} on hypervisor {self.name}", vm_id=vm_id, hypervisor=self.name
            )
        if res.returncode == _EXIT_NO_PYTHON:
            raise _no_python(self.name, res.stdout.decode("utf-8", "replace"), vm_id=vm_id)
        text = res.stdout.decode("utf-8", "replace")
        blocks = _blocks(text)
        sock = blocks[0][1] if blocks else _Sock("")
        host = ""
        for line in text.splitlines():
            if line.startswith("memdump-host "):
                host = line.removeprefix("memdump-host ").strip()
        if sock.error and sock.error[0] == _EXIT_NOT_QEMU:
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
        self, ref: VMRef, *, staging: Staging = "fifo", margin: float = _DEFAULT_MARGIN
    ) -> _QmpDump:
        """Only ``staging="fifo"``: the guest stays paused for the whole transfer."""
        validate_id(ref.name, what="VM name")
        fifo_only(self.name, "qemu", staging, "QMP cannot cancel a dump-guest-memory")
        return _QmpDump.start(self._t, _DUMP, (self._dir, ref.name, self._bins), self.name, ref)

    def clean_stale(self, min_age_sec: float = 60.0) -> list[str]:
        return clean_stale(self._t, self.name, min_age_sec)

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
        if rc == _EXIT_NO_VM:
            raise VMNotFoundError(
                f"no VM {self._ref.name!r} on hypervisor {self._hv}",
                vm_id=self._ref.vmid,
                hypervisor=self._hv,
            )
        if rc == _EXIT_NO_PYTHON:
            raise _no_python(self._hv, stderr, vm_id=self._ref.vmid)
        if rc == _EXIT_NOT_QEMU:
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
