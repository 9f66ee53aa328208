# $1 = qm, $2 = vmid. Sections: the config exactly as qm printed it, the verbose status,
# and, for a running VM, QEMU's version and memory from its monitor; then the host name.
"$1" config "$2" >/dev/null 2>&1 || { "$1" config "$2" >&2; exit "$EXIT_NO_VM"; }
echo "==memdump-config=="
"$1" config "$2" || exit "$EXIT_QM_FAILED"
echo "==memdump-status=="
"$1" status "$2" --verbose || exit "$EXIT_QM_FAILED"
echo "==memdump-monitor=="
printf 'info version\ninfo memory_size_summary\n' | "$1" monitor "$2" 2>&1
echo "==memdump-pveversion=="
if command -v pveversion >/dev/null 2>&1; then pveversion 2>/dev/null; fi
echo "==memdump-host=="
uname -n
exit 0
