"""libvirt driver: ``virsh`` on the hypervisor, reached through a Transport."""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from memdump.errors import (
    ConfigError,
    DumpFailedError,
    HypervisorError,
    InsufficientSpaceError,
    MemdumpError,
    StreamStalledError,
    VMNotFoundError,
)
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.hypervisors.fifo import (
    ENTER_FN,
    PROLOGUE,
    PROLOGUE_IN_BASE,
    DirStream,
    clean_stale,
    pause_window,
    start_dump,
    token_stdin,
)
from memdump.identifiers import validate_id
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.base import CommandResult, Transport

Staging = Literal["fifo", "file"]
_DEFAULT_MARGIN = float(Settings.model_fields["disk_space_margin"].default)

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

# $1 = URI, $2 = domain name; stdin: the token (PROLOGUE). The reader (cat) is started
# before virsh so that QEMU's open of the FIFO does not block; if virsh fails before QEMU
# opened it, cat would wait forever in open(), so it is killed. The temp dir goes on every
# exit path (trap, and fifo.clean_stale for a script killed outright). stdout carries the
# memdump-dir line, then only the dump; virsh's own messages go to a file, sent as stderr
# last.
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
# If virsh failed, QEMU may never open the FIFO: kill the reader, and in case the kill
# landed before it got to open() (it would then block there for ever), open the FIFO
# read-write for a moment, which lets any open() on it return; the reader sees EOF.
if [ "$rc" -ne 0 ]; then kill "$reader" 2>/dev/null; exec 9<>"$d/mem"; exec 9>&-; fi
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

# $1 = URI, $2 = domain, $3 = directory for the temp dir ("" = ${TMPDIR:-/tmp}: a whole
# memory image does not belong in the RAM-backed run directory), $4 = space margin in
# thousandths; stdin: the token (PROLOGUE; _ABORT_FILE checks it). Staged:
# QEMU first writes the whole dump into "$d/mem", a 0600 regular file, so the guest is
# paused only for that local write (t0..t1), and the file is streamed afterwards. Before
# anything pauses the guest, the free space there must cover the domain's memory x the
# margin (else exit 95 with a memdump-insufficient-space line). "$d/dumping" is there
# while the dump may start or run, "$d/cancel" (from _ABORT_FILE) stops one that has not
# started: each side makes its mark before it looks for the other's, so either the dump
# never starts or the abort sees it and keeps asking libvirt to abort it.
_DUMP_FILE = (
    """export LC_ALL=C
umask 077
memdump_base=${3:-${TMPDIR:-/tmp}}
case $4 in ''|*[!0-9]*) echo "memdump: bad space margin" >&2; exit 97 ;; esac
"""
    + PROLOGUE_IN_BASE
    + """
kib=$(virsh -c "$1" dominfo "$2" 2>"$d/err" | sed -n 's/^Max memory: *\\([0-9]*\\) KiB$/\\1/p')
if [ -z "$kib" ]; then
  cat "$d/err" >&2
  printf 'memdump: cannot read the memory size of domain %s\\n' "$2" >&2
  exit 96
fi
blocks=$(stat -f -c %a "$d" 2>/dev/null)
bsize=$(stat -f -c %S "$d" 2>/dev/null)
case $blocks$bsize in
  ''|*[!0-9]*)
    kfree=$(df -P -k "$d" | awk 'NR == 2 { print $4 }')
    case $kfree in
      ''|*[!0-9]*) printf 'memdump: cannot read the free space in %s\\n' "${d%/*}" >&2; exit 98 ;;
    esac
    free=$((kfree * 1024)) ;;
  *) free=$((blocks * bsize)) ;;
esac
need=$((kib * 1024 * $4 / 1000))
if [ "$free" -lt "$need" ]; then
  printf 'memdump-insufficient-space %s %s %s %s\\n' "$free" "$need" "$((kib * 1024))" "${d%/*}" >&2
  exit 95
fi
: >"$d/mem" || exit 91
: >"$d/dumping" || exit 91
if [ -e "$d/cancel" ]; then echo "memdump: dump cancelled before it started" >&2; exit 94; fi
t0=$(date +%s.%N)
virsh -c "$1" dump --memory-only --format elf "$2" "$d/mem" >/dev/null 2>"$d/err" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
wait "$reader"
rc=$?
reader=
t1=$(date +%s.%N)
rm -f "$d/dumping"
cat "$d/err" >&2
echo "memdump-pause-window $t0 $t1" >&2
[ "$rc" -eq 0 ] || exit "$rc"
cat "$d/mem" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
wait "$reader"
rrc=$?
reader=
[ "$rrc" -eq 0 ] || exit 92
exit 0
"""
)
_EXIT_NO_TEMP_DIR = 90
_EXIT_NO_SPACE = 95
_NO_SPACE = re.compile(r"^memdump-insufficient-space (\d+) (\d+) (\d+) (.*)$", re.M)

# $1 = URI, $2 = domain. Best effort: there may be no job left to abort.
_ABORT = 'virsh -c "$1" domjobabort "$2" >/dev/null 2>&1; exit 0'

# $1 = URI, $2 = domain, $3 = the staged dump's own directory (its memdump-dir line);
# stdin: its token. Nothing is done unless that directory passes memdump_enter (ours,
# nobody else can change its entries) and holds the token; "cancel" is made there with
# noclobber (no existing file, no symlink followed). Over SSH nothing signals the script
# when the channel closes, and while QEMU writes the file nothing is written to the
# channel either. So: mark the dump cancelled (see _DUMP_FILE), then, for as long as the
# script says its dump may be starting or running, stop it. libvirt refuses domjobabort
# for a memory-only dump ("cannot abort memory-only dump", libvirt 9), so the writer
# libvirt put between QEMU and our file (libvirt_iohelper, its command line naming our
# private "$3/mem") is killed: QEMU's dump then fails and QEMU resumes the guest, as when
# a FIFO dump's reader goes. domjobabort is still asked, for a libvirt that can abort
# it. Bounded: ~15 s.
_ABORT_FILE = (
    "export LC_ALL=C\n"
    + ENTER_FN
    + r"""memdump_enter_own "$3" || exit 0
(set -C; : >cancel) 2>/dev/null
i=0
while [ -e dumping ] && [ "$i" -lt 50 ]; do
  grep -laF -- "$3/mem" /proc/[0-9]*/cmdline 2>/dev/null | while read -r f; do
    case $(tr '\0' ' ' <"$f" 2>/dev/null) in
      *libvirt_iohelper" $3/mem "*) p=${f#/proc/}; kill "${p%/cmdline}" 2>/dev/null ;;
    esac
  done
  virsh -c "$1" domjobabort "$2" >/dev/null 2>&1
  i=$((i + 1))
  sleep 0.2 2>/dev/null || sleep 1
done
exit 0
"""
)
# While QEMU writes the staged file nothing arrives on the stream, for as long as that
# takes (SSH keepalives still catch a dead peer, the capture deadline a hung dump); past
# this, a silent staged dump is given up as stalled.
_STAGE_WAIT_SEC = 4 * 3600.0

_FIELD = re.compile(r"^([A-Za-z() ]+):\s*(.*)$")


class LibvirtDriver:
    kind = "libvirt"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._uri = hv.libvirt_uri
        self._staging_dir = hv.staging_dir
        self._t = transport

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

    def open_dump(
        self, ref: VMRef, *, staging: Staging = "fifo", margin: float = _DEFAULT_MARGIN
    ) -> _VirshDump:
        """``staging`` (Settings.staging): "fifo" streams QEMU's output as it is written
        (the guest is paused for the whole transfer); "file" has QEMU write a temp file in
        the hypervisor's ``staging_dir`` first, after checking that memory size x
        ``margin`` (Settings.disk_space_margin) is free there, then streams that file."""
        validate_id(ref.name, what="domain name")
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
        removed = clean_stale(self._t, self.name, min_age_sec)
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
        margin: float = _DEFAULT_MARGIN,
    ) -> None:
        self._s = stream
        self._hv = hv
        self._ref = ref
        self._stop = stop
        self._aborted = False
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
                if self._aborted or time.monotonic() - self._opened > _STAGE_WAIT_SEC:
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
        if rc == _EXIT_NO_SPACE and m is not None:
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
        if rc == _EXIT_NO_TEMP_DIR:
            raise HypervisorError(
                f"{self._hv}: cannot make a staging temp dir for {self._ref.name}: "
                f"{stderr or 'no message'}",
                hypervisor=self._hv,
                vm_id=self._ref.vmid,
                exit_code=rc,
                stderr=stderr[-2000:],
            )

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._s.abort()
        if self.staging == "file" and self._finished:
            return  # the script has exited: no dump of ours is left to stop
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
