# $1 = qmp_dir, $2 = VM (socket) name, $3 = the QMP commands, $4 = allowed QEMU
# binaries. The client's block for that socket, then the host name.
memdump_socket "$1" "$2"
(memdump_qmp query 30 "$3" "$4" "$s")
rc=$?
[ "$rc" -eq 0 ] || exit "$rc"
echo "memdump-host $(uname -n)"
exit 0
