# $1 = qm, $2 = vmid; stdin: the token (memdump_start; abort-fifo.sh checks it: never on
# a command line). stdout: the memdump-dir line, then the dump. stderr: the monitor's
# answer to the dump command, "memdump-dump-status <info dump's Status>" and the pause
# window. EXIT_MONITOR_REFUSED: the monitor refused the command; EXIT_DUMP_INCOMPLETE:
# the dump did not complete.
memdump_start ""
memdump_fifo_reader
t0=$(date +%s.%N)
printf 'dump-guest-memory -d %s\n' "$d/mem" | "$1" monitor "$2" >"$d/reply" 2>&1 8>&-
rc=$?
if [ "$rc" -eq 0 ] && grep -qiE '(^|qm> )error' "$d/reply"; then rc=$EXIT_MONITOR_REFUSED; fi
# -d (detach): QEMU opens the FIFO before it answers and closes it when the dump is
# over, so the reader's end is the end of the pause.
memdump_wait_reader "$rc"
t1=$(date +%s.%N)
st=
if [ "$rc" -eq 0 ]; then
  i=0
  while :; do
    st=$(printf 'info dump\n' | "$1" monitor "$2" 2>&1 |
      sed -n 's/^.*Status: *\([a-z-]*\).*$/\1/p' | tail -n 1)
    if [ "$st" != active ] || [ "$i" -ge 100 ]; then break; fi
    i=$((i + 1))
    sleep 0.1 2>/dev/null || sleep 1
  done
  [ "$st" = completed ] || rc=$EXIT_DUMP_INCOMPLETE
fi
sed -e 's/^\(qm> \)*//' -e '/^Entering QEMU Monitor/d' -e '/^ *$/d' "$d/reply" >&2
echo "memdump-dump-status ${st:-unknown}" >&2
memdump_pause_window "$t0" "$t1"
memdump_exit "$rc" "$rrc"
