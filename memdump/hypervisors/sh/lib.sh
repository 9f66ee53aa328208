# shellcheck shell=sh
# memdump's shell library: put before every script the drivers run on a hypervisor
# (memdump.hypervisors.scripts.load). It only defines names; the script that follows
# calls them. POSIX sh (dash on Debian); every value reaches a script as a positional
# argument, never in its text. Scripts run as root in directories other users can write
# (/tmp): nothing there is found by name or trusted without the checks below.
export LC_ALL=C

# Exit codes, one meaning each: memdump/hypervisors/exitcodes.py is the same table
# (tests/unit/test_exitcodes.py checks that the two agree). 0 is success; 1 a command's
# own failure passed on (virsh, qm) or a plain "no" inside a helper.
# shellcheck disable=SC2034  # each script uses the few codes it can end with
{
  EXIT_OK=0
  EXIT_FAILED=1
  EXIT_NO_GREETING=71
  EXIT_NOT_QMP=72
  EXIT_QMP_LOST=73
  EXIT_NOT_QEMU=74
  EXIT_NO_CONNECT=75
  EXIT_FIFO_NO_READER=76
  EXIT_LIVE_UNSUPPORTED=77
  EXIT_MIGRATION_FAILED=78
  EXIT_LEFT_PAUSED=79
  EXIT_STOPPED=80
  EXIT_MONITOR_FAILED=81
  EXIT_NO_RUN_DIR=83
  EXIT_WRITE_PROTECTED=85
  EXIT_MONITOR_REFUSED=88
  EXIT_DUMP_INCOMPLETE=89
  EXIT_NO_TEMP_DIR=90
  EXIT_TEMP_FILE=91
  EXIT_READER_FAILED=92
  EXIT_NO_TOKEN=93
  EXIT_CANCELLED=94
  EXIT_NO_PYTHON=95
  EXIT_NO_VM=96
  EXIT_BAD_ARGUMENT=97
  EXIT_NO_QMP_DIR=98
  EXIT_NO_SPACE=99
  EXIT_NO_MEMORY_SIZE=100
  EXIT_NO_FREE_SPACE=101
  EXIT_QM_FAILED=102
  EXIT_SIGNAL=143
}

# plain WORD: WORD is a plain path or name (letters, digits, . _ / -, no ".."), safe to
# put together with others into a path.
plain() { case $1 in ''|*[!A-Za-z0-9._/-]*|*..*) return 1 ;; esac; return 0; }

# memdump_enter DIR: cds into DIR and succeeds only if DIR is a dump directory of this
# user that nobody else can change: named memdump.XXXXXXXXXX under an absolute plain
# path, a directory and not a symlink, owned by us, mode 700 (what mktemp -d makes; no
# script opens it up). Nobody else can then add, remove or swap its entries, so once we
# are inside (".", the inode itself, which must be the inode the name had when looked at:
# no symlink swapped in meanwhile) every entry is named relative to ".", whatever later
# happens to the name: the O_NOFOLLOW of sh.
memdump_enter() {
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

# memdump_kill_noted FILE DIR: (in DIR) kills the process whose pid FILE holds (a script
# notes its reader, a live script its client), only if that pid's command line still
# names DIR/mem (a reused pid is left alone). Succeeds if it did, the pid in
# $memdump_noted.
memdump_kill_noted() {
  memdump_noted=
  [ -f "$1" ] && [ ! -L "$1" ] && IFS= read -r memdump_noted <"$1"
  case $memdump_noted in ''|*[!0-9]*) return 1 ;; esac
  tr '\0' ' ' <"/proc/$memdump_noted/cmdline" 2>/dev/null | grep -qF -- "$2/mem" || return 1
  kill "$memdump_noted" 2>/dev/null
  return 0
}

# memdump_unblock FIFO: a writer (QEMU, libvirt's helper) or reader blocked in open() on
# FIFO because its other end is gone would wait for ever (QEMU in its main loop: the
# whole VM hangs); opening the FIFO read-write for a moment lets that open() return (a
# writer's write then fails, a reader sees EOF). Nothing unless FIFO is a FIFO, not a
# symlink.
memdump_unblock() {
  if [ -p "$1" ] && [ ! -L "$1" ]; then exec 9<>"$1"; exec 9>&-; fi
}

# memdump_retire_fifo FIFO: memdump_unblock, and the FIFO unlinked while it is held open,
# so that an open() that comes later fails (ENOENT) instead of blocking. For an abort,
# which kills the reader: one that lands before QEMU got to its open() (HMP/QMP
# dump-guest-memory, started a moment before) left QEMU waiting there for a reader for
# ever, the guest paused and its monitor dead, and the dump script with it (its cleanup
# runs after the monitor command, which QEMU did not answer). Nothing unless FIFO is a
# FIFO, not a symlink (in the script's own 0700 directory).
memdump_retire_fifo() {
  if [ -p "$1" ] && [ ! -L "$1" ]; then exec 9<>"$1"; rm -f "$1"; exec 9>&-; fi
}

# memdump_cleanup: the EXIT trap of memdump_start: kills "$reader", unblocks "$d/mem",
# removes "$d". First ignores the signals that would end it halfway; a second rm takes
# what a concurrent abort script may have added to "$d" meanwhile.
memdump_cleanup() {
  trap "" HUP INT TERM PIPE
  if [ -n "$reader" ]; then kill "$reader" 2>/dev/null; reader=; fi
  if [ -n "$d" ]; then
    memdump_retire_fifo "$d/mem"
    rm -rf "$d" 2>/dev/null || rm -rf "$d"
  fi
}

# memdump_start [BASE]: the start of every dump script (memdump/hypervisors/fifo.py):
# umask 077; the token is the first line on stdin. Makes "$d" (a plain absolute path)
# in BASE, else in the run directory if it is a real directory owned by us (made 0700
# if missing; $memdump_run), else in ${TMPDIR:-/tmp}; then the lock (fd 8, held for as
# long as the script lives; children must not inherit it: 8>&-) and the token file;
# sets the traps that kill "$reader" and remove "$d", and prints "memdump-dir $d" as the
# first line on stdout. Every signal trap cleans up itself before it exits rather than
# leaving it to the EXIT trap: a signal that lands as the script exits (an abort's
# SIGTERM to the whole process group just as the dump finishes) is run by dash before
# the EXIT trap's first command, and its "exit" would end the shell there with "$d"
# still in place.
memdump_start() {
  umask 077
  d=
  reader=
  trap memdump_cleanup EXIT
  trap 'memdump_cleanup; exit "$EXIT_SIGNAL"' HUP INT TERM PIPE
  memdump_token=
  IFS= read -r memdump_token || :
  case $memdump_token in
    ''|*[!0-9a-f]*) echo "memdump: no token on stdin" >&2; exit "$EXIT_NO_TOKEN" ;;
  esac
  memdump_base=$1
  if [ -z "$memdump_base" ]; then
    memdump_base=${TMPDIR:-/tmp}
    memdump_run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
    mkdir -m 700 "$memdump_run" 2>/dev/null
    if [ -d "$memdump_run" ] && [ ! -L "$memdump_run" ] && [ -O "$memdump_run" ] &&
      chmod 700 "$memdump_run" 2>/dev/null; then
      memdump_base=$memdump_run
    fi
  fi
  d=$(mktemp -d "$memdump_base/memdump.XXXXXXXXXX") || exit "$EXIT_NO_TEMP_DIR"
  case $d in
    /*) ;;
    *) echo "memdump: temp dir path not absolute: $d" >&2; d=; exit "$EXIT_NO_TEMP_DIR" ;;
  esac
  case $d in
    *[!A-Za-z0-9._/-]*|*/../*|*/./*)
      echo "memdump: temp dir path not plain: $d" >&2; exit "$EXIT_NO_TEMP_DIR" ;;
  esac
  exec 8>"$d/lock" || exit "$EXIT_NO_TOKEN"
  if command -v flock >/dev/null 2>&1; then flock -n 8 || exit "$EXIT_NO_TOKEN"; fi
  printf '%s\n' "$memdump_token" >"$d/token" || exit "$EXIT_NO_TOKEN"
  printf 'memdump-dir %s\n' "$d" || exit "$EXIT_NO_TOKEN"
}

# memdump_fifo_reader: makes the FIFO "$d/mem" and starts its reader, cat to stdout, in
# the background ("$reader", noted in "$d/reader" for an abort), before the writer opens
# it, so that the writer's open does not block.
memdump_fifo_reader() {
  mkfifo -m 600 "$d/mem" || exit "$EXIT_TEMP_FILE"
  cat "$d/mem" 8>&- &
  reader=$!
  echo "$reader" >"$d/reader"
}

# memdump_live_reader PROGRAM: the same for a live capture's stream, read by
# `perl -e PROGRAM` (sh/fiforeader.pl: large writes) where the host has perl.
memdump_live_reader() {
  command -v perl >/dev/null 2>&1 || { memdump_fifo_reader; return; }
  mkfifo -m 600 "$d/mem" || exit "$EXIT_TEMP_FILE"
  perl -e "$1" <"$d/mem" 8>&- &
  reader=$!
  echo "$reader" >"$d/reader"
}

# memdump_wait_reader RC: the end of a dump into the FIFO, after its writer ended with
# RC. If RC is not 0 the writer may never have opened the FIFO: the reader is killed,
# and in case the kill did not stop it before it got to open() (it would then block there
# for ever) the FIFO is retired: unblocked, and gone for an open() that comes later (in
# CI at nice 19 a reader reached its open() after a one-shot unblock and the script
# hung). Waits for the reader; its status in $rrc.
memdump_wait_reader() {
  if [ "$1" -ne 0 ]; then kill "$reader" 2>/dev/null; memdump_retire_fifo "$d/mem"; fi
  wait "$reader" 2>/dev/null  # (dash reports a reader it killed as "Terminated")
  rrc=$?
  reader=
}

# memdump_pause_window T0 T1: on stderr, the window the script measured around the dump
# tool (hypervisor clock; fifo.pause_window reads it): the guest was paused within it.
memdump_pause_window() { echo "memdump-pause-window $1 $2" >&2; }

# memdump_exit RC RRC: exits with the dump tool's status RC if it failed, else
# EXIT_READER_FAILED if the reader's RRC says so, else 0.
memdump_exit() {
  [ "$1" -eq 0 ] || exit "$1"
  [ "$2" -eq 0 ] || exit "$EXIT_READER_FAILED"
  exit 0
}

# Live capture, HypervisorConfig.live_userfaultfd "sysctl-window" (the same files and
# protocol as the QMP client, remote/qmp.py): memdump_uffd_open RUN sets
# vm.unprivileged_userfaultfd to 1 for an unprivileged QEMU to create its write-tracking
# userfaultfd, memdump_uffd_close puts the old value back (the descriptor QEMU made
# stays valid). RUN must be the root-only run directory (the caller checks it). The
# window holds a lock on RUN/userfaultfd.lock on fd 6 (children must not inherit it:
# 6>&-), so concurrent captures take turns; the old value is written to
# RUN/userfaultfd.restore *before* the sysctl changes and removed only after it is back,
# so a script killed outright is repaired by the next window or by uffd-restore.sh. The
# sysctl's path can be moved with MEMDUMP_UFFD_SYSCTL (tests).
memdump_uffd_sysctl=${MEMDUMP_UFFD_SYSCTL:-/proc/sys/vm/unprivileged_userfaultfd}
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

# memdump_qemu_pid NAME: prints the pid of libvirt domain NAME's QEMU (libvirt's pid
# file), only if that process's command line says "-name guest=NAME,...".
memdump_piddir=${MEMDUMP_LIBVIRT_PIDDIR:-/run/libvirt/qemu}
memdump_qemu_pid() {
  p=
  f=$memdump_piddir/$1.pid
  [ -f "$f" ] && [ ! -L "$f" ] && IFS= read -r p <"$f"
  case $p in ''|*[!0-9]*) return 1 ;; esac
  tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | {
    while IFS= read -r a; do
      case $a in "guest=$1"|"guest=$1",*) exit 0 ;; esac
    done
    exit 1
  } || return 1
  echo "$p"
}
