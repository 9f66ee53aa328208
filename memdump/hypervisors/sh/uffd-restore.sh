# No arguments. Puts back vm.unprivileged_userfaultfd from RUN/userfaultfd.restore when
# a window (memdump_uffd_open) was left open by a script killed outright (the window's
# lock is free), in the root-only run directory only; prints "userfaultfd-restored
# VALUE" if it did.
sysctl=${MEMDUMP_UFFD_SYSCTL:-/proc/sys/vm/unprivileged_userfaultfd}
run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
[ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ] || exit 0
command -v flock >/dev/null 2>&1 || exit 0
[ -e "$run/userfaultfd.restore" ] || exit 0
exec 6>"$run/userfaultfd.lock" || exit 0
flock -n 6 || exit 0
[ -f "$run/userfaultfd.restore" ] && [ ! -L "$run/userfaultfd.restore" ] || exit 0
IFS= read -r o <"$run/userfaultfd.restore"
case $o in
  0|1) ;;
  *) echo "memdump: $run/userfaultfd.restore holds no sysctl value" >&2; exit 1 ;;
esac
echo "$o" >"$sysctl" || exit 1
rm -f "$run/userfaultfd.restore"
echo "userfaultfd-restored $o"
exit 0
