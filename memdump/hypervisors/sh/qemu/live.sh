# $1 = qmp_dir, $2 = VM name, $3 = allowed QEMU binaries, $4 = live_userfaultfd, $5 = a
# cap on the snapshot (bytes/s, QEMU's max-bandwidth while it runs; "": none), $6 =
# "restore" (the client puts guest RAM that was on huge pages back on them after the
# capture: sh/hugepages.pl, quoted in as HUGEPAGES) or "keep"; stdin: the token. As
# dump.sh, with the client's ``live`` mode (QEMU's migration capability
# background-snapshot): the migration stream goes into the FIFO, its reader
# (sh/fiforeader.pl, or cat) sends it on stdout.
# "$d/qmp" (the socket) and the client's output "$d/reply" (its peer line: QEMU's pid)
# let repair.sh repair QEMU if this script is killed outright. A signal to the script
# stops the client first (it cancels the migration, turns the capability off and puts
# the sysctl back), then cleans up; a client that died without doing so (killed) is
# repaired here.
memdump_socket "$1" "$2"
bins=$3 policy=$4 bw=$5 huge=
[ "$6" = restore ] && huge=@HUGEPAGES@
run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
memdump_start ""
plain "$d" || { echo "memdump: temp dir path not plain: $d" >&2; exit "$EXIT_NO_TEMP_DIR"; }
client=
# shellcheck disable=SC2317  # run by the trap below
memdump_live_stop() {
  trap "" HUP INT TERM PIPE
  if [ -n "$client" ]; then kill "$client" 2>/dev/null; wait "$client"; client=; fi
}
trap 'memdump_live_stop; memdump_cleanup; exit "$EXIT_SIGNAL"' HUP INT TERM PIPE
printf '%s\n' "$s" >"$d/qmp" || exit "$EXIT_TEMP_FILE"
memdump_live_reader @FIFO_READER@
memdump_qmp live "$s" "$d/mem" "$bins" "$reader" "$policy" "$run" "$sysctl" "$bw" "$huge" \
  >"$d/reply" 2>"$d/err" 8>&- &
client=$!
echo "$client" >"$d/client"
wait "$client"
rc=$?
client=
if [ "$rc" -gt 128 ]; then
  # The client was killed before it could put QEMU and the sysctl right: repaired
  # here, its migration drained through the FIFO while the reader still holds it.
  memdump_live_notes "$d/reply"
  if [ -n "$pid" ]; then
    (memdump_qmp repair "$s" "$bins" "$pid" "$d/mem" "$bw0" "$bw1") >>"$d/reply" 2>&1 8>&-
  fi
  (memdump_qmp uffd-restore "$run" "$sysctl") >>"$d/reply" 2>&1 8>&-
fi
memdump_wait_reader "$rc"
cat "$d/err" "$d/reply" >&2
memdump_exit "$rc" "$rrc"
