# $1 = allowed QEMU binaries. Before the temp dirs are cleaned: for each live script's
# directory in the run directory whose lock is free (the script is gone), the QMP client
# repairs its QEMU (same pid, only if background-snapshot is still on: cancel, turn it
# off), then any userfaultfd window left open is closed (its lock free).
command -v flock >/dev/null 2>&1 || exit 0
run=${MEMDUMP_RUN_DIR:-@RUN_DIR@}
[ -d "$run" ] && [ ! -L "$run" ] && [ -O "$run" ] || exit 0
bins=$1
for d in "$run"/memdump.??????????; do
  got=$(
    memdump_enter "$d" || exit 1
    [ -f qmp ] && [ ! -L qmp ] && [ -f lock ] && [ ! -L lock ] || exit 1
    flock -n lock true || exit 1
    IFS= read -r sock <qmp || exit 1
    memdump_live_notes reply
    printf '%s %s %s %s\n' "$pid" "${bw0:--}" "${bw1:--}" "$sock"
  ) || continue
  pid=${got%% *} got=${got#* }
  bw0=${got%% *} got=${got#* }
  bw1=${got%% *} sock=${got#* }
  case $bw0$bw1 in *[!0-9]*) bw0='' bw1='' ;; esac
  case $pid in ''|*[!0-9]*) continue ;; esac
  case $sock in /*) ;; *) continue ;; esac
  if ! plain "$sock" || [ ! -S "$sock" ]; then continue; fi
  (memdump_qmp repair "$sock" "$bins" "$pid" "$d/mem" "$bw0" "$bw1")
done
(memdump_qmp uffd-restore "$run" "$sysctl")
exit 0
