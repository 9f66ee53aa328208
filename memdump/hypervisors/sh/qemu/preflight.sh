# $1 = qmp_dir, $2 = VM name, $3 = allowed QEMU binaries. The client's preflight: peer,
# QEMU's uid, the replies to its PREFLIGHT commands, the userfaultfd sysctl. Changes
# nothing.
memdump_socket "$1" "$2"
(memdump_qmp preflight "$s" "$3" "$sysctl")
