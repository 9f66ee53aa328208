# The qemu driver's part of every script that runs the QMP client (after lib.sh): the
# client needs python3, checked first so that the error says what is missing rather than
# "not found" from deep inside.
command -v python3 >/dev/null 2>&1 || {
  echo "memdump-no-python3: the qemu driver needs python3 on the hypervisor" >&2
  exit "$EXIT_NO_PYTHON"
}

# memdump_qmp MODE ARG...: replaces the shell with the QMP client
# (memdump/hypervisors/remote/qmp.py, its text in this quoted here-document, run as
# `python3 -I -S - MODE ARG...`: -I ignores PYTHON* variables and the user's site
# directory, -S skips site-packages; root runs it). Call it in a subshell, ( memdump_qmp
# ... ), or in the background, memdump_qmp ... &: the client is then that process (its
# pid $!, its command line its own), and the text is in the script once.
memdump_qmp() {
  exec python3 -I -S - "$@" <<'MEMDUMP_QMP_CLIENT'
@QMP_CLIENT@
MEMDUMP_QMP_CLIENT
}

# memdump_socket DIR NAME: sets s to VM NAME's QMP socket DIR/NAME.qmp; exits if DIR or
# NAME is not plain (EXIT_BAD_ARGUMENT) or there is no such socket (EXIT_NO_VM).
memdump_socket() {
  if ! plain "$1" || ! plain "$2"; then
    echo "memdump: bad qmp_dir or VM name" >&2
    exit "$EXIT_BAD_ARGUMENT"
  fi
  s=$1/$2.qmp
  [ -S "$s" ] || { printf 'memdump-no-vm %s\n' "$2" >&2; exit "$EXIT_NO_VM"; }
}

# memdump_live_notes FILE: from a live client's output FILE, the pid of the QEMU it
# spoke to (its "memdump-peer PID ..." line) in $pid, and the max-bandwidth it set
# (its "memdump-live-bandwidth OLD NEW" line, printed before it set NEW) in $bw0 $bw1:
# what a repair after a kill needs. Empty where FILE says nothing.
memdump_live_notes() {
  pid=$(sed -n 's/^memdump-peer \([0-9][0-9]*\) .*/\1/p' "$1" 2>/dev/null | head -n 1)
  bw=$(sed -n 's/^memdump-live-bandwidth \([0-9]\{1,20\} [0-9]\{1,20\}\)$/\1/p' "$1" \
    2>/dev/null | head -n 1)
  bw0=${bw%% *} bw1=${bw#* }
}

# The userfaultfd sysctl, for the client (MEMDUMP_UFFD_SYSCTL moves it: tests).
sysctl=${MEMDUMP_UFFD_SYSCTL:-/proc/sys/vm/unprivileged_userfaultfd}
