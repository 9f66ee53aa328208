# $1 = URI, $2 = domain name; stdin: the token (memdump_start). The reader (cat) is
# started before virsh so that QEMU's open of the FIFO does not block; if virsh fails
# before QEMU opened it, cat would wait for ever in open(), so it is killed. The temp dir
# goes on every exit path (trap, and clean.sh for a script killed outright). stdout
# carries the memdump-dir line, then only the dump; virsh's own messages go to a file,
# sent as stderr last.
memdump_start ""
memdump_fifo_reader
t0=$(date +%s.%N)
virsh -c "$1" dump --memory-only --format elf "$2" "$d/mem" >/dev/null 2>"$d/err" 8>&-
rc=$?
t1=$(date +%s.%N)
memdump_wait_reader "$rc"
cat "$d/err" >&2
memdump_pause_window "$t0" "$t1"
memdump_exit "$rc" "$rrc"
