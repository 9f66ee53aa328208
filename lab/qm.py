#!/usr/bin/env python3
"""The lab's stand-in for Proxmox VE's ``qm`` (NOT Proxmox): it serves the subcommands
memdump's proxmox driver uses, over real QEMU processes the lab started the way Proxmox
lays them out (lab/qemu.py --vmid: config in <state>/pve/qemu-server/VMID.conf, QMP
socket <state>/run/qemu-server/VMID.qmp).

    qm list [--full]              the table qm prints (names cut to 20 characters)
    qm config VMID [--current]    the VM's config, "key: value" sorted by key
    qm status VMID [--verbose]    "status: running|stopped" (+ pid, qmpstatus, versions)
    qm monitor VMID               reads HMP commands from stdin, one per line, and runs
                                  each with QMP human-monitor-command, as qm does; prints
                                  the banner, a "qm> " prompt before each, and "ERROR: ..."
                                  for a command it could not run

Output formats, messages and exit codes follow qm's (a missing VM: "Configuration file
'nodes/<node>/qemu-server/VMID.conf' does not exist", exit 2). lab/up writes
<state>/bin/qm, which runs this with --state.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qemu  # noqa: E402

NODE = socket.gethostname().split(".")[0]


def die(msg: str, code: int = 2) -> int:
    print(msg, file=sys.stderr)
    return code


def conf_path(state: Path, vmid: str) -> Path:
    return qemu.pve_conf_dir(state) / f"{vmid}.conf"


def read_conf(state: Path, vmid: str) -> dict[str, str] | None:
    if not re.fullmatch(r"[1-9][0-9]{2,8}", vmid):
        return None
    try:
        text = conf_path(state, vmid).read_text()
    except OSError:
        return None
    conf = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            conf[key] = value
    return conf


def missing(vmid: str) -> int:
    return die(f"Configuration file 'nodes/{NODE}/qemu-server/{vmid}.conf' does not exist")


def pid_of(state: Path, vmid: str) -> int | None:
    return qemu.running_pid(qemu.qmp_dir(state, pve=True), vmid)


def sock(state: Path, vmid: str) -> Path:
    return qemu.qmp_dir(state, pve=True) / f"{vmid}.qmp"


def cmd_list(state: Path) -> int:
    print(
        f"{'VMID':>10} {'NAME':<20} {'STATUS':<10} {'MEM(MB)':<10} {'BOOTDISK(GB)':>12} {'PID':<10}"
    )
    d = qemu.pve_conf_dir(state)
    vmids = sorted((p.stem for p in d.glob("*.conf")), key=int) if d.is_dir() else []
    for vmid in vmids:
        conf = read_conf(state, vmid) or {}
        pid = pid_of(state, vmid)
        status = "running" if pid else "stopped"
        name = conf.get("name", f"VM {vmid}")[:20]
        mem = conf.get("memory", "512")
        print(f"{vmid:>10} {name:<20} {status:<10} {mem:<10} {0:>12.2f} {pid or 0:<10}")
    return 0


def cmd_config(state: Path, vmid: str) -> int:
    conf = read_conf(state, vmid)
    if conf is None:
        return missing(vmid)
    for key in sorted(conf):
        print(f"{key}: {conf[key]}")
    return 0


def cmd_status(state: Path, vmid: str, verbose: bool) -> int:
    conf = read_conf(state, vmid)
    if conf is None:
        return missing(vmid)
    pid = pid_of(state, vmid)
    st: dict[str, str] = {"status": "running" if pid else "stopped"}
    if verbose:
        st.update(vmid=vmid, name=conf.get("name", ""), cpus=conf.get("cores", "1"))
        st["maxmem"] = str(int(conf.get("memory", "512")) << 20)
        if pid:
            st["pid"] = str(pid)
            try:
                st["qmpstatus"] = qemu.qmp(sock(state, vmid), "query-status", timeout=5)["return"][
                    "status"
                ]
                v = qemu.qmp(sock(state, vmid), "query-version", timeout=5)["return"]["qemu"]
                st["running-qemu"] = f"{v['major']}.{v['minor']}.{v['micro']}"
            except (OSError, ValueError, KeyError):
                pass
    keys = sorted(st) if verbose else ["status"]
    for key in keys:
        print(f"{key}: {st[key]}")
    return 0


def cmd_monitor(state: Path, vmid: str) -> int:
    if read_conf(state, vmid) is None:
        return missing(vmid)
    if not pid_of(state, vmid):
        return die(f"VM {vmid} not running")
    print(f"Entering QEMU Monitor for VM {vmid} - type 'help' for help")
    while True:
        sys.stdout.write("qm> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line == "quit":
            break
        if not line:
            continue
        try:
            res = qemu.qmp(
                sock(state, vmid), "human-monitor-command", {"command-line": line}, timeout=600
            )
        except (OSError, ValueError) as exc:
            print(f"ERROR: {exc}")
            continue
        if "error" in res:
            print(f"ERROR: {res['error'].get('desc', res['error'])}")
        else:
            print(str(res.get("return", "")).rstrip("\n"))
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qm", description=__doc__.splitlines()[0])
    ap.add_argument("--state", type=Path, required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list")
    p.add_argument("--full", action="store_true")
    p = sub.add_parser("config")
    p.add_argument("vmid")
    p.add_argument("--current", action="store_true")
    p = sub.add_parser("status")
    p.add_argument("vmid")
    p.add_argument("--verbose", action="store_true")
    p = sub.add_parser("monitor")
    p.add_argument("vmid")
    a = ap.parse_args(argv)
    state = a.state.resolve()
    if a.cmd == "list":
        return cmd_list(state)
    if a.cmd == "config":
        return cmd_config(state, a.vmid)
    if a.cmd == "status":
        return cmd_status(state, a.vmid, a.verbose)
    return cmd_monitor(state, a.vmid)


if __name__ == "__main__":
    sys.exit(main())
