"""Proxmox VE driver: VMs of one Proxmox node, through its ``qm`` command.

Discovery and metadata come from ``qm list`` (vmid, name, status), ``qm config <vmid>``
(name, smbios1 uuid; its exact output is hashed as the VM's definition) and ``qm status
<vmid> --verbose`` (QEMU's run state and pid). The dump goes through ``qm monitor
<vmid>`` (the VM's human monitor, HMP, which qm reaches over the VM's QMP socket):
``dump-guest-memory -d <fifo>`` into a private FIFO whose reader (``cat``) is started
first, as for the other drivers. ``-d`` (detach) because ``qm monitor`` gives an HMP
command a short timeout on some versions, and a dump takes as long as the guest's memory
does: QEMU opens the FIFO before it answers, then writes it from its dump thread, and
closes it when the dump is over (it has recorded the dump's result by then). So the
reader's end of file ends the pause; ``info dump`` then says whether the dump
``completed`` (anything else fails the capture, whatever arrived). HMP cannot cancel a
dump: aborting kills the reader, QEMU's next write fails and QEMU resumes the guest.

``qm`` needs root on the node (it is how Proxmox itself is driven), so the SSH user is
root there and QEMU (run as root by Proxmox) opens the FIFO as the same user.
``staging="file"`` is not supported (a ConfigError), for the same reason as the qemu
driver: a file-staged dump could not be stopped once QEMU writes it. A dump runs in its
own QEMU thread, so other ``qm`` commands keep working meanwhile.

Live capture (``mode="live"``): HMP cannot hand QEMU a file descriptor, and a path would
have QEMU open it, so the VM's QMP socket (``<qmp_dir>/<vmid>.qmp``, Proxmox's
``/var/run/qemu-server``) is spoken to directly with the qemu driver's QMP client and
scripts (memdump.hypervisors.qemu.QmpLive): the same preflight, peer check (an allowed
QEMU binary, and the pid ``qm status`` gives for the VM), background snapshot and
repairs. Proxmox runs QEMU as root: no userfaultfd window. (Proxmox's own ``qm snapshot
--vmstate`` is its savevm-async, not this.)
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from memdump.errors import (
    DumpFailedError,
    HypervisorError,
    InvalidIdentifierError,
    VMNotFoundError,
)
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.hypervisors.exitcodes import Exit
from memdump.hypervisors.fifo import TokenFifoDump, clean_stale, fifo_only
from memdump.hypervisors.qemu import QmpLive
from memdump.hypervisors.scripts import load
from memdump.identifiers import validate_id
from memdump.pipeline import DumpSource
from memdump.settings import DISK_SPACE_MARGIN, HypervisorConfig
from memdump.transport.base import CommandResult, Transport

Staging = Literal["fifo", "file"]

# Where Proxmox VE puts each VM's QMP socket, <vmid>.qmp (a hypervisor's qmp_dir moves it).
DEFAULT_QMP_DIR = "/var/run/qemu-server"
# Proxmox VM ids are integers from 100 to 999999999.
_VMID = re.compile(r"[1-9][0-9]{2,8}")
# `qm list` prints names cut to 20 characters: a name that long may be longer.
_LIST_NAME_WIDTH = 20

# The scripts (sh/proxmox/): $1 = the qm command, $2 = vmid (checked again there by
# sh/proxmox/common.sh: it reaches a command line on the node).
_LIST = load("proxmox/list.sh")
_INFO = load("proxmox/common.sh", "proxmox/info.sh")
_DUMP = load("proxmox/common.sh", "proxmox/dump.sh")

_SECTION = re.compile(r"^==memdump-([a-z]+)==\n", re.M)
_DUMP_STATUS = re.compile(r"^memdump-dump-status (\S*)$", re.M)
_PROMPT = re.compile(r"^(qm> )+", re.M)
_VERSION = re.compile(r"^(\d+\.\d+\.\d+)\S*", re.M)
_STATES = {"suspended": "pmsuspended", "prelaunch": "paused"}


def _sections(text: str) -> dict[str, str]:
    parts = _SECTION.split(text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _keys(text: str) -> dict[str, str]:
    """Top-level ``key: value`` lines (qm indents nested values; they are skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line[:1].isspace():
            continue
        key, sep, value = line.partition(":")
        if sep and key and " " not in key:
            out.setdefault(key, value.strip())
    return out


def _list_rows(text: str) -> list[tuple[str, str, str]]:
    """(vmid, name, status) of every row of ``qm list``."""
    rows = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 3 and _VMID.fullmatch(cols[0]):
            rows.append((cols[0], cols[1], cols[2]))
    return rows


class ProxmoxDriver:
    kind = "proxmox"

    def __init__(self, hv: HypervisorConfig, transport: Transport) -> None:
        self.name = hv.name
        self._qm = hv.qm_command or "qm"
        self._t = transport
        self._live = QmpLive(transport, hv, hv.qmp_dir or DEFAULT_QMP_DIR)

    def _run(self, script: str, *args: str, timeout: float = 60.0) -> CommandResult:
        return self._t.run(script, (self._qm, *args), timeout=timeout)

    def _failed(self, what: str, res: CommandResult, vm_id: str | None = None) -> HypervisorError:
        return HypervisorError(
            f"{self.name}: {what} failed (exit {res.returncode}): "
            f"{res.stderr_text or 'no message'}",
            hypervisor=self.name,
            vm_id=vm_id,
            exit_code=res.returncode,
            retryable=True,
        )

    def _list(self) -> list[tuple[str, str, str]]:
        res = self._run(_LIST)
        if res.returncode != 0:
            raise self._failed("qm list", res)
        return _list_rows(res.stdout.decode("utf-8", "replace"))

    def _info(self, vmid: str) -> dict[str, str]:
        if not _VMID.fullmatch(vmid):
            raise VMNotFoundError(
                f"no VM {vmid!r} on hypervisor {self.name} (a Proxmox vmid is 100-999999999)",
                vm_id=vmid,
                hypervisor=self.name,
            )
        res = self._run(_INFO, vmid)
        if res.returncode == Exit.NO_VM:
            raise VMNotFoundError(
                f"no VM {vmid!r} on hypervisor {self.name}", vm_id=vmid, hypervisor=self.name
            )
        if res.returncode != 0:
            raise self._failed(f"qm config/status of {vmid}", res, vmid)
        return _sections(res.stdout.decode("utf-8", "replace"))

    def _full_name(self, vmid: str, listed: str) -> str:
        if len(listed) < _LIST_NAME_WIDTH:
            return listed
        return _keys(self._info(vmid).get("config", "")).get("name", listed)

    def list_vms(self) -> list[VMRef]:
        return [
            VMRef(self.name, vmid, self._full_name(vmid, name))
            for vmid, name, status in self._list()
            if status == "running"
        ]

    def resolve(self, vm_id: str) -> VMRef:
        """By vmid, else by name (which Proxmox does not require to be unique)."""
        validate_id(vm_id)
        if _VMID.fullmatch(vm_id):
            try:
                cfg = _keys(self._info(vm_id).get("config", ""))
            except VMNotFoundError:
                pass
            else:
                return VMRef(self.name, vm_id, self._vm_name(vm_id, cfg.get("name") or vm_id))
        hits = sorted(
            vmid
            for vmid, name, _ in self._list()
            if name == vm_id[:_LIST_NAME_WIDTH] and self._full_name(vmid, name) == vm_id
        )
        if len(hits) == 1:
            return VMRef(self.name, hits[0], vm_id)
        raise VMNotFoundError(
            f"no VM {vm_id!r} on hypervisor {self.name}"
            + (f" (ambiguous: vmids {', '.join(hits)}; use the vmid)" if hits else ""),
            vm_id=vm_id,
            hypervisor=self.name,
        )

    def _vm_name(self, vmid: str, name: str) -> str:
        """A VM's name from ``qm``, checked like an id before it reaches a record, a CSV
        export or a markdown artifact; refused (that VM only) otherwise."""
        try:
            return validate_id(name, what=f"name of VM {vmid}")
        except InvalidIdentifierError as exc:
            raise InvalidIdentifierError(
                exc.message, vm_id=vmid, hypervisor=self.name, **exc.fields
            ) from None

    def snapshot(self, ref: VMRef) -> VMInfo:
        # A ref from list_vms carries the name as listed: checked before any capture.
        self._vm_name(ref.vmid, ref.name)
        sec = self._info(ref.vmid)
        config = sec.get("config", "")
        cfg = _keys(config)
        st = _keys(sec.get("status", ""))
        mon = _PROMPT.sub("", sec.get("monitor", ""))
        state = st.get("qmpstatus") or st.get("status", "unknown")
        m = re.search(r"^base memory: (\d+)", mon, re.M)
        plugged = re.search(r"^plugged memory: (\d+)", mon, re.M)
        if m:
            memory = int(m.group(1)) + (int(plugged.group(1)) if plugged else 0)
        else:  # the config's memory is in MiB (512 when unset)
            memory = int(cfg.get("memory", "512") or 512) << 20
        versions = {}
        v = st.get("running-qemu") or next(iter(_VERSION.findall(mon)), "")
        if v:
            versions["hypervisor"] = f"QEMU {v}"
        pve = sec.get("pveversion", "").strip()
        if pve:
            versions["proxmox"] = pve.splitlines()[0]
        uuid = re.search(r"(?:^|,)uuid=([0-9A-Fa-f-]{36})", cfg.get("smbios1", ""))
        return VMInfo(
            ref=ref,
            uuid=uuid.group(1) if uuid else "",
            domain_id=st.get("pid"),
            state=_STATES.get(state, state),
            memory_bytes=memory,
            hypervisor_host=sec.get("host", "").strip(),
            versions=versions,
            taken_at=datetime.now(UTC),
            # The VM's definition as `qm config` printed it (the manifest's "domain xml").
            domain_xml_sha256=hashlib.sha256(config.encode()).hexdigest() if config else "",
            host_key=self._t.host_key_fingerprint(),
        )

    def open_dump(
        self,
        ref: VMRef,
        *,
        staging: Staging = "fifo",
        margin: float = DISK_SPACE_MARGIN,
        mode: Literal["paused", "live"] = "paused",
        spill_dir: Path | None = None,
        buffer_bytes: int = 64 << 20,
        max_bandwidth: int | None = None,
    ) -> DumpSource:
        """Only ``staging="fifo"``. "paused": the guest stays paused for the whole
        transfer. "live": QEMU's background snapshot over the VM's QMP socket (see the
        module's doc), capped at ``max_bandwidth`` bytes/s if set (QEMU's max-bandwidth
        while it runs, the VM's own value put back after it); LiveCaptureUnsupportedError
        (``reason``) where it cannot run."""
        if not _VMID.fullmatch(ref.vmid):
            raise VMNotFoundError(
                f"no VM {ref.vmid!r} on hypervisor {self.name}",
                vm_id=ref.vmid,
                hypervisor=self.name,
            )
        fifo_only(self.name, "proxmox", staging, "HMP cannot cancel a dump-guest-memory")
        if mode == "live":
            # The socket must be served by the QEMU qm knows for this VM.
            pid = _keys(self._info(ref.vmid).get("status", "")).get("pid", "")
            return self._live.open(
                ref, ref.vmid, spill_dir, buffer_bytes, pid=pid, max_bandwidth=max_bandwidth
            )
        return _HmpDump.start(self._t, _DUMP, (self._qm, ref.vmid), self.name, ref)

    def clean_stale(self, min_age_sec: float = 60.0) -> list[str]:
        # A live script killed outright: QEMU and the sysctl first (QmpLive.repair).
        return self._live.repair() + clean_stale(self._t, self.name, min_age_sec)

    def close(self) -> None:
        self._t.close()


class _HmpDump(TokenFifoDump):
    dump_format = "ELF64 core: qm monitor, HMP dump-guest-memory -d"

    def close_ok(self) -> None:
        rc, stderr = self.finish()
        if rc == 0:
            return
        m = _DUMP_STATUS.search(stderr)
        status = m.group(1) if m else "unknown"
        rest = _DUMP_STATUS.sub("", stderr).strip()
        if rc == Exit.DUMP_INCOMPLETE:
            why = f"QEMU's dump status is {status!r}, not 'completed'"
        elif rc == Exit.MONITOR_REFUSED:
            why = "the monitor refused the dump"
        else:
            why = f"exit {rc}"
        raise DumpFailedError(
            f"HMP dump-guest-memory of VM {self._ref.vmid} ({self._ref.name}) on "
            f"{self._hv} failed: {why}: {rest or 'no message'}",
            hypervisor=self._hv,
            vm_id=self._ref.vmid,
            exit_code=rc,
            stderr=stderr[-2000:],
        )
