"""The interface every hypervisor driver implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from memdump.pipeline import DumpSource
from memdump.settings import DISK_SPACE_MARGIN


@dataclass(frozen=True)
class VMRef:
    """A VM resolved on one hypervisor. ``vmid`` is the stable id used in records and
    file names (for libvirt: the domain name)."""

    hypervisor: str
    vmid: str
    name: str


@dataclass(frozen=True)
class VMInfo:
    """What the hypervisor said about the VM just before its dump (record + manifest)."""

    ref: VMRef
    uuid: str
    domain_id: str | None
    state: str
    memory_bytes: int
    hypervisor_host: str
    versions: dict[str, str] = field(default_factory=dict)
    taken_at: datetime | None = None
    domain_xml_sha256: str = ""  # of the hypervisor's definition of the VM, as it printed it
    host_key: str = ""  # the hypervisor's verified SSH host key ("" over a local transport)

    @property
    def running(self) -> bool:
        return self.state in ("running", "paused", "pmsuspended")


class Driver(Protocol):
    name: str

    def list_vms(self) -> list[VMRef]:
        """Running VMs (the ones "all" means)."""
        ...

    def resolve(self, vm_id: str) -> VMRef:
        """Find a VM by any id the hypervisor knows it by; raises VMNotFoundError."""
        ...

    def snapshot(self, ref: VMRef) -> VMInfo: ...

    def open_dump(
        self,
        ref: VMRef,
        *,
        staging: Literal["fifo", "file"] = "fifo",
        margin: float = DISK_SPACE_MARGIN,
    ) -> DumpSource:
        """Start the dump; the returned source yields the raw ELF core bytes."""
        ...

    def clean_stale(self, min_age_sec: float = 60.0) -> list[str]:
        """Remove what dump scripts killed outright left on the hypervisor (at least
        ``min_age_sec`` old, owner gone); returns what was removed."""
        ...

    def close(self) -> None: ...
