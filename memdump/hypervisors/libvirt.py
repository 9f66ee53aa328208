"""libvirt driver: ``virsh`` on the hypervisor, reached through a Transport."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

from memdump.errors import (
    DumpFailedError,
    HypervisorError,
    MemdumpError,
    VMNotFoundError,
)
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.hypervisors.fifo import PROLOGUE, clean_stale, pause_window
from memdump.identifiers import validate_id
from memdump.settings import HypervisorConfig
from memdump.transport.base import ByteStream, CommandResult, Transport

# $1 = libvirt URI. Running domains only: a shut-off domain has no memory to dump.
_LIST = 'export LC_ALL=C; exec virsh -q -c "$1" list --name'

# $1 = URI, $2 = domain (id, name or UUID)
_INFO = """export LC_ALL=C
virsh -c "$1" dominfo "$2" || exit $?
# The digest of virsh's output byte for byte (no $(...), which would drop newlines); the
# first call only tells whether there is a definition to digest (sh has no pipefail).
virsh -c "$1" dumpxml "$2" >/dev/null 2>&1 &&
  echo "Memdump domain xml digest: $(virsh -c "$1" dumpxml "$2" | sha256sum | cut -d' ' -f1)"
echo '--memdump-versions--'
virsh -c "$1" version || true
hostname
"""

# $1 = URI, $2 = domain name. The reader (cat) is started before virsh so that QEMU's
# open of the FIFO does not block; if virsh fails before QEMU opened it, cat would wait
# forever in open(), so it is killed. The temp dir goes on every exit path (trap, and
# fifo.clean_stale for a script killed outright). stdout carries only the dump; virsh's
# own messages go to a file, sent as stderr last.
_DUMP = (
    """export LC_ALL=C
umask 077
"""
    + PROLOGUE
    + """mkfifo -m 600 "$d/mem" || exit 91
cat "$d/mem" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
t0=$(date +%s.%N)
virsh -c "$1" dump --memory-only --format elf "$2" "$d/mem" >/dev/null 2>"$d/err" 8>&-
rc=$?
t1=$(date +%s.%N)
[ "$rc" -eq 0 ] || kill "$reader" 2>/dev/null
wait "$reader"
rrc=$?
reader=
cat "$d/err" >&2
echo "memdump-pause-window $t0 $t1" >&2
[ "$rc" -eq 0 ] || exit "$rc"
[ "$rrc" -eq 0 ] || exit 92
exit 0
"""
)

# $1 = URI, $2 = domain. Best effort: there may be no job left to abort.
_ABORT = 'virsh -c "$1" domjobabort "$2" >/dev/null 2>&1; exit 0'

_FIELD = re.compile(r"^([A-Za-z() ]+):\s*(.*)$")


class LibvirtDriver:
    kind = "libvirt"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._uri = hv.libvirt_uri
        self._t = transport

    def _run(self, script: str, *args: str, timeout: float = 60.0) -> CommandResult:
        return self._t.run(script, (self._uri, *args), timeout=timeout)

    def list_vms(self) -> list[VMRef]:
        res = self._run(_LIST)
        if res.returncode != 0:
            raise HypervisorError(
                f"{self.name}: virsh list failed: {res.stderr_text}", hypervisor=self.name
            )
        names = [n.strip() for n in res.stdout.decode().splitlines() if n.strip()]
        return [VMRef(self.name, n, n) for n in names]

    def _info(self, vm_id: str) -> tuple[dict[str, str], dict[str, str], str]:
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
        text = res.stdout.decode("utf-8", "replace")
        info_part, _, rest = text.partition("--memdump-versions--")
        lines = rest.strip().splitlines()
        host = lines[-1].strip() if lines else ""
        return _fields(info_part), _fields("\n".join(lines[:-1])), host

    def resolve(self, vm_id: str) -> VMRef:
        info, _, _ = self._info(vm_id)
        name = info.get("Name", "")
        return VMRef(self.name, validate_id(name, what="domain name"), name)

    def snapshot(self, ref: VMRef) -> VMInfo:
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

    def open_dump(self, ref: VMRef) -> _VirshDump:
        validate_id(ref.name, what="domain name")
        stream = self._t.stream(_DUMP, (self._uri, ref.name))
        return _VirshDump(stream, self.name, ref, self._stop_dump)

    def _stop_dump(self, ref: VMRef) -> None:
        # Closing the channel already breaks the FIFO (QEMU gets EPIPE, fails the dump and
        # resumes the guest); asking libvirt to abort the job as well is belt and braces.
        try:
            self._run(_ABORT, ref.name, timeout=15.0)
        except MemdumpError:
            pass

    def clean_stale(self, min_age_sec: float = 60.0) -> list[str]:
        return clean_stale(self._t, self.name, min_age_sec)

    def close(self) -> None:
        self._t.close()


class _VirshDump:
    def __init__(
        self, stream: ByteStream, hv: str, ref: VMRef, stop: Callable[[VMRef], None]
    ) -> None:
        self._s = stream
        self._hv = hv
        self._ref = ref
        self._stop = stop
        self._aborted = False
        self.pause_window: tuple[datetime, datetime] | None = None
        self.dump_format = "ELF64 core: virsh dump --memory-only --format elf"
        self.staging = "fifo"

    def readinto(self, view: memoryview) -> int:
        return self._s.readinto(view)

    def close_ok(self) -> None:
        res = self._s.finish(timeout=60.0)
        stderr, self.pause_window = pause_window(res.stderr_text)
        if res.returncode != 0:
            raise DumpFailedError(
                f"virsh dump of {self._ref.name} on {self._hv} failed "
                f"(exit {res.returncode}): {stderr or 'no message'}",
                hypervisor=self._hv,
                vm_id=self._ref.vmid,
                exit_code=res.returncode,
                stderr=stderr[-2000:],
            )

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._s.abort()
        self._stop(self._ref)


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
