"""The hypervisor-side temp directory every dump script uses, and its clean-up.

A dump script makes ``${TMPDIR:-/tmp}/memdump.XXXXXXXXXX`` (0700) holding ``mem``, the
FIFO QEMU writes into (or, for a file-staged dump, the 0600 file QEMU writes first; its
script may be pointed at another directory, the hypervisor's ``staging_dir``), and
removes it on every exit path it can see (an EXIT trap). A script killed outright
(SIGKILL, an OOM kill, a hypervisor-side crash) leaves it behind, possibly with the
FIFO's reader still blocked in ``open()``. So each script holds a lock on ``<dir>/lock``
for as long as it lives (fd 8, not passed on to its children) and notes the pid of the
child working on ``mem`` (the reader; virsh or cat for a staged file); the clean-up
removes only directories whose lock is free, and kills that child only when its command
line names that directory's ``mem`` (a reused pid is left alone).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from memdump.errors import ConfigError, HypervisorError, MemdumpError
from memdump.hypervisors.base import VMRef
from memdump.transport.base import ByteStream, Transport

# Shell to paste at the top of a dump script (after ``umask 077``): makes "$d" and the
# lock, and sets the traps that kill "$reader" and remove "$d". Exit codes 90/93.
# Every signal trap cleans up itself before it exits rather than leaving it to the EXIT
# trap: a signal that lands as the script exits (an abort's SIGTERM to the whole process
# group just as the dump finishes) is run by dash before the EXIT trap's first command,
# and its "exit" would end the shell there with "$d" still in place. The clean-up first
# ignores the signals that would end it halfway; a second rm takes what a concurrent
# abort script may have added to "$d" meanwhile. A writer (QEMU, libvirt's helper)
# blocked in open() on the FIFO "$d/mem" because its reader is gone would wait for ever
# (QEMU in its main loop: the whole VM hangs); opening the FIFO read-write for a moment
# lets that open() return, and the write then fails.
PROLOGUE = """d=
reader=
memdump_cleanup() {
  trap "" HUP INT TERM PIPE
  if [ -n "$reader" ]; then kill "$reader" 2>/dev/null; reader=; fi
  if [ -n "$d" ]; then
    if [ -p "$d/mem" ]; then exec 9<>"$d/mem"; exec 9>&-; fi
    rm -rf "$d" 2>/dev/null || rm -rf "$d"
  fi
}
trap memdump_cleanup EXIT
trap 'memdump_cleanup; exit 143' HUP INT TERM PIPE
d=$(mktemp -d "${TMPDIR:-/tmp}/memdump.XXXXXXXXXX") || exit 90
exec 8>"$d/lock" || exit 93
if command -v flock >/dev/null 2>&1; then flock -n 8 || exit 93; fi
"""

# $1 = token of the dump to stop (the script wrote it to "$d/token"), for drivers whose
# dump tool cannot be cancelled (QMP/HMP dump-guest-memory). Closing the stream already
# breaks the FIFO; this kills that dump's reader as well (only if its command line names
# that dump's FIFO) and lets a QEMU still in open() go on: QEMU's write fails, it ends
# the dump and resumes the guest. Best effort.
ABORT_FIFO = """export LC_ALL=C
for d in "${TMPDIR:-/tmp}"/memdump.??????????; do
  if [ -d "$d" ] && [ ! -L "$d" ] && [ "$(cat "$d/token" 2>/dev/null)" = "$1" ]; then
    r=$(cat "$d/reader" 2>/dev/null)
    case $r in
      ''|*[!0-9]*) ;;
      *) if tr '\\0' ' ' <"/proc/$r/cmdline" 2>/dev/null | grep -qF "$d/mem"; then
           kill "$r" 2>/dev/null
         fi ;;
    esac
    if [ -p "$d/mem" ]; then exec 9<>"$d/mem"; exec 9>&-; fi
  fi
done
exit 0
"""

# $1 = minimum age in seconds, $2 = directory (default ${TMPDIR:-/tmp}). Prints each
# directory it removed.
_CLEAN = """export LC_ALL=C
command -v flock >/dev/null 2>&1 || exit 0
now=$(date +%s)
for d in "${2:-${TMPDIR:-/tmp}}"/memdump.??????????; do
  [ -d "$d" ] && [ ! -L "$d" ] && [ -O "$d" ] || continue
  age=$(( now - $(stat -c %Y "$d") ))
  [ "$age" -ge "$1" ] || continue
  if [ -e "$d/lock" ]; then flock -n "$d/lock" true || continue; fi
  r=$(cat "$d/reader" 2>/dev/null)
  case "$r" in
    ''|*[!0-9]*) ;;
    *) if tr '\\0' ' ' <"/proc/$r/cmdline" 2>/dev/null | grep -qF "$d/mem"; then
         kill "$r" 2>/dev/null
       fi ;;
  esac
  rm -rf "$d" && echo "$d"
done
exit 0
"""


_WINDOW = re.compile(r"^memdump-pause-window (\d+(?:\.\d+)?) (\d+(?:\.\d+)?)$", re.M)


def pause_window(stderr: str) -> tuple[str, tuple[datetime, datetime] | None]:
    """Split a dump script's stderr into the dump tool's own messages and the window the
    script measured around it (``memdump-pause-window T0 T1``, hypervisor clock): the
    guest is paused within it, so it bounds the guest's downtime from outside."""
    m = _WINDOW.search(stderr)
    if m is None:
        return stderr.strip(), None
    rest = (stderr[: m.start()] + stderr[m.end() :]).strip()
    t0, t1 = (datetime.fromtimestamp(float(x), UTC) for x in m.groups())
    return rest, (t0, t1)


def clean_stale(
    transport: Transport, hypervisor: str, min_age_sec: float = 60.0, directory: str | None = None
) -> list[str]:
    """Remove temp dirs left on the hypervisor by dump scripts that are gone (in
    ``directory``, default the remote shell's ``${TMPDIR:-/tmp}``)."""
    args = (str(int(min_age_sec)),) if directory is None else (str(int(min_age_sec)), directory)
    res = transport.run(_CLEAN, args, timeout=60.0)
    if res.returncode != 0:
        raise HypervisorError(
            f"{hypervisor}: clean-up of stale dump directories failed: {res.stderr_text}",
            hypervisor=hypervisor,
            retryable=True,
        )
    return [line for line in res.stdout.decode("utf-8", "replace").splitlines() if line]


def fifo_only(hypervisor: str, driver: str, staging: str, why: str) -> None:
    """Drivers whose dump cannot be cancelled refuse file staging: once QEMU writes a
    file, nothing could stop it."""
    if staging != "fifo":
        raise ConfigError(
            f"hypervisor {hypervisor} (driver {driver}) supports only staging 'fifo', not "
            f"{staging!r}: {why}",
            hypervisor=hypervisor,
        )


class TokenFifoDump:
    """A running dump script whose QEMU writes into the script's private FIFO and that
    only breaking the FIFO stops (QMP and HMP dump-guest-memory cannot be cancelled):
    aborting closes the stream and runs ABORT_FIFO with the script's token. Subclasses
    set ``dump_format`` and read the script's exit in ``close_ok`` via ``finish``."""

    dump_format = ""

    def __init__(
        self, stream: ByteStream, transport: Transport, hypervisor: str, ref: VMRef, token: str
    ) -> None:
        self._s = stream
        self._t = transport
        self._hv = hypervisor
        self._ref = ref
        self._token = token
        self._aborted = False
        self.pause_window: tuple[datetime, datetime] | None = None
        self.staging: Literal["fifo", "file"] = "fifo"

    def readinto(self, view: memoryview) -> int:
        return self._s.readinto(view)

    def finish(self) -> tuple[int, str]:
        """The script's exit code and stderr, its pause window taken out (and kept)."""
        res = self._s.finish(timeout=60.0)
        stderr, self.pause_window = pause_window(res.stderr_text)
        return res.returncode, stderr

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._s.abort()
        try:
            self._t.run(ABORT_FIFO, (self._token,), timeout=15.0)
        except MemdumpError:
            pass  # best effort: closing the stream already broke the FIFO
