"""The hypervisor-side temp directory every dump script uses, and its clean-up.

A dump script makes ``<base>/memdump.XXXXXXXXXX`` (mktemp -d: 0700, owned by the script's
user) holding ``mem``, the FIFO QEMU writes into (or, for a file-staged dump, the 0600 file
QEMU writes first), and removes it on every exit path it can see (an EXIT trap). The base
is the root-only run directory ``/run/memdump`` (RUN_DIR; made 0700 if missing, used only
when it is a real directory owned by the script's user), else ``${TMPDIR:-/tmp}``; a
file-staged dump uses the hypervisor's ``staging_dir``, else ``${TMPDIR:-/tmp}`` (a whole
memory image does not belong in the RAM-backed /run).

Scripts run as root in directories other users can write (/tmp), so nothing is found by
name: the script's first line on stdout is ``memdump-dir <its exact directory>``, read and
checked by DirStream before any dump byte, and an abort acts on that directory only, and
only after ENTER_FN has checked it from the inside (owner, mode, no symlink). The token
that ties the directory to this dump reaches the script on stdin, never on a command line
(``/proc/PID/cmdline`` is world-readable).

A script killed outright (SIGKILL, an OOM kill, a hypervisor-side crash) leaves its
directory behind, possibly with the FIFO's reader still blocked in ``open()``. So each
script holds a lock on ``<dir>/lock`` for as long as it lives (fd 8, not passed on to its
children) and notes the pid of the child working on ``mem`` (the reader; virsh or cat for
a staged file); the clean-up (``_CLEAN``, in the run directory and ``${TMPDIR:-/tmp}``, or
a staging dir) removes only directories that pass the same checks and whose lock is free,
and kills that child only when its command line names that directory's ``mem`` (a reused
pid is left alone).
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Literal, NoReturn, Self

from memdump.errors import ConfigError, HypervisorError, MemdumpError
from memdump.hypervisors.base import VMRef
from memdump.transport.base import ByteStream, CommandResult, Transport

# The root-only base of FIFO dumps' temp dirs (the environment variable MEMDUMP_RUN_DIR
# moves it: tests, hosts without /run).
RUN_DIR = "/run/memdump"

# Shell: ``memdump_enter DIR`` cds into DIR and succeeds only if DIR is a dump directory
# of this user that nobody else can change: named memdump.XXXXXXXXXX under an absolute
# plain path, a directory and not a symlink, owned by us, mode 700 (what mktemp -d makes;
# no script opens it up). Nobody else can then add, remove or swap its entries, so once
# we are inside (".", the inode itself, which must be the inode the name had when looked
# at: no symlink swapped in meanwhile) every entry is named relative to ".", whatever
# later happens to the name: the O_NOFOLLOW of sh.
ENTER_FN = r"""memdump_enter() {
  case $1 in /*) ;; *) return 1 ;; esac
  case $1 in *[!A-Za-z0-9._/-]*|*/../*|*/./*) return 1 ;; esac
  case ${1##*/} in memdump.??????????) ;; *) return 1 ;; esac
  case ${1##*/} in memdump.*[!A-Za-z0-9]*) return 1 ;; esac
  [ -d "$1" ] && [ ! -L "$1" ] || return 1
  cd -P "$1" 2>/dev/null || return 1
  [ -O . ] || return 1
  [ "$(stat -c %d:%i "$1" 2>/dev/null)" = "$(stat -c %d:%i .)" ] || return 1
  [ "$(stat -c %a .)" = 700 ] || return 1
  return 0
}
# memdump_enter_own DIR: reads the token from stdin, enters DIR (memdump_enter) and
# succeeds only if DIR's token file holds that token: an abort's way in.
memdump_enter_own() {
  memdump_token=
  IFS= read -r memdump_token || :
  memdump_enter "$1" || return 1
  [ -n "$memdump_token" ] && [ -f token ] && [ ! -L token ] || return 1
  IFS= read -r t <token || return 1
  [ "$t" = "$memdump_token" ]
}
# memdump_kill_reader DIR: (in DIR) kills the child noted in its "reader" file, only if
# that pid's command line still names DIR/mem (a reused pid is left alone).
memdump_kill_reader() {
  r=
  [ -f reader ] && [ ! -L reader ] && IFS= read -r r <reader
  case $r in
    ''|*[!0-9]*) ;;
    *) if tr '\0' ' ' <"/proc/$r/cmdline" 2>/dev/null | grep -qF -- "$1/mem"; then
         kill "$r" 2>/dev/null
       fi ;;
  esac
  return 0
}
"""

# Shell to paste at the top of a dump script (it sets ``umask 077``). The token is the
# first line on stdin. The base is "$memdump_base" when the script set it (PROLOGUE
# sets it empty: the run directory), else the run directory if it is a real directory
# owned by us, else ${TMPDIR:-/tmp}. Makes "$d" (a plain absolute path), the lock and the
# token file, sets the traps that kill "$reader" and remove "$d", and prints
# "memdump-dir $d" as the first line on stdout. Exit codes 90 (no temp dir) and 93.
# Every signal trap cleans up itself before it exits rather than leaving it to the EXIT
# trap: a signal that lands as the script exits (an abort's SIGTERM to the whole process
# group just as the dump finishes) is run by dash before the EXIT trap's first command,
# and its "exit" would end the shell there with "$d" still in place. The clean-up first
# ignores the signals that would end it halfway; a second rm takes what a concurrent
# abort script may have added to "$d" meanwhile. A writer (QEMU, libvirt's helper)
# blocked in open() on the FIFO "$d/mem" because its reader is gone would wait for ever
# (QEMU in its main loop: the whole VM hangs); opening the FIFO read-write for a moment
# lets that open() return, and the write then fails.
PROLOGUE_IN_BASE = """umask 077
d=
reader=
memdump_cleanup() {
  trap "" HUP INT TERM PIPE
  if [ -n "$reader" ]; then kill "$reader" 2>/dev/null; reader=; fi
  if [ -n "$d" ]; then
    if [ -p "$d/mem" ] && [ ! -L "$d/mem" ]; then exec 9<>"$d/mem"; exec 9>&-; fi
    rm -rf "$d" 2>/dev/null || rm -rf "$d"
  fi
}
trap memdump_cleanup EXIT
trap 'memdump_cleanup; exit 143' HUP INT TERM PIPE
memdump_token=
IFS= read -r memdump_token || :
case $memdump_token in
  ''|*[!0-9a-f]*) echo "memdump: no token on stdin" >&2; exit 93 ;;
esac
if [ -z "$memdump_base" ]; then
  memdump_base=${TMPDIR:-/tmp}
  memdump_run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
  mkdir -m 700 "$memdump_run" 2>/dev/null
  if [ -d "$memdump_run" ] && [ ! -L "$memdump_run" ] && [ -O "$memdump_run" ] &&
    chmod 700 "$memdump_run" 2>/dev/null; then
    memdump_base=$memdump_run
  fi
fi
d=$(mktemp -d "$memdump_base/memdump.XXXXXXXXXX") || exit 90
case $d in
  /*) ;;
  *) echo "memdump: temp dir path not absolute: $d" >&2; d=; exit 90 ;;
esac
case $d in
  *[!A-Za-z0-9._/-]*|*/../*|*/./*)
    echo "memdump: temp dir path not plain: $d" >&2; exit 90 ;;
esac
exec 8>"$d/lock" || exit 93
if command -v flock >/dev/null 2>&1; then flock -n 8 || exit 93; fi
printf '%s\\n' "$memdump_token" >"$d/token" || exit 93
printf 'memdump-dir %s\\n' "$d" || exit 93
""".replace("@RUN_DIR@", RUN_DIR)
PROLOGUE = "memdump_base=\n" + PROLOGUE_IN_BASE

# Shell (live capture, HypervisorConfig.live_userfaultfd "sysctl-window"; the same files
# and protocol as the qemu driver's Python client): ``memdump_uffd_open RUN`` sets
# vm.unprivileged_userfaultfd to 1 for an unprivileged QEMU to create its write-tracking
# userfaultfd, ``memdump_uffd_close`` puts the old value back (the descriptor QEMU made
# stays valid). RUN must be the root-only run directory (the caller checks it). The
# window holds a lock on RUN/userfaultfd.lock on fd 6 (children must not inherit it:
# 6>&-), so concurrent captures take turns; the old value is written to
# RUN/userfaultfd.restore *before* the sysctl changes and removed only after it is back,
# so a script killed outright is repaired by the next window or by UFFD_RESTORE. The
# sysctl's path can be moved with MEMDUMP_UFFD_SYSCTL (tests).
UFFD_WINDOW_FN = r"""memdump_uffd_sysctl=/proc/sys/vm/unprivileged_userfaultfd
memdump_uffd_sysctl=${MEMDUMP_UFFD_SYSCTL:-$memdump_uffd_sysctl}
memdump_uffd_old=
memdump_uffd_t0=
memdump_uffd_t1=
memdump_uffd_open() {
  memdump_uffd_run=$1
  exec 6>"$1/userfaultfd.lock" || return 1
  flock -w 60 6 || { exec 6>&-; return 1; }
  o=
  if [ -f "$1/userfaultfd.restore" ] && [ ! -L "$1/userfaultfd.restore" ]; then
    IFS= read -r o <"$1/userfaultfd.restore"
  fi
  case $o in 0|1) ;; *) o=$(cat "$memdump_uffd_sysctl" 2>/dev/null) ;; esac
  case $o in ''|*[!0-9]*) exec 6>&-; return 1 ;; esac
  rm -f "$1/userfaultfd.restore"
  printf '%s\n' "$o" >"$1/userfaultfd.restore" || { exec 6>&-; return 1; }
  memdump_uffd_old=$o
  memdump_uffd_t0=$(date +%s.%N)
  echo 1 >"$memdump_uffd_sysctl" || { memdump_uffd_close; return 1; }
  return 0
}
memdump_uffd_close() {
  [ -n "$memdump_uffd_old" ] || return 0
  echo "$memdump_uffd_old" >"$memdump_uffd_sysctl" || return 1
  memdump_uffd_t1=$(date +%s.%N)
  memdump_uffd_old=
  rm -f "$memdump_uffd_run/userfaultfd.restore"
  exec 6>&-
  return 0
}
"""

# No arguments. Puts back vm.unprivileged_userfaultfd from RUN/userfaultfd.restore when a
# window was left open by a script killed outright (the window's lock is free), in the
# root-only run directory only; prints "userfaultfd-restored VALUE" if it did.
UFFD_RESTORE = (
    "export LC_ALL=C\n"
    + r"""sysctl=${MEMDUMP_UFFD_SYSCTL:-/proc/sys/vm/unprivileged_userfaultfd}
run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
[ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ] || exit 0
command -v flock >/dev/null 2>&1 || exit 0
[ -e "$run/userfaultfd.restore" ] || exit 0
exec 6>"$run/userfaultfd.lock" || exit 0
flock -n 6 || exit 0
[ -f "$run/userfaultfd.restore" ] && [ ! -L "$run/userfaultfd.restore" ] || exit 0
IFS= read -r o <"$run/userfaultfd.restore"
case $o in
  0|1) ;;
  *) echo "memdump: $run/userfaultfd.restore holds no sysctl value" >&2; exit 1 ;;
esac
echo "$o" >"$sysctl" || exit 1
rm -f "$run/userfaultfd.restore"
echo "userfaultfd-restored $o"
exit 0
""".replace("@RUN_DIR@", RUN_DIR)
)

# $1 = the dump's directory (its memdump-dir line); stdin: its token. For drivers whose
# dump tool cannot be cancelled (QMP/HMP dump-guest-memory). Closing the stream already
# breaks the FIFO; this kills that dump's reader as well (only if its command line names
# that dump's FIFO) and lets a QEMU still in open() go on: QEMU's write fails, it ends
# the dump and resumes the guest. Best effort; nothing is done unless the directory
# passes memdump_enter and holds the token.
ABORT_FIFO = (
    "export LC_ALL=C\n"
    + ENTER_FN
    + r"""memdump_enter_own "$1" || exit 0
memdump_kill_reader "$1"
if [ -p mem ] && [ ! -L mem ]; then exec 9<>mem; exec 9>&-; fi
exit 0
"""
)

# $1 = minimum age in seconds, $2 = directory (default: the run directory and
# ${TMPDIR:-/tmp}). Prints each directory it removed. Each candidate is checked from the
# inside (memdump_enter); its entries are removed relative to it, then the emptied
# directory by name (rmdir: nothing else if the name now means something else).
_CLEAN = (
    "export LC_ALL=C\n"
    + ENTER_FN
    + r"""command -v flock >/dev/null 2>&1 || exit 0
now=$(date +%s)
clean_in() {
  for d in "$1"/memdump.??????????; do
    (
      memdump_enter "$d" || exit 1
      age=$(( now - $(stat -c %Y .) ))
      [ "$age" -ge "$2" ] || exit 1
      if [ -e lock ] || [ -L lock ]; then
        [ -f lock ] && [ ! -L lock ] && flock -n lock true || exit 1
      fi
      memdump_kill_reader "$d"
      rm -rf ./* ./.[!.]* ./..?* 2>/dev/null
      exit 0
    ) || continue
    rmdir "$d" 2>/dev/null && echo "$d"
  done
}
if [ -n "$2" ]; then
  clean_in "$2" "$1"
else
  run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
  if [ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ]; then clean_in "$run" "$1"; fi
  clean_in "${TMPDIR:-/tmp}" "$1"
fi
exit 0
""".replace("@RUN_DIR@", RUN_DIR)
)

# The first line of every dump script's stdout: its exact temp directory.
_DIR_LINE = re.compile(rb"memdump-dir (/(?:[A-Za-z0-9._-]+/)*memdump\.[A-Za-z0-9]{10})")
_DIR_LINE_MAX = 4096


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
    ``directory``, default the run directory and the remote shell's ``${TMPDIR:-/tmp}``).
    Only directories of the remote user that nobody else can write are considered."""
    args = (str(int(min_age_sec)),) if directory is None else (str(int(min_age_sec)), directory)
    res = transport.run(_CLEAN, args, timeout=60.0)
    if res.returncode != 0:
        raise HypervisorError(
            f"{hypervisor}: clean-up of stale dump directories failed: {res.stderr_text}",
            hypervisor=hypervisor,
            retryable=True,
        )
    return [line for line in res.stdout.decode("utf-8", "replace").splitlines() if line]


def restore_userfaultfd(transport: Transport, hypervisor: str) -> list[str]:
    """Run UFFD_RESTORE: a userfaultfd window a killed script left open is closed."""
    res = transport.run(UFFD_RESTORE, (), timeout=60.0)
    if res.returncode != 0:
        raise HypervisorError(
            f"{hypervisor}: restoring vm.unprivileged_userfaultfd failed: {res.stderr_text}",
            hypervisor=hypervisor,
            retryable=True,
        )
    return [line for line in res.stdout.decode("utf-8", "replace").splitlines() if line]


def new_token() -> str:
    """A dump's token (ties its temp dir to it for the abort); sent on stdin only."""
    return secrets.token_hex(16)


def token_stdin(token: str) -> bytes:
    return f"{token}\n".encode()


class DirStream:
    """A dump script's stdout with its first line, ``memdump-dir <dir>``, taken off: the
    exact temp directory the script made, for its abort. Read by ``read_dir`` (before any
    dump byte; the drivers call it in open_dump) or by the first ``readinto``. A script
    that ends before that line (it failed early) gives ``dir`` None and an empty stream:
    its exit code says why. Anything else first is refused."""

    def __init__(self, stream: ByteStream, hypervisor: str) -> None:
        self._s = stream
        self._hv = hypervisor
        self._pending = b""
        self._read = False
        self._eof = False
        self.dir: str | None = None

    def read_dir(self) -> str | None:
        if self._read:
            return self.dir
        buf = bytearray()
        chunk = memoryview(bytearray(_DIR_LINE_MAX))
        while b"\n" not in buf:
            if len(buf) >= _DIR_LINE_MAX:
                self._refuse(bytes(buf))
            n = self._s.readinto(chunk[: _DIR_LINE_MAX - len(buf)])
            if n == 0:
                if buf:
                    self._refuse(bytes(buf))
                self._read = self._eof = True
                return None
            buf += chunk[:n]
        line, _, rest = bytes(buf).partition(b"\n")
        m = _DIR_LINE.fullmatch(line)
        if m is None or b"/../" in line or b"/./" in line:
            self._refuse(line)
        self._pending = rest
        self._read = True
        self.dir = m.group(1).decode()
        return self.dir

    def _refuse(self, got: bytes) -> NoReturn:
        self._s.abort()
        raise HypervisorError(
            f"{self._hv}: the dump script did not start with its temp directory "
            f"(memdump-dir line); got {got[:200]!r}",
            hypervisor=self._hv,
        )

    def readinto(self, view: memoryview) -> int:
        if not self._read:
            self.read_dir()
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        if self._eof:
            return 0
        return self._s.readinto(view)

    def read(self) -> bytes:
        buf = bytearray(1 << 20)
        n = self.readinto(memoryview(buf))
        return bytes(buf[:n])

    def finish(self, timeout: float) -> CommandResult:
        return self._s.finish(timeout)

    def abort(self) -> None:
        self._s.abort()


def start_dump(
    transport: Transport, script: str, args: tuple[str, ...], hypervisor: str
) -> tuple[DirStream, str]:
    """Start a dump script (PROLOGUE) with a new token on its stdin and read its
    directory line; returns the stream and the token."""
    token = new_token()
    stream = DirStream(transport.stream(script, args, stdin=token_stdin(token)), hypervisor)
    try:
        stream.read_dir()
    except BaseException:
        stream.abort()
        raise
    return stream, token


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
    aborting closes the stream and runs ABORT_FIFO on the script's own directory (its
    memdump-dir line) with the script's token on stdin. Start one with ``start``
    (the token goes on the script's stdin; the script's args carry no secret).
    Subclasses set ``dump_format`` and read the script's exit in ``close_ok`` via
    ``finish``."""

    dump_format = ""

    def __init__(
        self,
        stream: ByteStream | DirStream,
        transport: Transport,
        hypervisor: str,
        ref: VMRef,
        token: str,
    ) -> None:
        self._s = stream if isinstance(stream, DirStream) else DirStream(stream, hypervisor)
        self._t = transport
        self._hv = hypervisor
        self._ref = ref
        self._token = token
        self._aborted = False
        self.pause_window: tuple[datetime, datetime] | None = None
        self.staging: Literal["fifo", "file"] = "fifo"

    @classmethod
    def start(
        cls, transport: Transport, script: str, args: tuple[str, ...], hypervisor: str, ref: VMRef
    ) -> Self:
        """Run ``script`` (built on PROLOGUE) with ``args`` and a new token on stdin."""
        stream, token = start_dump(transport, script, args, hypervisor)
        return cls(stream, transport, hypervisor, ref, token)

    @property
    def directory(self) -> str | None:
        """The script's temp directory, once its first line was read."""
        return self._s.dir

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
        d = self._s.dir
        if d is None:
            return  # the script never made its directory (or was never read): nothing to stop
        try:
            self._t.run(ABORT_FIFO, (d,), timeout=15.0, stdin=token_stdin(self._token))
        except MemdumpError:
            pass  # best effort: closing the stream already broke the FIFO
