# $1 = the dump's directory (its memdump-dir line); stdin: its token. For drivers whose
# dump tool cannot be cancelled (QMP/HMP dump-guest-memory). Closing the stream already
# breaks the FIFO; this kills that dump's reader as well (only if its command line names
# that dump's FIFO), lets a QEMU still in open() go on (QEMU's write fails, it ends the
# dump and resumes the guest) and removes the FIFO, so that a QEMU that gets to its
# open() only now fails there instead of waiting for ever (memdump_retire_fifo). Best
# effort; nothing is done unless the directory passes memdump_enter and holds the token.
memdump_enter_own "$1" || exit 0
memdump_kill_noted reader "$1"
memdump_retire_fifo mem
exit 0
