# $1 = URI, $2 = domain, $3 = the hypervisor's live_userfaultfd. Changes nothing. Prints
# sections "memdump-section NAME LENGTH" + that many bytes + a newline; the collector
# parses and judges them (libvirt.judge_preflight). The monitor (which taints the
# domain) is asked only if the sections before it leave live capture possible.
sec() { printf 'memdump-section %s %s\n%s\n' "$1" "${#2}" "$2"; }
state=$(virsh -c "$1" domstate "$2" 2>&1)
sec state "$state"
sec libvirt "$(virsh -c "$1" version 2>&1)"
sec xml "$(virsh -c "$1" dumpxml "$2" 2>&1)"
tools=
for t in flock setsid; do command -v "$t" >/dev/null 2>&1 || tools="$tools $t"; done
sec missing "${tools# }"
pid=$(memdump_qemu_pid "$2") || pid=
sec pid "$pid"
st=
[ -n "$pid" ] && st=$(grep -E '^(Uid|CapEff):' "/proc/$pid/status" 2>/dev/null)
sec status "$st"
u=$(cat "${MEMDUMP_UFFD_SYSCTL:-/proc/sys/vm/unprivileged_userfaultfd}" 2>/dev/null)
sec uffd "$u"
[ "$state" = running ] && [ -n "$pid" ] && [ -z "$tools" ] || exit 0
cap=$(printf '%s\n' "$st" | sed -n 's/^CapEff:[[:space:]]*//p')
case $cap in ''|*[!0-9a-fA-F]*) exit 0 ;; esac
if [ $(( (0x$cap >> 19) & 1 )) -eq 0 ] && [ "$u" != 1 ] && [ "$3" != sysctl-window ]; then
  exit 0
fi
m() { virsh -c "$1" qemu-monitor-command "$2" "$3" 2>&1; }
sec version "$(m "$1" "$2" '{"execute":"query-version"}')"
sec migrate "$(m "$1" "$2" '{"execute":"query-migrate"}')"
sec caps "$(m "$1" "$2" '{"execute":"query-migrate-capabilities"}')"
sec mtree "$(virsh -c "$1" qemu-monitor-command "$2" --hmp 'info mtree -f' 2>&1)"
sec registers "$(virsh -c "$1" qemu-monitor-command "$2" --hmp 'info registers' 2>&1)"
exit 0
