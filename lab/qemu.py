#!/usr/bin/env python3
"""Plain QEMU VMs for the memdump lab: QEMU processes that libvirt does not manage,
each with a QMP socket (for memdump's ``qemu`` driver). Same seeded RAM (lab/image.py)
and halt BIOS as the libvirt VMs, so their dumps can be checked byte for byte.

Usage: qemu.py up --state STATE --name NAME --mib MIB --images DIR --bios BIOS --accel kvm|tcg
       qemu.py down --state STATE (--all | NAME...)
       qemu.py up ... --vmid VMID          # a VM of the qm stand-in (lab/qm.py)
       qemu.py up ... --runas UID:GID      # QEMU drops to this uid/gid once started
       qemu.py up ... --counter            # --bios is lab/counter.py's: layout.json says so
       qemu.py list --state STATE          # "NAME STATUS PID MIB" per lab QEMU VM
       qemu.py qmp SOCKET COMMAND [ARGS_JSON]   # one QMP command, prints the reply

Files, in <state>/run/qemu (the qmp_dir of the lab's qemu hypervisor): NAME.qmp (QMP
socket), NAME.pid (QEMU's -pidfile), NAME.log (QEMU's stderr); <state>/vms/NAME/:
layout.json (lab/image.py) and qemu.argv.json (the command line). A VM of the qm
stand-in (``--vmid``) lives where Proxmox keeps one: <state>/run/qemu-server/VMID.qmp
(.pid, .log) and its config in <state>/pve/qemu-server/VMID.conf. A process is only
ever signalled if it is a qemu-system-x86_64 whose command line names that pidfile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image  # noqa: E402

QEMU = "/usr/bin/qemu-system-x86_64"
SUN_PATH_MAX = 107


def qmp_dir(state: Path, pve: bool = False) -> Path:
    """Plain QEMU VMs: <state>/run/qemu/NAME.*; the qm stand-in's (lab/qm.py) VMs, as
    Proxmox lays them out: <state>/run/qemu-server/VMID.*."""
    return state / "run" / ("qemu-server" if pve else "qemu")


def pve_conf_dir(state: Path) -> Path:
    return state / "pve" / "qemu-server"


def qmp(sock: Path, command: str, args: dict | None = None, timeout: float = 30.0) -> dict:
    """One QMP command on a fresh connection; returns the reply ("return" or "error")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        f = s.makefile("rwb")

        def reply() -> dict:
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError(f"{sock}: QMP connection closed")
                doc = json.loads(line)
                if "return" in doc or "error" in doc:
                    return doc

        greeting = json.loads(f.readline())
        if "QMP" not in greeting:
            raise ConnectionError(f"{sock}: not a QMP greeting: {greeting}")
        f.write(b'{"execute":"qmp_capabilities"}\n')
        f.flush()
        reply()
        cmd: dict = {"execute": command}
        if args:
            cmd["arguments"] = args
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        return reply()


def is_lab_qemu(pid: int, pidfile: Path) -> bool:
    """pid is alive (not a zombie), is QEMU and was started with this pidfile."""
    try:
        if os.readlink(f"/proc/{pid}/exe") != QEMU:
            return False
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return str(pidfile).encode() in argv


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_pid(d: Path, stem: str) -> int | None:
    pidfile = d / f"{stem}.pid"
    pid = read_pid(pidfile)
    return pid if pid is not None and is_lab_qemu(pid, pidfile) else None


def vm_uuid(name: str) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"memdump-lab-qemu:{name}".encode()).digest()[:16]))


def argv_for(
    layout: dict, d: Path, stem: str, bios: str, accel: str, runas: str | None = None
) -> list[str]:
    name = layout["name"]
    argv = [
        QEMU,
        "-name", name,
        "-uuid", vm_uuid(name),
        "-machine", f"pc,accel={accel}",
        "-m", str(layout["memory_bytes"] >> 20),
        "-smp", "1",
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-bios", bios,
    ]  # fmt: skip
    for r in layout["regions"]:
        f = r["file"].replace(",", ",,")
        argv += ["-device", f"loader,file={f},addr={r['addr']:#x},force-raw=on"]
    argv += [
        "-qmp", f"unix:{d / (stem + '.qmp')},server=on,wait=off",
        "-pidfile", str(d / f"{stem}.pid"),
        "-daemonize",
    ]  # fmt: skip
    if runas:
        # As QEMU runs in production (libvirt's libvirt-qemu): its files (QMP socket,
        # pidfile, /dev/kvm) are opened as root, then it drops to this uid:gid. It can
        # then open none of root's private files: a dump must reach it as a descriptor.
        argv += ["-runas", runas]
    return argv


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name) or ".." in name:
        raise SystemExit(f"lab: bad VM name {name!r}")
    return name


def stop(d: Path, stem: str) -> bool:
    check_name(stem)
    name = stem
    pidfile = d / f"{stem}.pid"
    pid = read_pid(pidfile)
    stopped = False
    if pid is not None and is_lab_qemu(pid, pidfile):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not is_lab_qemu(pid, pidfile):
                break
            time.sleep(0.1)
        else:
            print(f"lab: qemu {name} ({pid}) ignored SIGTERM, killing", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not is_lab_qemu(pid, pidfile):
                    break
                time.sleep(0.1)
        stopped = True
    for suffix in (".pid", ".qmp"):
        (d / f"{stem}{suffix}").unlink(missing_ok=True)
    if d.name == "qemu-server":
        (pve_conf_dir(d.parent.parent) / f"{stem}.conf").unlink(missing_ok=True)
    return stopped


def wait_qmp(sock: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return qmp(sock, "query-status", timeout=5.0)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def pve_name(state: Path, vmid: str) -> str:
    """The name: of a qm stand-in VM's config (the vmid if it has none)."""
    try:
        text = (pve_conf_dir(state) / f"{vmid}.conf").read_text()
    except OSError:
        return vmid
    m = re.search(r"^name: (\S+)$", text, re.M)
    return m.group(1) if m else vmid


def write_pve_conf(state: Path, vmid: str, name: str, mib: int) -> None:
    """What Proxmox keeps in /etc/pve/qemu-server/VMID.conf, for the keys qm prints."""
    d = pve_conf_dir(state)
    d.mkdir(parents=True, exist_ok=True)
    conf = (
        f"bios: seabios\ncores: 1\nmemory: {mib}\nname: {name}\nostype: other\n"
        f"smbios1: uuid={vm_uuid(name)}\n"
    )
    (d / f"{vmid}.conf").write_text(conf)


def up(
    state: Path,
    name: str,
    mib: int,
    images: Path,
    bios: str,
    accel: str,
    vmid: str | None = None,
    runas: str | None = None,
    counter: bool = False,
    sparse: bool = False,
) -> str:
    check_name(name)
    if runas is not None and not re.fullmatch(r"[0-9]{1,9}:[0-9]{1,9}", runas):
        raise SystemExit(f"lab: bad --runas {runas!r} (UID:GID)")
    if vmid is not None and not re.fullmatch(r"[1-9][0-9]{2,8}", vmid):
        raise SystemExit(f"lab: bad Proxmox vmid {vmid!r} (100-999999999)")
    d = qmp_dir(state, pve=vmid is not None)
    stem = vmid or name
    d.mkdir(parents=True, exist_ok=True)
    sock = d / f"{stem}.qmp"
    if len(str(sock).encode()) > SUN_PATH_MAX:
        raise SystemExit(f"lab: QMP socket path too long for a unix socket: {sock}")
    vmdir = state / "vms" / name
    layout = image.generate(
        name, mib * image.MiB, image.seed_for(name), vmdir, images, counter=counter, sparse=sparse
    )
    argv = argv_for(layout, d, stem, bios, accel, runas)
    (vmdir / "qemu.argv.json").write_text(json.dumps(argv, indent=1) + "\n")
    if vmid is not None:
        write_pve_conf(state, vmid, name, mib)
    return launch(d, stem, name, argv)


def launch(d: Path, stem: str, name: str, argv: list[str]) -> str:
    """QEMU ``argv`` for guest ``name`` (files ``d/stem.*``): the one running with the
    same command line is kept (resumed if paused), one with another is restarted."""
    sock = d / f"{stem}.qmp"
    pid = running_pid(d, stem)
    if pid is not None:
        have = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        if [a.decode() for a in have] == argv:
            st = wait_qmp(sock)["return"]["status"]
            if st == "paused":
                qmp(sock, "cont")
            return f"reused pid {pid}"
        print(f"lab: qemu {name}: command line changed, restarting", file=sys.stderr)
        stop(d, stem)
    for suffix in (".pid", ".qmp"):
        (d / f"{stem}{suffix}").unlink(missing_ok=True)
    log = d / f"{stem}.log"
    with open(log, "wb") as err:
        proc = subprocess.run(  # noqa: S603 - fixed argv
            argv,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            timeout=300,
            check=False,
        )
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace"))
        raise SystemExit(f"lab: qemu {name} did not start (exit {proc.returncode}); see {log}")
    wait_qmp(sock)
    return f"started pid {running_pid(d, stem)}"


def listing(d: Path) -> list[tuple[str, str, str, str]]:
    """(stem, status, pid, MiB) of every lab QEMU VM in d."""
    out = []
    for pidfile in sorted(d.glob("*.pid")) if d.is_dir() else []:
        name = pidfile.name[: -len(".pid")]
        pid = running_pid(d, name)
        status, mib = "stopped", "?"
        if pid is not None:
            try:
                status = qmp(d / f"{name}.qmp", "query-status", timeout=5.0)["return"]["status"]
                mem = qmp(d / f"{name}.qmp", "query-memory-size-summary", timeout=5.0)
                mib = str(mem["return"]["base-memory"] >> 20)
            except (OSError, ValueError, KeyError):
                status = "no-qmp"
        out.append((name, status, str(pid or "-"), mib))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--mib", type=int, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--bios", required=True)
    p.add_argument("--accel", choices=("kvm", "tcg"), required=True)
    p.add_argument("--vmid", help="a VM of the qm stand-in (lab/qm.py), by this vmid")
    p.add_argument("--runas", help="UID:GID QEMU drops to once started (QEMU's -runas)")
    p.add_argument("--counter", action="store_true", help="--bios is lab/counter.py's BIOS")
    p.add_argument("--sparse", action="store_true", help="zero RAM but for the markers")
    p = sub.add_parser("down")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--all", action="store_true")
    p.add_argument("names", nargs="*")
    p = sub.add_parser("list")
    p.add_argument("--state", type=Path, required=True)
    p = sub.add_parser("qmp")
    p.add_argument("socket", type=Path)
    p.add_argument("command")
    p.add_argument("args", nargs="?")
    a = ap.parse_args(argv)
    if a.cmd == "up":
        state = a.state.resolve()
        images = a.images.resolve()
        print(
            up(state, a.name, a.mib, images, a.bios, a.accel, a.vmid, a.runas, a.counter, a.sparse)
        )
    elif a.cmd == "down":
        state = a.state.resolve()
        for pve in (False, True):
            d = qmp_dir(state, pve)
            stems = sorted(p.name[: -len(".pid")] for p in d.glob("*.pid")) if d.is_dir() else []
            by_name = {pve_name(state, s) if pve else s: s for s in stems}
            for name in by_name if a.all else a.names:
                if name in by_name and stop(d, by_name[name]):
                    print(f"lab: stopped qemu {name}", file=sys.stderr)
    elif a.cmd == "list":
        state = a.state.resolve()
        for row in listing(qmp_dir(state)):
            print(" ".join(row))
        for vmid, *rest in listing(qmp_dir(state, pve=True)):
            print(" ".join((f"{pve_name(state, vmid)}(qm:{vmid})", *rest)))
    else:
        print(json.dumps(qmp(a.socket, a.command, json.loads(a.args) if a.args else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
