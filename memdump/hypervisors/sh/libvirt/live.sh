# $1 = URI, $2 = domain, $3 = "window" (open the userfaultfd window: memdump_uffd_open)
# or "direct", $4 = "drain" or "cancel" (what an abort does, below), $5 = a cap on the
# snapshot (bytes/s; "": none), $6 = "restore" (put the guest RAM that was on huge pages
# before the capture back on them after it: sh/hugepages.pl, quoted in as HUGEPAGES) or
# "keep"; stdin: the token (memdump_start).
#
# QEMU's background-snapshot migration through `virsh qemu-monitor-command` (libvirt >=
# 8.2 for --pass-fds). libvirt does not see this migration as a job of its own (`virsh
# domjobinfo` says "None" during it, `virsh domjobabort` answers "no job is active on
# the domain" and leaves it alone), and it marks the domain tainted "custom-monitor" at
# the first monitor command: recorded in the live metadata.
#
# QEMU before 8.1 (7.2 on Debian 12, measured on the lab) does not stop write tracking
# when a background snapshot is cancelled or fails (fixed upstream by commit
# 3a8b81f2e639 "migration: stop tracking ram writes when cancelling background
# migration"): guest RAM stays write-protected with nobody serving the faults, and the
# guest hangs at its next write. So the FIFO's reader (drain.sh) runs in a session of
# its own, deaf to SIGPIPE: when the collector goes away (abort, deadline, SSH cut, the
# script killed) its write to the closed stdout fails and it reads the rest of the stream
# into nothing until QEMU completes the snapshot (sh/fiforeader.pl's "drain"; without
# perl, cat then a second cat into /dev/null), and on such a QEMU an abort never cancels
# ("drain"); from 8.1 on it cancels ("cancel"). Not `tee -p /dev/null`, which did the
# same in 8 KiB reads, each also written to /dev/null: measured on the lab (1 GiB guest),
# tee, sshd and ssh cost 1.2 s more CPU than cat at the same stream.
#
# QEMU's snapshot thread disables the rate limit when it starts (a max-bandwidth set
# before migrate is ignored), so the cap is set as max-bandwidth once the migration
# runs: the previous value is saved in "$d/bandwidth" ("OLD NEW", for the repair of a
# killed script) first, and put back on every exit path. stdout: the memdump-dir line,
# then the migration stream. The steps: the reader on the FIFO; the FIFO's write end
# handed to QEMU (getfd "memdump"; the shell opens it for that one virsh call);
# [window]; background-snapshot on, checked on (a migrate without it is an ordinary
# migration that leaves the guest paused); migrate to fd:memdump; [the window closes
# once QEMU's new userfaultfd is in /proc/PID/fd: the status turns "active" before QEMU
# creates it]; [the cap]; poll until the end; [the previous max-bandwidth back];
# capability off; the guest must be running (paused by the migration: resumed, and
# EXIT_LEFT_PAUSED). EXIT_LIVE_UNSUPPORTED: found before the guest was touched (a
# memdump-live-unsupported line says why); EXIT_MONITOR_FAILED: a monitor command
# failed; EXIT_NO_RUN_DIR: no private run directory or userfaultfd window;
# EXIT_MIGRATION_FAILED: the migration did not complete; EXIT_WRITE_PROTECTED: QEMU
# left guest RAM write-protected; EXIT_READER_FAILED. On every exit path (traps) the
# window is closed, a migration still running is waited for (drained) or cancelled, the
# capability turned off, the fd closed.
uri=$1 dom=$2 how=$3 stop=$4 bw=$5 huge=$6
case $bw in
  *[!0-9]*) echo "memdump: bad max-bandwidth $bw" >&2; exit "$EXIT_BAD_ARGUMENT" ;;
esac
memdump_start ""
case $d in
  "$memdump_run"/memdump.*) ;;
  *) echo "memdump: live capture needs the private run directory $memdump_run" >&2; exit "$EXIT_NO_RUN_DIR" ;;
esac
started=0 capon=0 fdgiven=0 s=none r='' events='' bwset=0 bwold='' scanner='' collapser=''
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
# ls -l prints every fd's link target in one process (a readlink per fd would be one
# process each, every 5 ms while the snapshot starts).
# shellcheck disable=SC2010
uffds() { ls -l "/proc/$pid/fd" 2>/dev/null | grep -c 'anon_inode:\[userfaultfd\]'; }
running() {
  case $s in setup|active|device|pre-switchover|cancelling|wait-unplug) return 0 ;; esac
  return 1
}
# shellcheck disable=SC2317  # run by the traps below
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
  for p in $scanner $collapser; do kill "$p" 2>/dev/null; wait "$p"; done
  scanner='' collapser=''
  # Never killed: it ends when QEMU closes the stream (see above).
  reader=
  memdump_cleanup
}
trap memdump_live_end EXIT
trap 'memdump_live_end; exit "$EXIT_SIGNAL"' HUP INT TERM PIPE
unsupported() {
  printf 'memdump-live-unsupported %s\n' "$1" >&2
  exit "$EXIT_LIVE_UNSUPPORTED"
}
for t in flock setsid; do
  command -v "$t" >/dev/null 2>&1 || unsupported "$t is missing on the hypervisor"
done
exec 5>"$memdump_run/live.$dom.lock" || exit "$EXIT_NO_RUN_DIR"
flock -n 5 || unsupported "another live capture of domain $dom is running"
pid=$(memdump_qemu_pid "$dom") || unsupported "cannot find the QEMU process of domain $dom"
printf '%s\n' "$dom" >"$d/live" || exit "$EXIT_TEMP_FILE"
# Which guest RAM is on huge pages, before the snapshot splits them (hugepages.pl), in
# the background while the monitor commands below go (0.4 s for 4 GiB, measured); waited
# for before the migrate. A failure here costs the restore only, never the capture ("hp"
# says why).
hp=
if [ "$huge" = restore ]; then
  if ! command -v perl >/dev/null 2>&1; then
    hp="unavailable no-perl"
  else
    perl -e @HUGEPAGES@ scan "$pid" >"$d/hugepages" 2>>"$d/err" 5>&- 6>&- 8>&- &
    scanner=$!
  fi
fi
mkfifo -m 600 "$d/mem" || exit "$EXIT_TEMP_FILE"
setsid sh -c @DRAIN@ sh @FIFO_READER@ <"$d/mem" 5>&- 6>&- 8>&- &
reader=$!
echo "$reader" >"$d/reader"
fdgiven=1
r=$(virsh -c "$uri" qemu-monitor-command "$dom" --pass-fds 7 \
  '{"execute":"getfd","arguments":{"fdname":"memdump"}}' 7>"$d/mem" 2>>"$d/err" 5>&- 6>&- 8>&-)
case $r in *'"return"'*) ;; *) printf 'memdump-live-error getfd: %s\n' "$r" >&2; exit "$EXIT_MONITOR_FAILED" ;; esac
# QEMU's STOP and RESUME around the snapshot's start, with QEMU's timestamps: the pause
# as the events show it. Listening from now gives it time to register before migrate.
virsh -c "$uri" qemu-monitor-event --domain "$dom" --loop --timestamp --timeout 3600 \
  >"$d/events" 2>/dev/null 5>&- 6>&- 8>&- &
events=$!
mig
running && unsupported "a migration is in progress (status $s)"
n0=$(uffds)
if [ -n "$scanner" ]; then
  wait "$scanner" || hp="unavailable scan-$?"
  scanner=
fi
if [ "$how" = window ]; then
  memdump_uffd_open "$memdump_run" ||
    { echo "memdump: cannot open the userfaultfd window in $memdump_run" >&2; exit "$EXIT_NO_RUN_DIR"; }
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
    printf 'memdump-live-error query-migrate-parameters: %s\n' "$r" >&2; exit "$EXIT_MONITOR_FAILED"
  fi
  printf '%s %s\n' "$bwold" "$bw" >"$d/bandwidth" || exit "$EXIT_TEMP_FILE"
  bwset=1
  r=$(bwput "$bw")
  case $r in
    *'"return"'*) mig ;;
    *) printf 'memdump-live-error max-bandwidth: %s\n' "$r" >&2; exit "$EXIT_MONITOR_FAILED" ;;
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
# The huge pages back (hugepages.pl), in the background while the rest is put right
# (0.7-1.0 s for 4 GiB, measured; the monitor commands below take ~0.5 s).
if [ "$huge" = restore ] && [ -z "$hp" ]; then
  if [ "$s" = completed ]; then
    perl -e @HUGEPAGES@ collapse "$pid" <"$d/hugepages" >"$d/collapsed" 2>>"$d/err" \
      5>&- 6>&- 8>&- &
    collapser=$!
  else
    hp="unavailable not-completed"
  fi
fi
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
if [ -n "$collapser" ]; then
  if wait "$collapser"; then hp=$(cat "$d/collapsed"); else hp="unavailable collapse-$?"; fi
  collapser=
fi
cat "$d/err" >&2
[ -n "$hp" ] && printf 'memdump-live-hugepages %s\n' "$hp" >&2
printf 'memdump-live-stats %s\n' "$final" >&2
printf 'memdump-live-uffd %s %s %s\n' "$how" "${memdump_uffd_t0:--}" "${memdump_uffd_t1:--}" >&2
printf 'memdump-live-taint %s\n' "$taint" >&2
[ -n "$bwold" ] && printf 'memdump-live-bandwidth %s %s\n' "$bwold" "$bw" >&2
printf 'memdump-live-t1 %s %s\n' "$t1" "$at_t1" >&2
printf 'memdump-live-state %s\n' "$state" >&2
printf 'memdump-live-events %s|%s\n' "$evstop" "$evresume" >&2
memdump_pause_window "$t0" "$t1"
case $state in
  *user*) ;;
  paused*)
    virsh -c "$uri" resume "$dom" >/dev/null 2>&1 5>&- 6>&- 8>&-
    echo "memdump-live-resumed" >&2
    exit "$EXIT_LEFT_PAUSED" ;;
esac
[ "$leak" = 0 ] || exit "$EXIT_WRITE_PROTECTED"
[ "$capon" = 0 ] || { echo "memdump: background-snapshot could not be turned off" >&2; exit "$EXIT_MONITOR_FAILED"; }
[ "$bwset" = 0 ] || { echo "memdump: max-bandwidth $bwold could not be put back" >&2; exit "$EXIT_MONITOR_FAILED"; }
[ "$s" = completed ] || exit "$EXIT_MIGRATION_FAILED"
memdump_exit 0 "$rrc"
