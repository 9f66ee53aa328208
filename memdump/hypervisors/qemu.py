"""Plain-QEMU driver: QEMU processes not managed by libvirt, reached through QMP.

Each VM is a QEMU process with a QMP unix socket ``<qmp_dir>/<name>.qmp`` on the
hypervisor (e.g. ``-qmp unix:/run/memdump-qemu/vm-01.qmp,server=on,wait=off``). The
driver runs fixed scripts through a Transport, like the libvirt driver, and speaks QMP
with ``socat`` (nothing beyond QEMU and socat is needed on the hypervisor): socat
connects to the socket and runs a small sh child (its script on fd 5) that reads the
greeting, sends ``qmp_capabilities`` and then each command with an ``id``, and copies the
reply carrying that id (asynchronous events are skipped) to fd 6. The connection stays
open until the last reply has arrived: a client closing its end makes QEMU drop
commands it has queued but not yet run. Replies are parsed here, not in sh.

The dump is ``dump-guest-memory`` (``paging: false``, ``format: elf``) into a private
FIFO whose reader (``cat``) is started first, as the libvirt driver does. Without
``detach`` QEMU runs the dump to its end before it answers, so the reply marks the end of
the pause. QEMU opens the FIFO itself (``protocol: file:<path>``), in its main loop: an
open with no reader would hang the whole QEMU process, so every exit path of the script
opens the FIFO read-write for a moment, which lets such an open return (the dump then
fails with EPIPE and QEMU resumes the guest). Aborting = closing the stream: the reader
gets EPIPE, so does QEMU, which fails the dump and resumes the guest.

Limits: while QEMU dumps a VM its QMP socket (one client at a time) and main loop are
busy, so listing or snapshotting that VM meanwhile waits for the dump (list_vms skips a
socket that does not answer within a few seconds). QMP output must be one JSON document
per line (QEMU's default, ``pretty=off``). ``staging="file"`` is not supported (a
ConfigError): QMP has no way to cancel a running dump-guest-memory, so a file-staged dump
could not be stopped once QEMU writes the file.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
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

# The QMP client: socat's child (sh reading this from fd 5), stdin/stdout = the socket.
# $QMP_CMDS: one JSON command per line, the n-th (from 1) with "id":"memdump-<n>". Each
# reply goes to fd 6 as "memdump-qmp-reply <json>". Exit 71/72: no or a bad greeting.
_QMP_CHILD = r"""IFS= read -r line || exit 71
case $line in *'"QMP"'*) ;; *) exit 72 ;; esac
set -f
nl='
'
IFS=$nl
n=0
for cmd in '{"execute":"qmp_capabilities","id":"memdump-0"}' $QMP_CMDS; do
  printf '%s\n' "$cmd"
  got=
  while IFS= read -r line; do
    case $line in
      *'"memdump-'$n'"'*) printf 'memdump-qmp-reply %s\n' "$line" >&6; got=1; break ;;
    esac
  done
  [ -n "$got" ] || exit 73
  n=$((n + 1))
done
exit 0
"""

# Shell: qmp SOCKET TIMEOUT -> runs $QMP_CMDS on SOCKET (TIMEOUT: socat's inactivity
# timeout in seconds, 0 = none); replies on fd 6. The socket path is part of a socat
# address, so it must be plain (checked by every script, and by the settings).
_QMP_FN = (
    """qmp() {
  export QMP_CMDS
  if [ "$2" = 0 ]; then set -- "UNIX-CONNECT:$1"; else set -- -T "$2" "UNIX-CONNECT:$1"; fi
  socat "$@" 'SYSTEM:exec sh /dev/fd/5' 5<<'MEMDUMP_QMP_CHILD'
"""
    + _QMP_CHILD
    + """MEMDUMP_QMP_CHILD
}
plain() { case $1 in ''|*[!A-Za-z0-9._/-]*|*..*) return 1 ;; esac; return 0; }
# qemu_pid SOCKET: the QEMU process whose command line names SOCKET ("" if none or
# several).
qemu_pid() {
  qp=
  for f in $(grep -lF -- "$1" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    case $(cat "/proc/$p/comm" 2>/dev/null) in
      qemu*) if [ -z "$qp" ]; then qp=$p; else qp=ambiguous; fi ;;
    esac
  done
  [ "$qp" = ambiguous ] && qp=
  echo "$qp"
}
"""
)

_STATUS = '{"execute":"query-status","id":"memdump-1"}'
_NAME = '{"execute":"query-name","id":"memdump-2"}'
_UUID = '{"execute":"query-uuid","id":"memdump-3"}'
_MEM = '{"execute":"query-memory-size-summary","id":"memdump-4"}'
_VERSION = '{"execute":"query-version","id":"memdump-5"}'

# $1 = qmp_dir. For every socket: "memdump-vm <name>" then its status/name/uuid replies.
# A socket that does not answer (a QEMU gone, or busy dumping) is reported without them.
_SCAN = (
    "export LC_ALL=C\n"
    + _QMP_FN
    + """plain "$1" || { echo "memdump: bad qmp_dir" >&2; exit 97; }
[ -d "$1" ] || { printf 'memdump: no directory %s\\n' "$1" >&2; exit 98; }
QMP_CMDS=$2
for s in "$1"/*.qmp; do
  [ -S "$s" ] || continue
  n=${s##*/}
  plain "$n" || continue
  echo "memdump-vm ${n%.qmp}"
  qmp "$s" 5 6>&1 2>/dev/null </dev/null
done
exit 0
"""
)

# $1 = qmp_dir, $2 = VM (socket) name, $3 = the QMP commands. Replies, then the QEMU pid
# (the process whose command line names the socket), the SHA-256 of its command line as
# /proc shows it (NUL-separated) and the host name. Exit 96: no such socket.
_INFO = (
    "export LC_ALL=C\n"
    + _QMP_FN
    + """plain "$1" && plain "$2" || { echo "memdump: bad qmp_dir or VM name" >&2; exit 97; }
s=$1/$2.qmp
[ -S "$s" ] || { printf 'memdump-no-vm %s\\n' "$2" >&2; exit 96; }
QMP_CMDS=$3
qmp "$s" 30 6>&1 </dev/null || exit $?
pid=$(qemu_pid "$s")
if [ -n "$pid" ]; then
  echo "memdump-pid $pid"
  echo "memdump-cmdline-sha256 $(sha256sum <"/proc/$pid/cmdline" | cut -d' ' -f1)"
fi
echo "memdump-host $(uname -n)"
exit 0
"""
)

# $1 = qmp_dir, $2 = VM name, $3 = token (how ABORT_FIFO finds this dump). The reader (cat)
# starts before QEMU is asked to open the FIFO; PROLOGUE's clean-up lets a QEMU blocked
# in open() on the FIFO go on (see the module doc). A
# QEMU running as another user (-runas, or started by one) gets the FIFO (still 0600)
# and a traversable, not listable (0711) dir.
_DUMP = (
    """export LC_ALL=C
umask 077
"""
    + _QMP_FN
    + """plain "$1" && plain "$2" || { echo "memdump: bad qmp_dir or VM name" >&2; exit 97; }
s=$1/$2.qmp
[ -S "$s" ] || { printf 'memdump-no-vm %s\\n' "$2" >&2; exit 96; }
"""
    + PROLOGUE
    + """plain "$d" || { echo "memdump: temp dir path not plain: $d" >&2; exit 90; }
printf '%s\\n' "$3" >"$d/token" || exit 93
mkfifo -m 600 "$d/mem" || exit 91
# QEMU opens the FIFO as its own (effective) uid; else the socket's owner.
pid=$(qemu_pid "$s")
owner=
[ -z "$pid" ] || owner=$(awk '/^Uid:/ { print $3 }' "/proc/$pid/status" 2>/dev/null)
[ -n "$owner" ] || owner=$(stat -c %u "$s")
if [ "$owner" != "$(id -u)" ]; then
  chown "$owner" "$d/mem" && chmod 711 "$d" || exit 91
fi
cat "$d/mem" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
QMP_CMDS='{"execute":"dump-guest-memory","arguments":{"paging":false,"protocol":"file:'"$d/mem"'","format":"elf"},"id":"memdump-1"}'
t0=$(date +%s.%N)
qmp "$s" 0 6>"$d/reply" 2>"$d/err" </dev/null 8>&-
rc=$?
t1=$(date +%s.%N)
reply=$(sed -n 's/^memdump-qmp-reply //p' "$d/reply" | tail -n 1)
case $reply in *'"return": {}'*) ;; *) [ "$rc" -ne 0 ] || rc=1 ;; esac
# Failed: QEMU may never open the FIFO (kill the reader; let its open() return).
if [ "$rc" -ne 0 ]; then kill "$reader" 2>/dev/null; exec 9<>"$d/mem"; exec 9>&-; fi
wait "$reader"
rrc=$?
reader=
cat "$d/err" >&2
[ -z "$reply" ] || printf 'memdump-qmp-reply %s\\n' "$reply" >&2
echo "memdump-pause-window $t0 $t1" >&2
[ "$rc" -eq 0 ] || exit "$rc"
[ "$rrc" -eq 0 ] || exit 92
exit 0
"""
)

_EXIT_NO_VM = 96
_REPLY = re.compile(r"^memdump-qmp-reply (.*)$", re.M)
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


class QemuDriver:
    kind = "qemu"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._dir = hv.qmp_dir or DEFAULT_QMP_DIR
        self._t = transport

    def _run(self, script: str, *args: str, timeout: float = 60.0) -> CommandResult:
        return self._t.run(script, (self._dir, *args), timeout=timeout)

    def _scan(self) -> list[tuple[str, dict[str, Any]]]:
        """(socket name, replies) for every socket in qmp_dir; replies are {} if it did not
        answer."""
        res = self._run(_SCAN, "\n".join((_STATUS, _NAME, _UUID)), timeout=120.0)
        if res.returncode != 0:
            raise HypervisorError(
                f"{self.name}: listing QMP sockets in {self._dir} failed: {res.stderr_text}",
                hypervisor=self.name,
                retryable=True,
            )
        out: list[tuple[str, dict[str, Any]]] = []
        for part in res.stdout.decode("utf-8", "replace").split("memdump-vm ")[1:]:
            name, _, rest = part.partition("\n")
            out.append((name.strip(), _replies(rest)))
        return out

    def list_vms(self) -> list[VMRef]:
        refs = []
        for name, rep in self._scan():
            if _ret(rep, 1).get("status") in ("running", "paused"):
                refs.append(VMRef(self.name, name, name))
        return refs

    def _info(self, vm_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        validate_id(vm_id)
        cmds = "\n".join((_STATUS, _NAME, _UUID, _MEM, _VERSION))
        res = self._run(_INFO, vm_id, cmds)
        if res.returncode == _EXIT_NO_VM:
            raise VMNotFoundError(
                f"no VM {vm_id!r} on hypervisor {self.name}", vm_id=vm_id, hypervisor=self.name
            )
        text = res.stdout.decode("utf-8", "replace")
        replies = _replies(text)
        if res.returncode != 0 or "memdump-1" not in replies:
            err = res.stderr_text
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
        extra = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key in ("memdump-pid", "memdump-cmdline-sha256", "memdump-host"):
                extra[key.removeprefix("memdump-")] = value.strip()
        return replies, extra

    def resolve(self, vm_id: str) -> VMRef:
        """By socket name, else by QEMU's ``-name`` (query-name) or ``-uuid``."""
        try:
            self._info(vm_id)
            return VMRef(self.name, vm_id, vm_id)
        except VMNotFoundError:
            pass
        hits = set()
        for name, rep in self._scan():
            qname = _ret(rep, 2).get("name")
            uuid = str(_ret(rep, 3).get("UUID", ""))
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
        rep, extra = self._info(ref.name)
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
            domain_xml_sha256=extra.get("cmdline-sha256", ""),
            host_key=self._t.host_key_fingerprint(),
            ref=ref,
            uuid=uuid,
            domain_id=extra.get("pid"),
            state=_STATES.get(status, status),
            memory_bytes=int(mem.get("base-memory", 0)) + int(mem.get("plugged-memory", 0)),
            hypervisor_host=extra.get("host", ""),
            versions=versions,
            taken_at=datetime.now(UTC),
        )

    def open_dump(
        self, ref: VMRef, *, staging: Staging = "fifo", margin: float = _DEFAULT_MARGIN
    ) -> _QmpDump:
        """Only ``staging="fifo"``: the guest stays paused for the whole transfer."""
        validate_id(ref.name, what="VM name")
        fifo_only(self.name, "qemu", staging, "QMP cannot cancel a dump-guest-memory")
        token = secrets.token_hex(16)
        stream = self._t.stream(_DUMP, (self._dir, ref.name, token))
        return _QmpDump(stream, self._t, self.name, ref, token)

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
        rest = _REPLY.sub("", stderr).strip()
        if rc == _EXIT_NO_VM:
            raise VMNotFoundError(
                f"no VM {self._ref.name!r} on hypervisor {self._hv}",
                vm_id=self._ref.vmid,
                hypervisor=self._hv,
            )
        msg = "; ".join(x for x in (desc, rest) if x) or "no message"
        raise DumpFailedError(
            f"QMP dump-guest-memory of {self._ref.name} on {self._hv} failed (exit {rc}): {msg}",
            hypervisor=self._hv,
            vm_id=self._ref.vmid,
            exit_code=rc,
            stderr=stderr[-2000:],
        )
