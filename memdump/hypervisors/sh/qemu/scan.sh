# $1 = qmp_dir, $2 = QMP commands, $3 = allowed QEMU binaries. For every socket: the
# client's "memdump-sock <path>" block (peer, replies, or an error). A socket that does
# not answer within 5 s (a QEMU gone, or busy dumping) gets an error instead.
plain "$1" || { echo "memdump: bad qmp_dir" >&2; exit "$EXIT_BAD_ARGUMENT"; }
[ -d "$1" ] || { printf 'memdump: no directory %s\n' "$1" >&2; exit "$EXIT_NO_QMP_DIR"; }
dir=$1 cmds=$2 bins=$3
set --
for s in "$dir"/*.qmp; do
  [ -S "$s" ] || continue
  plain "${s##*/}" || continue
  set -- "$@" "$s"
done
[ $# -gt 0 ] || exit 0
# The client's status (EXIT_NO_PYTHON: a python3 it cannot run on).
(memdump_qmp query 5 "$cmds" "$bins" "$@")
