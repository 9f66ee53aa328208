"""Ways of reaching a hypervisor: SSH (paramiko) or local subprocess."""

from __future__ import annotations

from memdump.settings import HypervisorConfig, SSHTuning
from memdump.transport.base import ByteStream, CommandResult, Transport


def open_transport(hv: HypervisorConfig, tuning: SSHTuning) -> Transport:
    if hv.transport == "local":
        from memdump.transport.local import LocalTransport

        return LocalTransport(
            stall_timeout=tuning.stall_timeout_sec,
            max_stdout=tuning.run_max_stdout_bytes,
            max_stderr=tuning.run_max_stderr_bytes,
        )
    from memdump.transport.ssh import SSHTransport

    return SSHTransport(hv, tuning)


__all__ = ["ByteStream", "CommandResult", "Transport", "open_transport"]
