"""Resolving requested ids across several hypervisors: an id found on two is a clear
error, not a guess; "hv:id" picks one; an unknown hypervisor is named. A run's ids are
located (memdump.targets.locate) by asking each hypervisor about all of them, with the
answer find would give."""

from __future__ import annotations

import pytest

from memdump.errors import (
    AmbiguousVMError,
    ConnectError,
    HypervisorError,
    InvalidIdentifierError,
    VMNotFoundError,
)
from memdump.hypervisors import VMRef
from memdump.targets import find, locate


class Hv:
    def __init__(self, name: str, vms: list[str], fails: Exception | None = None) -> None:
        self.name, self.vms, self.asked = name, vms, []  # type: list[str]
        self.fails = fails

    def resolve(self, vm_id: str) -> VMRef:
        self.asked.append(vm_id)
        if self.fails is not None:
            raise self.fails
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


def test_locate_answers_as_find_asking_each_hypervisor_once_per_id() -> None:
    a, b = Hv("pve-a", ["101", "102", "7"]), Hv("pve-b", ["201", "7"])
    ids = ["102", "201", "7", "999", "pve-b:101", "pve-c:101", "a b", "101"]
    got = list(locate([a, b], ids))  # type: ignore[list-item]
    assert got == [
        ("102", "pve-a"),
        ("201", "pve-b"),
        ("7", None),  # on both: its capture's find says so (AmbiguousVMError)
        ("999", None),  # nowhere: VMNotFoundError, from its capture's find
        ("pve-b:101", "pve-b"),  # named: nobody asked
        ("pve-c:101", None),  # no such hypervisor: find names it
        ("a b", None),  # not an id: find refuses it
        ("101", "pve-a"),
    ]
    for hv in (a, b):
        assert sorted(hv.asked) == sorted(["102", "201", "7", "999", "101"])
    for vm_id, hv in got:
        if hv is not None and ":" not in vm_id:
            assert find([a, b], vm_id)[0].name == hv  # type: ignore[list-item]


def test_locate_with_one_hypervisor_asks_nothing() -> None:
    only = Hv("pve-a", [])
    got = list(locate([only], ["101", "pve-a:1"]))  # type: ignore[list-item]
    assert got == [("101", "pve-a"), ("pve-a:1", "pve-a")]
    assert only.asked == []


def test_locate_leaves_to_find_what_find_would_raise() -> None:
    down = ConnectError("pve-c: cannot connect", host="pve-c")
    a, b = Hv("pve-a", ["101"]), Hv("pve-b", ["201"], fails=HypervisorError("qm list failed"))
    c = Hv("pve-c", [], fails=down)
    # A HypervisorError is passed over by find (the VM is where it was found); a
    # connection that fails is find's error for every id, and is tried only once.
    assert list(locate([a, b], ["101"])) == [("101", "pve-a")]  # type: ignore[list-item]
    got = list(locate([a, c], ["101", "102", "103"], per_hypervisor=1))  # type: ignore[list-item]
    assert got == [("101", None), ("102", None), ("103", None)]
    assert c.asked == ["101"]
