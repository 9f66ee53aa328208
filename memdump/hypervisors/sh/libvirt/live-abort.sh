# $1 = URI, $2 = domain, $3 = the live script's directory (its memdump-dir line);
# stdin: its token. Only for QEMU >= 8.1 (stop "cancel"): cancels the migration of that
# script, if its directory passes memdump_enter_own and says it is live. The script then
# turns the capability off and cleans up; the reader drains what is left. Before 8.1 an
# abort only closes the stream (the migration runs to its end into /dev/null).
memdump_enter_own "$3" || exit 0
[ -f live ] && [ ! -L live ] || exit 0
virsh -c "$1" qemu-monitor-command "$2" '{"execute":"migrate_cancel"}' >/dev/null 2>&1
exit 0
