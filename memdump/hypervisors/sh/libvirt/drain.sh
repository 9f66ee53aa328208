# The live capture's FIFO reader (run as `setsid sh -c DRAIN`, without lib.sh): the
# stream to stdout, and when stdout is gone the rest into /dev/null (see live.sh).
trap '' PIPE; cat && exit 0; rc=$?; cat >/dev/null; exit "$rc"
