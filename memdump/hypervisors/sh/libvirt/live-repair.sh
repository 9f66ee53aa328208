# $1 = URI. For the live scripts killed outright (their directory in the run directory
# still says "live", its lock is free) and whose domain no live script holds: waits (up
# to ~60 s) for a migration still draining, unless libvirt has a job of its own on the
# domain, then puts the VM's max-bandwidth back (from the directory's "bandwidth" file,
# if the script's value is still in force), turns background-snapshot off and closes a
# "memdump" fd left in QEMU, and removes the directory. Prints "live-repaired DOMAIN"
# and the directory for each. (Each directory is looked at in a subshell: it exits 1
# where it leaves the directory alone, 0 once it repaired it and emptied it.)
uri=$1
run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
[ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ] || exit 0
command -v flock >/dev/null 2>&1 || exit 0
for d in "$run"/memdump.??????????; do
  (
    memdump_enter "$d" || exit 1
    [ -f live ] && [ ! -L live ] || exit 1
    [ -f lock ] && [ ! -L lock ] && flock -n lock true || exit 1
    IFS= read -r dom <live || exit 1
    case $dom in ''|[!A-Za-z0-9]*|*[!A-Za-z0-9._-]*|*..*) exit 1 ;; esac
    exec 5>"$run/live.$dom.lock" || exit 1
    flock -n 5 || exit 1
    mon() { virsh -c "$uri" qemu-monitor-command "$dom" "$1" 2>/dev/null 5>&-; }
    job=$(virsh -c "$uri" domjobinfo "$dom" 2>/dev/null 5>&- | sed -n 's/^Job type: *//p')
    i=0
    while [ "$i" -lt 300 ]; do
      case $(mon '{"execute":"query-migrate"}') in
        *'"status":"setup"'*|*'"status":"active"'*|*'"status":"device"'*) ;;
        *'"status":"cancelling"'*|*'"status":"pre-switchover"'*) ;;
        *) break ;;
      esac
      [ "$job" = None ] || exit 1
      i=$((i + 1))
      sleep 0.2
    done
    [ "$i" -lt 300 ] || exit 1
    bw0='' bw1=''
    if [ -f bandwidth ] && [ ! -L bandwidth ]; then read -r bw0 bw1 <bandwidth; fi
    case $bw0$bw1 in *[!0-9]*) bw0='' bw1='' ;; esac
    if [ -n "$bw0" ] && [ -n "$bw1" ] && [ "$bw0" != "$bw1" ]; then
      case $(mon '{"execute":"query-migrate-parameters"}') in
        *"\"max-bandwidth\":$bw1,"*|*"\"max-bandwidth\":$bw1}"*)
          mon '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":'"$bw0"'}}' \
            >/dev/null ;;
      esac
    fi
    mon '{"execute":"migrate-set-capabilities","arguments":{"capabilities":'\
'[{"capability":"background-snapshot","state":false}]}}' >/dev/null
    mon '{"execute":"closefd","arguments":{"fdname":"memdump"}}' >/dev/null
    echo "live-repaired $dom"
    # Its script is dead (the lock, held from before "live" was written, is free): the
    # directory goes now, entries relative to it, then the name (rmdir).
    rm -rf ./* ./.[!.]* ./..?* 2>/dev/null
    exit 0
  ) || continue
  rmdir "$d" 2>/dev/null && echo "$d"
done
exit 0
