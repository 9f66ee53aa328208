# $1 = minimum age in seconds, $2 = directory (default: the run directory and
# ${TMPDIR:-/tmp}). Prints each directory it removed. Each candidate is checked from the
# inside (memdump_enter); a directory whose lock a live script holds is left alone; its
# reader (a child blocked in open() on the FIFO) is killed; its entries are removed
# relative to it, then the emptied directory by name (rmdir: nothing else if the name
# now means something else).
command -v flock >/dev/null 2>&1 || exit 0
now=$(date +%s)
clean_in() {
  for d in "$1"/memdump.??????????; do
    (
      memdump_enter "$d" || exit 1
      age=$(( now - $(stat -c %Y .) ))
      [ "$age" -ge "$2" ] || exit 1
      if [ -e lock ] || [ -L lock ]; then
        [ -f lock ] && [ ! -L lock ] && flock -n lock true || exit 1
      fi
      memdump_kill_noted reader "$d"
      rm -rf ./* ./.[!.]* ./..?* 2>/dev/null
      exit 0
    ) || continue
    rmdir "$d" 2>/dev/null && echo "$d"
  done
}
if [ -n "$2" ]; then
  clean_in "$2" "$1"
else
  run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
  if [ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ]; then clean_in "$run" "$1"; fi
  clean_in "${TMPDIR:-/tmp}" "$1"
fi
exit 0
