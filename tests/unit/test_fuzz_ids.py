"""Hostile VM ids (hypothesis): each is a 400 at the API or refused by the driver, and a
canary transport proves no command ever ran with the hostile text."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.main import create_app
from memdump.errors import InvalidIdentifierError
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.hypervisors.proxmox import ProxmoxDriver
from memdump.hypervisors.qemu import QemuDriver
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import HypervisorConfig, Settings
from memdump.targets import find
from memdump.transport.base import CommandResult
from tests.helpers.api import FakeRuns

PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def acceptable(s: str) -> bool:
    """A plain id, or one qualified by its hypervisor ("hv:101"), both parts plain."""
    parts = s.split(":")
    return len(parts) <= 2 and all(PLAIN.fullmatch(p) and ".." not in p for p in parts)


NASTY = st.sampled_from(
    [
        ";",
        "|",
        "&",
        "$(",
        "`",
        "'",
        '"',
        "\n",
        "\x00",
        "/",
        "..",
        " ",
        "-",
        "*",
        "\\",
        "\u202e",
        "é",
        ">",
        "<",
        "#",
        "{",
        "~",
    ]
)
hostile = st.one_of(
    st.text(min_size=0, max_size=300),
    st.builds(
        lambda a, n, b: a + n + b, st.from_regex(PLAIN, fullmatch=True), NASTY, st.text(max_size=20)
    ),
    st.text(alphabet="a", min_size=129, max_size=5000),
).filter(lambda s: not acceptable(s) and s != "all")


class CanaryTransport:
    description = "canary"

    def __init__(self) -> None:
        self.seen: list[Sequence[str]] = []

    def run(self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0) -> CommandResult:
        self.seen.append(args)
        return CommandResult(1, b"", b"error: failed to get domain")

    def stream(self, script: str, args: Sequence[str] = ()) -> object:
        self.seen.append(args)
        raise AssertionError("no stream for a hostile id")

    def close(self) -> None:
        pass


DRIVERS = {"libvirt": LibvirtDriver, "qemu": QemuDriver, "proxmox": ProxmoxDriver}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@settings(max_examples=300, deadline=None)
@given(vm_id=hostile)
def test_driver_never_runs_a_hostile_id(driver: str, vm_id: str) -> None:
    t = CanaryTransport()
    drv = DRIVERS[driver](HypervisorConfig(name="hv", transport="local", driver=driver), t)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifierError):
        drv.resolve(vm_id)
    # Qualified with a hypervisor, on either side of the colon: refused before any command.
    for qualified in (f"hv:{vm_id}", f"{vm_id}:vm-1"):
        with pytest.raises(InvalidIdentifierError):
            find([drv], qualified)
    assert t.seen == []


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, FakeRuns]:
    tmp = tmp_path_factory.mktemp("fuzz")
    runs = FakeRuns()
    s = Settings(data_dir=tmp, api={"trigger_min_interval_sec": 0})
    return TestClient(
        create_app(s, store=SQLiteRecordStore(tmp / "r.db"), runs=runs),
        base_url="http://localhost",  # an allowed Host header
    ), runs


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(
        st.one_of(hostile, st.just("all"), st.from_regex(PLAIN, fullmatch=True)),
        min_size=1,
        max_size=20,
    )
)
def test_api_rejects_any_list_with_a_hostile_id(
    client: tuple[TestClient, FakeRuns], ids: list[str]
) -> None:
    c, runs = client
    before = len(runs.triggered)
    r = c.post("/api/memory-dumps/trigger", json={"vm_ids": ids})
    ok = all(i == "all" or acceptable(i) for i in ids)
    assert r.status_code == (200 if ok else 400), (ids, r.text)
    assert list(r.json()) == (["status", "message", "vm_ids", "timestamp"] if ok else ["detail"])
    assert len(runs.triggered) == before + (1 if ok else 0)


def test_ten_thousand_ids_are_refused_a_thousand_accepted(
    client: tuple[TestClient, FakeRuns],
) -> None:
    c, runs = client
    before = len(runs.triggered)
    ids = [f"vm-{i:05d}" for i in range(10_000)]
    r = c.post("/api/memory-dumps/trigger", json={"vm_ids": ids})
    assert r.status_code == 400 and "Too many VM IDs: 10000" in r.json()["detail"]
    assert len(runs.triggered) == before
    r = c.post("/api/memory-dumps/trigger", json={"vm_ids": ids[:1000]})
    assert r.status_code == 200 and r.json()["message"] == "Memory dump scheduled for 1000 VM(s)"
    assert runs.triggered[before:] == [(ids[:1000], "api")]
