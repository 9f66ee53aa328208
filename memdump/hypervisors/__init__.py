"""Hypervisor drivers, one module each."""

from __future__ import annotations

from memdump.errors import ConfigError
from memdump.hypervisors.base import Driver, VMInfo, VMRef
from memdump.settings import HypervisorConfig, SSHTuning
from memdump.transport import open_transport


def open_driver(hv: HypervisorConfig, tuning: SSHTuning) -> Driver:
    transport = open_transport(hv, tuning)
    if hv.driver == "libvirt":
        from memdump.hypervisors.libvirt import LibvirtDriver

        return LibvirtDriver(hv, transport)
    if hv.driver == "qemu":
        from memdump.hypervisors.qemu import QemuDriver

        return QemuDriver(hv, transport)
    if hv.driver == "proxmox":
        from memdump.hypervisors.proxmox import ProxmoxDriver

        return ProxmoxDriver(hv, transport)
    raise ConfigError(f"unknown driver {hv.driver!r}", hypervisor=hv.name)  # pragma: no cover


__all__ = ["Driver", "VMInfo", "VMRef", "open_driver"]
