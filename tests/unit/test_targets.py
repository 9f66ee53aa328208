"""Resolving requested ids across several hypervisors: an id found on two is a clear
error, not a guess; "hv:id" picks one; an unknown hypervisor is named."""

from __future__ import annotations

import pytest

from memdump.errors import AmbiguousVMError, InvalidIdentifierError, VMNotFoundError
from memdump.hypervisors import VMRef
from memdump.targets import find


class Hv:
    def __init__(self, name: str, vms: list[str]) -> None:
        self.name, self.vms, self.asked = name, vms, []  # type: list[str]

    def resolve(self, vm_id: str) -> VMRef:
        self.asked.append(vm_id)
        if vm_id not in self.vms:
            raise VMNotFoundError(f"no VM {vm_id!r}", vm_id=vm_id)
        return VMRef(self.name, vm_id, f"name-{vm_id}")


def test_unqualified_found_once_twice_or_never() -> None:
    a, b = Hv("pve-a", ["101", "102"]), Hv("pve-b", ["101", "201"])
    assert find([a, b], "201") == (b, VMRef("pve-b", "201", "name-201"))  # type: ignore[list-item]
    with pytest.raises(AmbiguousVMError) as ei:
        find([a, b], "101")  # type: ignore[list-item]
    assert "pve-a, pve-b" in str(ei.value) and "HYPERVISOR:101" in str(ei.value)
    assert ei.value.fields["hypervisors"] == ["pve-a", "pve-b"] and not ei.value.retryable
    with pytest.raises(VMNotFoundError):
        find([a, b], "999")  # type: ignore[list-item]


def test_qualified_asks_only_that_hypervisor() -> None:
    a, b = Hv("pve-a", ["101"]), Hv("pve-b", ["101"])
    assert find([a, b], "pve-b:101") == (b, VMRef("pve-b", "101", "name-101"))  # type: ignore[list-item]
    assert a.asked == []
    with pytest.raises(VMNotFoundError, match="no hypervisor 'pve-c'"):
        find([a, b], "pve-c:101")  # type: ignore[list-item]
    with pytest.raises(VMNotFoundError):
        find([a, b], "pve-a:102")  # type: ignore[list-item]
    for bad in ("pve-a:", ":101", "a:b:c", "pve a:101", "pve-a:1 01", "..:101"):
        with pytest.raises(InvalidIdentifierError):
            find([a, b], bad)  # type: ignore[list-item]
    assert a.asked == ["102"] and b.asked == ["101"]
