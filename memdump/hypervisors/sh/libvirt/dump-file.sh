# $1 = URI, $2 = domain, $3 = directory for the temp dir ("" = ${TMPDIR:-/tmp}: a whole
# memory image does not belong in the RAM-backed run directory), $4 = space margin in
# thousandths; stdin: the token (memdump_start; abort-file.sh checks it). Staged: QEMU
# first writes the whole dump into "$d/mem", a 0600 regular file, so the guest is paused
# only for that local write (t0..t1), and the file is streamed afterwards. Before
# anything pauses the guest, the free space there must cover the domain's memory x the
# margin (else EXIT_NO_SPACE with a memdump-insufficient-space line). "$d/dumping" is
# there while the dump may start or run, "$d/cancel" (from abort-file.sh) stops one that
# has not started: each side makes its mark before it looks for the other's, so either
# the dump never starts or the abort sees it and keeps asking libvirt to abort it.
case $4 in
  ''|*[!0-9]*) echo "memdump: bad space margin" >&2; exit "$EXIT_BAD_ARGUMENT" ;;
esac
memdump_start "${3:-${TMPDIR:-/tmp}}"
kib=$(virsh -c "$1" dominfo "$2" 2>"$d/err" | sed -n 's/^Max memory: *\([0-9]*\) KiB$/\1/p')
if [ -z "$kib" ]; then
  cat "$d/err" >&2
  printf 'memdump: cannot read the memory size of domain %s\n' "$2" >&2
  exit "$EXIT_NO_MEMORY_SIZE"
fi
blocks=$(stat -f -c %a "$d" 2>/dev/null)
bsize=$(stat -f -c %S "$d" 2>/dev/null)
case $blocks$bsize in
  ''|*[!0-9]*)
    kfree=$(df -P -k "$d" | awk 'NR == 2 { print $4 }')
    case $kfree in
      ''|*[!0-9]*)
        printf 'memdump: cannot read the free space in %s\n' "${d%/*}" >&2
        exit "$EXIT_NO_FREE_SPACE" ;;
    esac
    free=$((kfree * 1024)) ;;
  *) free=$((blocks * bsize)) ;;
esac
need=$((kib * 1024 * $4 / 1000))
if [ "$free" -lt "$need" ]; then
  printf 'memdump-insufficient-space %s %s %s %s\n' "$free" "$need" "$((kib * 1024))" "${d%/*}" >&2
  exit "$EXIT_NO_SPACE"
fi
: >"$d/mem" || exit "$EXIT_TEMP_FILE"
: >"$d/dumping" || exit "$EXIT_TEMP_FILE"
if [ -e "$d/cancel" ]; then
  echo "memdump: dump cancelled before it started" >&2
  exit "$EXIT_CANCELLED"
fi
t0=$(date +%s.%N)
virsh -c "$1" dump --memory-only --format elf "$2" "$d/mem" >/dev/null 2>"$d/err" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
wait "$reader"
rc=$?
reader=
t1=$(date +%s.%N)
rm -f "$d/dumping"
cat "$d/err" >&2
memdump_pause_window "$t0" "$t1"
[ "$rc" -eq 0 ] || exit "$rc"
cat "$d/mem" 8>&- &
reader=$!
echo "$reader" >"$d/reader"
wait "$reader"
rrc=$?
reader=
memdump_exit 0 "$rrc"
