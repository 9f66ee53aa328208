# $1 = the live script's directory; stdin: its token. Kills its reader (QEMU's next
# write fails, which fails the migration), then stops its client (SIGTERM: it cancels
# the migration, turns the capability off, puts the sysctl back) and waits for it, up
# to 10 s. Only processes whose command line names that directory's FIFO.
memdump_enter_own "$1" || exit 0
memdump_kill_noted reader "$1"
if memdump_kill_noted client "$1"; then
  n=0
  while [ -d "/proc/$memdump_noted" ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
fi
memdump_unblock mem
exit 0
