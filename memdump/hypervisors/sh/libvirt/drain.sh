# The live capture's FIFO reader (run as `setsid sh -c DRAIN sh FIFO_READER`, without
# lib.sh): the stream to stdout, and when stdout is gone the rest into /dev/null (see
# live.sh); in large writes through perl (sh/fiforeader.pl) where the host has it.
trap '' PIPE; command -v perl >/dev/null 2>&1 && exec perl -e "$1" drain; cat && exit 0; rc=$?; cat >/dev/null; exit "$rc"
