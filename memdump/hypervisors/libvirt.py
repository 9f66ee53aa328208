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
from memdump.hypervisors.fifo import (
    ENTER_FN,
    PROLOGUE,
    PROLOGUE_IN_BASE,
    RUN_DIR,
    UFFD_WINDOW_FN,
    DirStream,
    clean_stale,
    pause_window,
    restore_userfaultfd,
    start_dump,
    token_stdin,
)
from memdump.hypervisors.migration import migration_fields
from memdump.identifiers import validate_id
from memdump.pipeline import DumpSource
from memdump.settings import QEMU_MAX_BANDWIDTH, HypervisorConfig, Settings
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

# -- live capture (issue 12) -----------------------------------------------------------
#
# QEMU's background-snapshot migration through `virsh qemu-monitor-command` (libvirt >=
# 8.2 for --pass-fds). libvirt does not see this migration as a job of its own (`virsh
# domjobinfo` says "None" during it, `virsh domjobabort` answers "no job is active on the
# domain" and leaves it alone), and it marks the domain tainted "custom-monitor" at the
# first monitor command: recorded in the live metadata.
#
# QEMU before 8.1 (7.2 on Debian 12, measured on the lab) does not stop write tracking
# when a background snapshot is cancelled or fails (fixed upstream by commit 3a8b81f2e639
# "migration: stop tracking ram writes when cancelling background migration"): guest RAM
# stays write-protected with nobody serving the faults, and the guest hangs at its next
# write. So the FIFO's reader (_DRAIN) runs in a session of its own, deaf to SIGPIPE:
# when the collector goes away (abort, deadline, SSH cut, the script killed) its cat
# fails on the closed stdout and a second cat drains the stream into /dev/null until
# QEMU completes the snapshot, and on such a QEMU an abort never cancels ("drain"); from
# 8.1 on it cancels ("cancel"). Not `tee -p /dev/null`, which did the same in 8 KiB
# reads, each also written to /dev/null: measured on the lab (1 GiB guest), tee, sshd
# and ssh cost 1.2 s more CPU than cat at the same stream.
_DRAIN = "trap '' PIPE; cat && exit 0; rc=$?; cat >/dev/null; exit \"$rc\""

# Shell: ``memdump_qemu_pid NAME`` prints the pid of domain NAME's QEMU (libvirt's pid
# file), only if that process's command line says "-name guest=NAME,...".
_PID_FN = r"""memdump_piddir=${MEMDUMP_LIBVIRT_PIDDIR:-/run/libvirt/qemu}
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
"""

# $1 = URI, $2 = domain, $3 = the hypervisor's live_userfaultfd. Changes nothing. Prints
# sections "memdump-section NAME LENGTH" + that many bytes + a newline; the collector
# parses and judges them (_judge_preflight). The monitor (which taints the domain) is
# asked only if the sections before it leave live capture possible.
_LIVE_PREFLIGHT = (
    "export LC_ALL=C\n"
    + _PID_FN
    + r"""sec() { printf 'memdump-section %s %s\n%s\n' "$1" "${#2}" "$2"; }
state=$(virsh -c "$1" domstate "$2" 2>&1)
sec state "$state"
sec libvirt "$(virsh -c "$1" version 2>&1)"
sec xml "$(virsh -c "$1" dumpxml "$2" 2>&1)"
tools=
for t in flock setsid; do command -v "$t" >/dev/null 2>&1 || tools="$tools $t"; done
sec missing "${tools# }"
pid=$(memdump_qemu_pid "$2") || pid=
sec pid "$pid"
st=
[ -n "$pid" ] && st=$(grep -E '^(Uid|CapEff):' "/proc/$pid/status" 2>/dev/null)
sec status "$st"
u=$(cat "${MEMDUMP_UFFD_SYSCTL:-/proc/sys/vm/unprivileged_userfaultfd}" 2>/dev/null)
sec uffd "$u"
[ "$state" = running ] && [ -n "$pid" ] && [ -z "$tools" ] || exit 0
cap=$(printf '%s\n' "$st" | sed -n 's/^CapEff:[[:space:]]*//p')
case $cap in ''|*[!0-9a-fA-F]*) exit 0 ;; esac
if [ $(( (0x$cap >> 19) & 1 )) -eq 0 ] && [ "$u" != 1 ] && [ "$3" != sysctl-window ]; then
  exit 0
fi
m() { virsh -c "$1" qemu-monitor-command "$2" "$3" 2>&1; }
sec version "$(m "$1" "$2" '{"execute":"query-version"}')"
sec migrate "$(m "$1" "$2" '{"execute":"query-migrate"}')"
sec caps "$(m "$1" "$2" '{"execute":"query-migrate-capabilities"}')"
sec mtree "$(virsh -c "$1" qemu-monitor-command "$2" --hmp 'info mtree -f' 2>&1)"
sec registers "$(virsh -c "$1" qemu-monitor-command "$2" --hmp 'info registers' 2>&1)"
exit 0
"""
)

# $1 = URI, $2 = domain, $3 = "window" (open the userfaultfd window: UFFD_WINDOW_FN) or
# "direct", $4 = "drain" or "cancel" (what an abort does, above), $5 = a cap on the
# snapshot (bytes/s; "": none); stdin: the token (PROLOGUE). QEMU's snapshot thread
# disables the rate limit when it starts (a max-bandwidth set before migrate is ignored),
# so the cap is set as max-bandwidth once the migration runs: the previous value is saved
# in "$d/bandwidth" ("OLD NEW", for the repair of a killed script) first, and put back
# on every exit path. stdout: the memdump-dir line, then the migration stream. The
# steps: the reader on the FIFO; the FIFO's write end handed to QEMU (getfd "memdump"; the
# shell opens it for that one virsh call); [window]; background-snapshot on, checked on
# (a migrate without it is an ordinary migration that leaves the guest paused); migrate
# to fd:memdump; [the window closes once QEMU's new userfaultfd is in /proc/PID/fd: the
# status turns "active" before QEMU creates it]; [the cap]; poll until the end; [the
# previous max-bandwidth back]; capability off;
# the guest must be running (paused by the migration: resumed, and exit 86). Exit 80 =
# live capture unsupported, found before the guest was touched (a memdump-live-unsupported
# line says why); 81 = a monitor command failed; 83 = no private run directory; 84 = the
# migration did not complete; 85 = QEMU left guest RAM write-protected; 92 = the reader
# failed. On every exit path (traps) the window is closed, a migration still running is
# waited for (drained) or cancelled, the capability turned off, the fd closed.
_LIVE = (
    """export LC_ALL=C
umask 077
uri=$1 dom=$2 how=$3 stop=$4 bw=$5
case $bw in *[!0-9]*) echo "memdump: bad max-bandwidth $bw" >&2; exit 70 ;; esac
"""
    + PROLOGUE
    + _PID_FN
    + UFFD_WINDOW_FN
    + r"""case $d in
  "$memdump_run"/memdump.*) ;;
  *) echo "memdump: live capture needs the private run directory $memdump_run" >&2; exit 83 ;;
esac
started=0 capon=0 fdgiven=0 s=none r= events= bwset=0 bwold=
mon() { virsh -c "$uri" qemu-monitor-command "$dom" "$@" 2>>"$d/err" 5>&- 6>&- 8>&-; }
mig() {
  r=$(mon '{"execute":"query-migrate"}')
  s=${r#*\"status\":\"}
  [ "$s" = "$r" ] && s=none
  s=${s%%\"*}
  case $s in ''|*[!a-z-]*) s=unknown ;; esac
}
capset() {
  mon '{"execute":"migrate-set-capabilities","arguments":{"capabilities":'"\
[{\"capability\":\"background-snapshot\",\"state\":$1}]}}"
}
bwput() {
  mon '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":'"$1"'}}'
}
capstate() {
  case $(mon '{"execute":"query-migrate-capabilities"}') in
    *'"state":true,"capability":"background-snapshot"'*) echo on ;;
    *'"capability":"background-snapshot","state":true'*) echo on ;;
    *'"capability":"background-snapshot"'*) echo off ;;
    *) echo unknown ;;
  esac
}
uffds() { ls -l "/proc/$pid/fd" 2>/dev/null | grep -c 'anon_inode:\[userfaultfd\]'; }
running() {
  case $s in setup|active|device|pre-switchover|cancelling|wait-unplug) return 0 ;; esac
  return 1
}
memdump_live_end() {
  trap "" HUP INT TERM PIPE
  memdump_uffd_close
  if [ "$started" = 1 ]; then
    [ "$stop" = cancel ] && mon '{"execute":"migrate_cancel"}' >/dev/null
    i=0
    mig
    while running && [ "$i" -lt 3000 ]; do i=$((i + 1)); sleep 0.2; mig; done
    case $(virsh -c "$uri" domstate --reason "$dom" 2>/dev/null 5>&- 6>&- 8>&-) in
      *user*) ;;
      paused*) virsh -c "$uri" resume "$dom" >/dev/null 2>&1 5>&- 6>&- 8>&- ;;
    esac
    started=0
  fi
  if [ "$bwset" = 1 ]; then bwput "$bwold" >/dev/null; bwset=0; fi
  if [ "$capon" = 1 ]; then capset false >/dev/null; capon=0; fi
  if [ "$fdgiven" = 1 ]; then
    mon '{"execute":"closefd","arguments":{"fdname":"memdump"}}' >/dev/null
    fdgiven=0
  fi
  if [ -n "$events" ]; then kill "$events" 2>/dev/null; events=; fi
  # Never killed: it ends when QEMU closes the stream (see above).
  reader=
  memdump_cleanup
}
trap memdump_live_end EXIT
trap 'memdump_live_end; exit 143' HUP INT TERM PIPE
unsupported() { printf 'memdump-live-unsupported %s\n' "$1" >&2; exit 80; }
for t in flock setsid; do
  command -v "$t" >/dev/null 2>&1 || unsupported "$t is missing on the hypervisor"
done
exec 5>"$memdump_run/live.$dom.lock" || exit 83
flock -n 5 || unsupported "another live capture of domain $dom is running"
pid=$(memdump_qemu_pid "$dom") || unsupported "cannot find the QEMU process of domain $dom"
printf '%s\n' "$dom" >"$d/live" || exit 91
mkfifo -m 600 "$d/mem" || exit 91
setsid sh -c @DRAIN@ <"$d/mem" 5>&- 6>&- 8>&- &
reader=$!
echo "$reader" >"$d/reader"
fdgiven=1
r=$(virsh -c "$uri" qemu-monitor-command "$dom" --pass-fds 7 \
  '{"execute":"getfd","arguments":{"fdname":"memdump"}}' 7>"$d/mem" 2>>"$d/err" 5>&- 6>&- 8>&-)
case $r in *'"return"'*) ;; *) printf 'memdump-live-error getfd: %s\n' "$r" >&2; exit 81 ;; esac
# QEMU's STOP and RESUME around the snapshot's start, with QEMU's timestamps: the pause
# as the events show it. Listening from now gives it time to register before migrate.
virsh -c "$uri" qemu-monitor-event --domain "$dom" --loop --timestamp --timeout 3600 \
  >"$d/events" 2>/dev/null 5>&- 6>&- 8>&- &
events=$!
mig
running && unsupported "a migration is in progress (status $s)"
n0=$(uffds)
if [ "$how" = window ]; then
  memdump_uffd_open "$memdump_run" ||
    { echo "memdump: cannot open the userfaultfd window in $memdump_run" >&2; exit 83; }
fi
capon=1
r=$(capset true)
case $r in *'"return"'*) ;; *) memdump_uffd_close; unsupported "$r" ;; esac
if [ "$(capstate)" != on ]; then
  memdump_uffd_close
  unsupported "background-snapshot is not on after migrate-set-capabilities"
fi
t0=$(date +%s.%N)
r=$(mon '{"execute":"migrate","arguments":{"uri":"fd:memdump"}}')
case $r in *'"return"'*) started=1 ;; *) memdump_uffd_close; unsupported "$r" ;; esac
i=0
while [ "$(uffds)" -le "$n0" ] && [ "$i" -lt 2000 ]; do
  i=$((i + 1))
  if [ $((i % 20)) -eq 0 ]; then mig; running || break; fi
  sleep 0.005
done
memdump_uffd_close
mig
t1=$(date +%s.%N)
at_t1=$r
if [ -n "$bw" ] && running; then
  r=$(mon '{"execute":"query-migrate-parameters"}')
  bwold=${r#*\"max-bandwidth\":}
  bwold=${bwold%%[!0-9]*}
  if [ "$bwold" = "" ] || [ "$bwold" = "$r" ]; then
    printf 'memdump-live-error query-migrate-parameters: %s\n' "$r" >&2; exit 81
  fi
  printf '%s %s\n' "$bwold" "$bw" >"$d/bandwidth" || exit 91
  bwset=1
  r=$(bwput "$bw")
  case $r in
    *'"return"'*) mig ;;
    *) printf 'memdump-live-error max-bandwidth: %s\n' "$r" >&2; exit 81 ;;
  esac
fi
# The end of the snapshot is the reader's end: QEMU closes the stream when the migration
# ends, however it ends. Waiting for that instead of asking QEMU every 0.1 s spares a
# virsh call (17 ms of CPU, measured) per poll: a second of hypervisor CPU per 6 s
# capture. QEMU is still asked every 5 s, in case it ended without closing the stream.
reading() {  # the reader has not ended (exited and not yet waited for: state Z)
  st=
  read -r _ _ st _ <"/proc/$reader/stat" 2>/dev/null || return 1
  [ "$st" != Z ]
}
i=0
while running && reading; do
  sleep 0.1
  i=$((i + 1))
  [ $((i % 50)) -eq 0 ] && mig
done
# Once the stream has ended QEMU may need a moment to report the migration's end.
i=0
mig
while running && [ "$i" -lt 600 ]; do i=$((i + 1)); sleep 0.05; mig; done
final=$r
started=0
if [ "$bwset" = 1 ]; then
  case $(bwput "$bwold") in *'"return"'*) bwset=0 ;; esac
fi
r=$(capset false)
[ "$(capstate)" = off ] && capon=0
mon '{"execute":"closefd","arguments":{"fdname":"memdump"}}' >/dev/null
fdgiven=0
wait "$reader"
rrc=$?
reader=
kill "$events" 2>/dev/null
wait "$events"
events=
ev() {
  sed -n "s/^\([0-9-]* [0-9:.]*\)+0000: event $1 for domain .*/\1/p" "$d/events" | head -n 1
}
evstop=$(ev STOP)
evresume=$(ev RESUME)
state=$(virsh -c "$uri" domstate --reason "$dom" 2>>"$d/err" 5>&- 6>&- 8>&-)
leak=0
grep -qE '^VmFlags:.* uw( |$)' "/proc/$pid/smaps" 2>/dev/null && leak=1
taint=$(sed -n "s/.*<taint flag='\([a-z0-9-]*\)'\/>.*/\1/p" "$memdump_piddir/$dom.xml" \
  2>/dev/null | tr '\n' ' ')
cat "$d/err" >&2
printf 'memdump-live-stats %s\n' "$final" >&2
printf 'memdump-live-uffd %s %s %s\n' "$how" "${memdump_uffd_t0:--}" "${memdump_uffd_t1:--}" >&2
printf 'memdump-live-taint %s\n' "$taint" >&2
[ -n "$bwold" ] && printf 'memdump-live-bandwidth %s %s\n' "$bwold" "$bw" >&2
printf 'memdump-live-t1 %s %s\n' "$t1" "$at_t1" >&2
printf 'memdump-live-state %s\n' "$state" >&2
printf 'memdump-live-events %s|%s\n' "$evstop" "$evresume" >&2
echo "memdump-pause-window $t0 $t1" >&2
case $state in
  *user*) ;;
  paused*)
    virsh -c "$uri" resume "$dom" >/dev/null 2>&1 5>&- 6>&- 8>&-
    echo "memdump-live-resumed" >&2
    exit 86 ;;
esac
[ "$leak" = 0 ] || exit 85
[ "$capon" = 0 ] || { echo "memdump: background-snapshot could not be turned off" >&2; exit 81; }
[ "$bwset" = 0 ] || { echo "memdump: max-bandwidth $bwold could not be put back" >&2; exit 81; }
[ "$s" = completed ] || exit 84
[ "$rrc" -eq 0 ] || exit 92
exit 0
"""
).replace("@DRAIN@", shlex.quote(_DRAIN))

# $1 = URI, $2 = domain, $3 = the live script's directory (its memdump-dir line); stdin:
# its token. Only for QEMU >= 8.1 (stop "cancel"): cancels the migration of that script,
# if its directory passes memdump_enter_own and says it is live. The script then turns
# the capability off and cleans up; the reader drains what is left. Before 8.1 an abort
# only closes the stream (the migration runs to its end into /dev/null).
_LIVE_ABORT = (
    "export LC_ALL=C\n"
    + ENTER_FN
    + r"""memdump_enter_own "$3" || exit 0
[ -f live ] && [ ! -L live ] || exit 0
virsh -c "$1" qemu-monitor-command "$2" '{"execute":"migrate_cancel"}' >/dev/null 2>&1
exit 0
"""
)

# $1 = URI. For the live scripts killed outright (their directory in the run directory
# still says "live", its lock is free) and whose domain no live script holds: waits (up
# to ~60 s) for a migration still draining, unless libvirt has a job of its own on the
# domain, then puts the VM's max-bandwidth back (from the directory's "bandwidth" file, if
# the script's value is still in force), turns background-snapshot off and closes a
# "memdump" fd left in QEMU, and removes the directory. Prints "live-repaired DOMAIN"
# and the directory for each.
_LIVE_REPAIR = (
    "export LC_ALL=C\n"
    + ENTER_FN
    + r"""uri=$1
run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
[ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ] || exit 0
command -v flock >/dev/null 2>&1 || exit 0
for d in "$run"/memdump.??????????; do
  (
    memdump_enter "$d" || exit 0
    [ -f live ] && [ ! -L live ] || exit 0
    [ -f lock ] && [ ! -L lock ] && flock -n lock true || exit 0
    IFS= read -r dom <live || exit 0
    case $dom in ''|[!A-Za-z0-9]*|*[!A-Za-z0-9._-]*|*..*) exit 0 ;; esac
    exec 5>"$run/live.$dom.lock" || exit 0
    flock -n 5 || exit 0
    mon() { virsh -c "$uri" qemu-monitor-command "$dom" "$1" 2>/dev/null 5>&-; }
    job=$(virsh -c "$uri" domjobinfo "$dom" 2>/dev/null 5>&- | sed -n 's/^Job type: *//p')
    i=0
    while [ "$i" -lt 300 ]; do
      case $(mon '{"execute":"query-migrate"}') in
        *'"status":"setup"'*|*'"status":"active"'*|*'"status":"device"'*) ;;
        *'"status":"cancelling"'*|*'"status":"pre-switchover"'*) ;;
        *) break ;;
      esac
      [ "$job" = None ] || exit 0
      i=$((i + 1))
      sleep 0.2
    done
    [ "$i" -lt 300 ] || exit 0
    bw0= bw1=
    if [ -f bandwidth ] && [ ! -L bandwidth ]; then read -r bw0 bw1 <bandwidth; fi
    case $bw0$bw1 in *[!0-9]*) bw0= bw1= ;; esac
    if [ -n "$bw0" ] && [ -n "$bw1" ] && [ "$bw0" != "$bw1" ]; then
      case $(mon '{"execute":"query-migrate-parameters"}') in
        *"\"max-bandwidth\":$bw1,"*|*"\"max-bandwidth\":$bw1}"*)
          mon '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":'"$bw0"'}}' \
            >/dev/null ;;
      esac
    fi
    mon '{"execute":"migrate-set-capabilities","arguments":{"capabilities":'\
'[{"capability":"background-snapshot","state":false}]}}' >/dev/null
    mon '{"execute":"closefd","arguments":{"fdname":"memdump"}}' >/dev/null
    echo "live-repaired $dom"
    # Its script is dead (the lock, held from before "live" was written, is free): the
    # directory goes now, entries relative to it, then the name (rmdir).
    rm -rf ./* ./.[!.]* ./..?* 2>/dev/null
    exit 2
  )
  [ $? -eq 2 ] && rmdir "$d" 2>/dev/null && echo "$d"
done
exit 0
""".replace("@RUN_DIR@", RUN_DIR)
)
_EXIT_UNSUPPORTED = 80
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
        self,
        ref: VMRef,
        *,
        staging: Staging = "fifo",
        margin: float = _DEFAULT_MARGIN,
        mode: Literal["paused", "live"] = "paused",
        spill_dir: Path | None = None,
        buffer_bytes: int = 64 << 20,
        max_bandwidth: int | None = None,
    ) -> DumpSource:
        """``staging`` (Settings.staging): "fifo" streams QEMU's output as it is written
        (the guest is paused for the whole transfer); "file" has QEMU write a temp file in
        the hypervisor's ``staging_dir`` first, after checking that memory size x
        ``margin`` (Settings.disk_space_margin) is free there, then streams that file.
        ``mode="live"``: the guest keeps running; QEMU's background snapshot is turned
        into the ELF core on the collector (memdump.livecore, early pages buffered up to
        ``buffer_bytes``, then spilled into ``spill_dir``), capped at ``max_bandwidth``
        bytes/s if set (QEMU's max-bandwidth while it runs, the VM's own value put back
        after it); staging does not apply.
        LiveCaptureUnsupportedError (before the guest was touched) if it cannot be."""
        validate_id(ref.name, what="domain name")
        if mode == "live":
            from memdump.livecore import GuestLayout, LayoutError, LiveCoreSource
            from memdump.livecore import elf_machine_from_registers as machine_of

            pre = self.live_preflight(ref)
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
        args = (self._uri, ref.name, how, pre.stop, bw)
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
        self._error: BaseException | None = None
        self._aborted = False
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
        if n == 0:
            self._end()
        return n

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
        if rc == _EXIT_UNSUPPORTED and "unsupported" in lines:
            reason = _qmp_error(lines["unsupported"])
            raise LiveCaptureUnsupportedError(
                f"live capture of {name} on {hv} is not possible: {reason}",
                reason=reason,
                hypervisor=hv,
                vm_id=self._ref.vmid,
            )
        what = {
            81: "a QEMU monitor command failed",
            83: "the run directory or the userfaultfd window is not usable",
            84: f"the migration did not complete (status {self.live.get('migration_status')})",
            85: "QEMU left the guest's memory write-protected after the migration (QEMU < 8.1 "
            "does not stop write tracking of a failed background snapshot): the guest will "
            "hang on its next write to such a page; restart it",
            86: "the migration left the guest paused (it was not a background snapshot); "
            "it was resumed",
            92: "the FIFO reader failed",
        }.get(rc, "the live capture script failed")
        raise DumpFailedError(
            f"live capture of {name} on {hv} failed (exit {rc}): {what}: {rest or 'no message'}",
            retryable=rc in (84, 92),
            **fields,
        )

    def close_ok(self) -> None:
        self._end()

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._s.abort()
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
