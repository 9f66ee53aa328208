# The proxmox driver's part of every script that names a VM (after lib.sh): $1 = the qm
# command, $2 = vmid, checked here again (it reaches a command line on the node).
case $2 in
  [1-9][0-9][0-9]|[1-9][0-9][0-9][0-9]*) ;;
  *) echo "memdump: bad vmid" >&2; exit "$EXIT_BAD_ARGUMENT" ;;
esac
case $2 in *[!0-9]*) echo "memdump: bad vmid" >&2; exit "$EXIT_BAD_ARGUMENT" ;; esac
