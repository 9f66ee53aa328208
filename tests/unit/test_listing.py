"""Issue 11 item 7: every hypervisor is listed on its own (one that fails does not stop
the others), and a virsh listing that is not UTF-8 is decoded with replacement: the odd
name is then refused as an id, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from memdump.errors import ConnectError, HypervisorError, InvalidIdentifierError
from memdump.hypervisors import VMRef
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.settings import HypervisorConfig
from memdump.targets import find, list_all, list_each
from memdump.transport.local import LocalTransport


class Hv:
    def __init__(self, name: str, vms: list[str] | Exception) -> None:
        self.name, self.vms = name, vms

    def list_vms(self) -> list[VMRef]:
        if isinstance(self.vms, Exception):
            raise self.vms
        return [VMRef(self.name, v, v) for v in self.vms]


def test_each_hypervisor_is_listed_on_its_own() -> None:
    down = ConnectError("hv-b: cannot connect", host="hv-b")
    hvs = [
        Hv("hv-a", ["1", "2"]),
        Hv("hv-b", down),
        Hv("hv-c", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")),
        Hv("hv-d", ["4"]),
    ]
    got = list_each(hvs)  # type: ignore[arg-type]
    assert [(lst.hypervisor, [r.vmid for r in lst.vms]) for lst in got] == [
        ("hv-a", ["1", "2"]),
        ("hv-b", []),
        ("hv-c", []),
        ("hv-d", ["4"]),
    ]
    assert got[0].error is None and got[1].error is down
    # A driver bug (here a decode error) fails its own hypervisor, as a memdump error.
    assert isinstance(got[2].error, HypervisorError) and "hv-c" in str(got[2].error)
    assert got[2].error.fields["hypervisor"] == "hv-c"
    with pytest.raises(ConnectError):
        list_all(hvs)  # type: ignore[arg-type]


def test_virsh_names_that_are_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    virsh = tmp_path / "virsh"
    # The names as a hostile or broken host might print them: one is not UTF-8.
    virsh.write_bytes(b"#!/bin/sh\nprintf 'vm-ok\\nvm-\\377bad\\n'\n")
    virsh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    d = LibvirtDriver(HypervisorConfig(name="lv", transport="local"), LocalTransport())
    names = [r.vmid for r in d.list_vms()]
    assert names == ["vm-ok", "vm-\ufffdbad"]
    with pytest.raises(InvalidIdentifierError, match="not a plain identifier"):
        find([d], names[1])
