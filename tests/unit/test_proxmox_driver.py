"""The Proxmox driver's node-side scripts, run through the local transport (a real sh,
mkfifo, cat) against a fake ``qm``: parsing of qm's output, lookups, and the detached
HMP dump into the FIFO (completed, refused, failed midway, aborted)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from memdump.errors import ConfigError, DumpFailedError, InvalidIdentifierError, VMNotFoundError
from memdump.hypervisors import open_driver
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.proxmox import ProxmoxDriver
from memdump.pipeline import write_dump
from memdump.settings import HypervisorConfig, Settings
from memdump.transport.local import LocalTransport
from tests.helpers.elfgen import make_core
from tests.helpers.hv_tempdirs import (
    TARGET_BYTES,
    TOKEN,
    Recording,
    make_target,
    plant,
    state,
    watched,
)

# A fake qm: VMs from $FAKE_QM/vms.json, one line per call in $FAKE_QM/log. `monitor`
# answers "dump-guest-memory -d PATH" as QEMU does with detach: it opens PATH (the FIFO)
# before it answers, then a child writes the core ($FAKE_QM/core) and records the
# result (Status: completed / failed) before it closes the file. $FAKE_QM/mode: ok,
# refuse (an HMP error), fail (half the core, then "failed"), slow (writes for 30 s).
FAKE_QM = r"""#!/usr/bin/env python3
import json, os, sys, time
from pathlib import Path
d = Path(os.environ["FAKE_QM"])
vms = json.loads((d / "vms.json").read_text())
with open(d / "log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
cmd, args = sys.argv[1], sys.argv[2:]
def missing(vmid):
    print(f"Configuration file 'nodes/pve/qemu-server/{vmid}.conf' does not exist", file=sys.stderr)
    sys.exit(2)
if cmd == "list":
    print(f"{'VMID':>10} {'NAME':<20} {'STATUS':<10} {'MEM(MB)':<10} "
          f"{'BOOTDISK(GB)':>12} {'PID':<10}")
    for vmid, vm in sorted(vms.items()):
        pid = 4000 + int(vmid) if vm["status"] == "running" else 0
        print(f"{vmid:>10} {vm['name'][:20]:<20} {vm['status']:<10} {1:<10} {0:>12.2f} {pid:<10}")
    sys.exit(0)
vmid = args[0]
vm = vms.get(vmid) or missing(vmid)
if cmd == "config":
    print(f"memory: 1\nname: {vm['name']}\nsmbios1: uuid={vm['uuid']},manufacturer=x\n", end="")
elif cmd == "status":
    print(f"cpus: 1\n  nested: 1\nname: {vm['name']}\npid: {4000 + int(vmid)}\n"
          f"qmpstatus: {vm.get('qmpstatus', 'running')}\nstatus: {vm['status']}\n", end="")
elif cmd == "monitor":
    if vm["status"] != "running":
        print(f"VM {vmid} not running", file=sys.stderr)
        sys.exit(2)
    print(f"Entering QEMU Monitor for VM {vmid} - type 'help' for help")
    mode = (d / "mode").read_text().strip()
    for line in sys.stdin:
        sys.stdout.write("qm> ")
        line = line.strip()
        if line == "info version":
            print("7.2.11pve-qemu-kvm")
        elif line == "info memory_size_summary":
            print("base memory: 1048576\nplugged memory: 0")
        elif line == "info dump":
            print("Status: " + ((d / "status").read_text() if (d / "status").exists() else "none"))
        elif line.startswith("dump-guest-memory -d "):
            path = line.split()[-1]
            if mode == "refuse":
                print("Error: dump: there is a dump in progress")
                continue
            st = os.stat(path)
            (d / "fifo").write_text(f"{path} {oct(st.st_mode)}\n")
            fd = os.open(path, os.O_WRONLY)
            (d / "status").write_text("active")
            if os.fork() == 0:
                os.setsid()  # QEMU's dump thread is no child of the script's session
                core = (d / "core").read_bytes()
                result = "completed"
                try:
                    if mode == "fail":
                        os.write(fd, core[: len(core) // 2])
                        result = "failed"
                    elif mode == "slow":
                        for _ in range(300):
                            os.write(fd, core[:4096])
                            time.sleep(0.1)
                    else:
                        view = memoryview(core)
                        while view:
                            view = view[os.write(fd, view):]
                except OSError as exc:
                    result = "failed"
                    (d / "write-error").write_text(str(exc))
                (d / "status").write_text(result)
                os.close(fd)
                os._exit(0)
            os.close(fd)
            print("")
        else:
            print(f"unknown command: '{line}'")
    print()
"""

UUID = "6f1c2a4e-0000-4000-8000-00000000abcd"
LONG = "a-rather-long-vm-name-over-20"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="mdp", dir="/tmp"))
    (base / "tmp").mkdir()
    qm = base / "qm"
    qm.write_text(FAKE_QM)
    qm.chmod(0o755)
    vms = {
        "101": {"name": "vm-web", "status": "running", "uuid": UUID},
        "102": {"name": LONG, "status": "running", "uuid": UUID},
        "103": {"name": "vm-off", "status": "stopped", "uuid": UUID},
        "104": {"name": "twin", "status": "running", "uuid": UUID},
        "105": {"name": "twin", "status": "running", "uuid": UUID, "qmpstatus": "paused"},
    }
    (base / "vms.json").write_text(json.dumps(vms))
    (base / "mode").write_text("ok")
    (base / "core").write_bytes(make_core([(0, os.urandom(300_000)), (1 << 20, bytes(3 << 20))]))
    monkeypatch.setenv("FAKE_QM", str(base))
    monkeypatch.setenv("TMPDIR", str(base / "tmp"))
    monkeypatch.setenv("MEMDUMP_RUN_DIR", str(base / "tmp"))  # the scripts' root-only base
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _driver(env: Path) -> ProxmoxDriver:
    hv = HypervisorConfig(
        name="pve", driver="proxmox", transport="local", qm_command=str(env / "qm")
    )
    return ProxmoxDriver(hv, LocalTransport(stall_timeout=20))


def _log(env: Path) -> list[str]:
    p = env / "log"
    return p.read_text().splitlines() if p.exists() else []


def _wait_empty(d: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(d.iterdir())


def test_settings_accept_proxmox_and_check_qm_command() -> None:
    hv = HypervisorConfig(name="pve", driver="proxmox", transport="local")
    assert hv.qm_command is None
    assert isinstance(open_driver(hv, Settings().ssh), ProxmoxDriver)
    for bad in ("qm", "/usr/sbin/qm; id", "/a/../b", "/a b"):
        with pytest.raises(ValidationError, match="qm_command"):
            HypervisorConfig(name="pve", driver="proxmox", qm_command=bad)


def test_lists_running_vms_with_full_names(env: Path) -> None:
    refs = _driver(env).list_vms()
    assert [(r.vmid, r.name) for r in refs] == [
        ("101", "vm-web"),
        ("102", LONG),  # qm list cuts it to 20 characters; the config has it whole
        ("104", "twin"),
        ("105", "twin"),
    ]
    assert all(r.hypervisor == "pve" for r in refs)


def test_resolve_by_vmid_and_name(env: Path) -> None:
    d = _driver(env)
    assert d.resolve("101") == VMRef("pve", "101", "vm-web")
    assert d.resolve("vm-web") == VMRef("pve", "101", "vm-web")
    assert d.resolve(LONG) == VMRef("pve", "102", LONG)
    assert d.resolve("103") == VMRef("pve", "103", "vm-off")  # stopped: found, not "all"
    with pytest.raises(VMNotFoundError, match=r"ambiguous: vmids 104, 105; use the vmid"):
        d.resolve("twin")
    for absent in ("199", "nope", LONG[:20], "99"):
        with pytest.raises(VMNotFoundError):
            d.resolve(absent)
    with pytest.raises(InvalidIdentifierError):
        d.resolve("101; reboot")
    assert not any("reboot" in line for line in _log(env))


def test_snapshot(env: Path) -> None:
    info = _driver(env).snapshot(VMRef("pve", "105", "twin"))
    cfg = f"memory: 1\nname: twin\nsmbios1: uuid={UUID},manufacturer=x\n"
    assert info.uuid == UUID
    assert info.domain_xml_sha256 == hashlib.sha256(cfg.encode()).hexdigest()
    assert info.state == "paused" and info.running
    assert info.domain_id == "4105"
    assert info.memory_bytes == 1 << 20  # QEMU's own number, from the monitor
    assert info.versions["hypervisor"] == "QEMU 7.2.11"
    assert info.hypervisor_host == os.uname().nodename
    with pytest.raises(VMNotFoundError):
        _driver(env).snapshot(VMRef("pve", "199", "x"))


def test_dump_streams_the_core_through_a_private_fifo(env: Path, tmp_path: Path) -> None:
    src = _driver(env).open_dump(VMRef("pve", "101", "vm-web"))
    res = write_dump(src, tmp_path, "a.mem.gz")
    core = (env / "core").read_bytes()
    assert res.raw_bytes == len(core) and res.raw_sha256 == hashlib.sha256(core).hexdigest()
    assert src.pause_window is not None and src.pause_window[0] <= src.pause_window[1]
    assert src.staging == "fifo" and "HMP dump-guest-memory -d" in src.dump_format
    path, mode = (env / "fifo").read_text().split()
    assert Path(path).name == "mem" and Path(path).parent.parent == env / "tmp"
    assert stat.S_ISFIFO(int(mode, 8)) and stat.S_IMODE(int(mode, 8)) == 0o600
    assert "monitor 101" in _log(env)
    assert _wait_empty(env / "tmp") == []


def test_refused_dump_fails_fast_and_frees_the_reader(env: Path, tmp_path: Path) -> None:
    (env / "mode").write_text("refuse")
    t0 = time.monotonic()
    with pytest.raises(
        DumpFailedError, match="(?s)refused the dump: Error: dump: there is a dump in progress"
    ):
        write_dump(_driver(env).open_dump(VMRef("pve", "101", "vm-web")), tmp_path, "a.gz")
    assert time.monotonic() - t0 < 10
    assert list(tmp_path.iterdir()) == []
    assert _wait_empty(env / "tmp") == []


def test_a_dump_qemu_reports_failed_is_never_complete(env: Path, tmp_path: Path) -> None:
    # Half the core arrives and the FIFO closes as at the end of a dump: only QEMU's
    # status says it failed, and that fails the capture.
    (env / "mode").write_text("fail")
    with pytest.raises(DumpFailedError) as ei:
        write_dump(_driver(env).open_dump(VMRef("pve", "101", "vm-web")), tmp_path, "a.gz")
    assert "failed" in str(ei.value)
    assert list(tmp_path.iterdir()) == []
    assert _wait_empty(env / "tmp") == []


def test_stopped_vm_and_bad_vmid(env: Path, tmp_path: Path) -> None:
    d = _driver(env)
    with pytest.raises(DumpFailedError, match="not running"):
        write_dump(d.open_dump(VMRef("pve", "103", "vm-off")), tmp_path, "a.gz")
    before = _log(env)
    with pytest.raises(VMNotFoundError):
        d.open_dump(VMRef("pve", "1$(id)", "x"))
    assert _log(env) == before  # nothing ran
    assert _wait_empty(env / "tmp") == []


def test_file_staging_is_refused(env: Path) -> None:
    with pytest.raises(ConfigError, match="only staging 'fifo'"):
        _driver(env).open_dump(VMRef("pve", "101", "vm-web"), staging="file")


def test_abort_mid_dump_breaks_qemus_writes(env: Path) -> None:
    (env / "mode").write_text("slow")
    src = _driver(env).open_dump(VMRef("pve", "101", "vm-web"))
    assert src.readinto(memoryview(bytearray(4096))) > 0
    src.abort()
    deadline = time.monotonic() + 10
    while not (env / "write-error").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pipe" in (env / "write-error").read_text().lower()
    assert _wait_empty(env / "tmp") == []


# -- issue 11 item 4: a local user's planted directory; the token on no command line ----------


def test_abort_leaves_a_planted_dir_alone_and_no_token_on_a_command_line(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local user read the token from /proc (old code) and planted memdump.0000000000
    # with it, its mem a symlink to someone's FIFO, in the scripts' base: the abort opens
    # the FIFO of the script's own directory only.
    monkeypatch.setattr(secrets, "token_hex", lambda n=32: TOKEN)
    (env / "mode").write_text("slow")
    target = make_target(tmp_path)
    t = Recording(LocalTransport(stall_timeout=20))
    hv = HypervisorConfig(
        name="pve", driver="proxmox", transport="local", qm_command=str(env / "qm")
    )
    with watched(tmp_path / "victim.fifo") as victim:
        planted = plant(env / "tmp", target, victim.path)
        before = state(planted)
        src = ProxmoxDriver(hv, t).open_dump(VMRef("pve", "101", "vm-web"))
        assert src.readinto(memoryview(bytearray(4096))) > 0
        src.abort()
        assert not victim.touched()
    assert target.read_bytes() == TARGET_BYTES and state(planted) == before
    deadline = time.monotonic() + 10
    while not (env / "write-error").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pipe" in (env / "write-error").read_text().lower()  # the real dump did stop
    assert [p.name for p in _wait_only(env / "tmp", planted)] == [planted.name]
    assert len(t.calls) == 2  # the dump, its abort
    for script, args, stdin in t.calls:
        assert TOKEN not in script and not any(TOKEN in a for a in args)
        assert stdin == f"{TOKEN}\n".encode()


def _wait_only(d: Path, keep: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while list(d.iterdir()) != [keep] and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(d.iterdir())
