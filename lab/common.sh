# Shared by lab/up and lab/down (sourced, not executed).
# shellcheck shell=bash

# Variables here are used by the scripts that source this file.
# shellcheck disable=SC2034
LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAB_SRC")
LAB_URI=qemu:///system
LAB_SSH_PORT=${MEMDUMP_LAB_SSH_PORT:-22022}
# Namespace of the <metadata> element domain.py puts in every lab domain.
LAB_NS=urn:memdump:lab
# shellcheck disable=SC2034
# Daemons must see neither the caller's venv nor its MEMDUMP_* settings.
DAEMON_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)

log() { printf 'lab: %s\n' "$*" >&2; }
die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }

lab_state_dir() {
    local dir=${MEMDUMP_LAB_DIR:-$REPO_ROOT/.lab}
    mkdir -p "$dir"
    (cd "$dir" && pwd)
}

lab_python() {
    if [[ -x /usr/bin/python3 ]]; then echo /usr/bin/python3; else command -v python3; fi
}

virsh_() { virsh -q -c "$LAB_URI" "$@"; }

# pid_is PID COMM: the PID is alive and still the program we think it is
# (PIDs get reused; never signal a stranger).
pid_is() {
    local pid=$1 comm=$2 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    # A zombie (exited, not yet reaped) still shows its comm.
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

read_pid() { if [[ -r $1 ]]; then tr -dc '0-9' <"$1"; fi; }

# stop_pid PID COMM: SIGTERM, bounded wait, then SIGKILL.
stop_pid() {
    local pid=$1 comm=$2 i
    pid_is "$pid" "$comm" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_is "$pid" "$comm" || return 0
        sleep 0.1
    done
    log "$comm ($pid) ignored SIGTERM, killing"
    kill -KILL "$pid" 2>/dev/null || true
}

# lab_domain_state NAME -> prints the state dir recorded in the domain's lab
# metadata; fails if the domain does not exist or is not a lab domain.
lab_domain_state() {
    local xml
    xml=$(virsh_ dumpxml "$1" 2>/dev/null) || return 1
    grep -q "$LAB_NS" <<<"$xml" || return 1
    sed -n "s/.*<lab:vm [^>]*state=[\"']\([^\"']*\)[\"'].*/\1/p" <<<"$xml" | head -n1
}

# Serialise concurrent lab/up / lab/down runs on the same state dir.
# fd 9 must not leak into daemons we start, or they would hold the lock forever.
lab_lock() {
    exec 9>"$1/.lock"
    flock -w 600 9 || die "timed out waiting for lock $1/.lock"
}
