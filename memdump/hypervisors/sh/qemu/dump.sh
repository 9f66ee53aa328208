# $1 = qmp_dir, $2 = VM name, $3 = allowed QEMU binaries; stdin: the token
# (memdump_start; abort-fifo.sh checks it: never on a command line). The reader (cat)
# starts before QEMU gets the FIFO's write end; the client opens it, passes it to QEMU
# (getfd) and closes its own copy, so the reader's end of file is QEMU's close at the
# end of the dump. The FIFO and "$d" are never chowned or opened up: QEMU needs no
# access to the path. A failed client: the reader may still wait in open() for a
# writer, so it is killed.
memdump_socket "$1" "$2"
bins=$3
memdump_start ""
plain "$d" || { echo "memdump: temp dir path not plain: $d" >&2; exit "$EXIT_NO_TEMP_DIR"; }
memdump_fifo_reader
t0=$(date +%s.%N)
(memdump_qmp dump "$s" "$d/mem" "$bins" "$reader") >"$d/reply" 2>"$d/err" 8>&-
rc=$?
t1=$(date +%s.%N)
memdump_wait_reader "$rc"
cat "$d/err" "$d/reply" >&2
memdump_pause_window "$t0" "$t1"
memdump_exit "$rc" "$rrc"
