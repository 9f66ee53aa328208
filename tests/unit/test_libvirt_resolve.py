"""resolve and snapshot on libvirt: the snapshot right after a resolve of the same domain
takes resolve's answer (one remote command fewer before every capture), a later one or
one of another domain asks again, and the answer is used once."""

from __future__ import annotations

from pathlib import Path

import pytest

from memdump.hypervisors import libvirt
from memdump.hypervisors.libvirt import LibvirtDriver
from memdump.settings import HypervisorConfig
from memdump.transport.local import LocalTransport

VIRSH = """#!/bin/sh
echo "$*" >> "$VIRSH_LOG"
case "$3" in
  dominfo) printf 'Id:             7\\nName:           vm-%s\\nUUID:           u-%s\\nState:          running\\nMax memory:     262144 KiB\\nUsed memory:    262144 KiB\\n' "$4" "$4" ;;
  dumpxml) echo "<domain>$4</domain>" ;;
  version) echo 'Using library: libvirt 9.0.0' ;;
esac
"""  # noqa: E501


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LibvirtDriver:
    virsh = tmp_path / "virsh"
    virsh.write_text(VIRSH)
    virsh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("VIRSH_LOG", str(tmp_path / "calls"))
    return LibvirtDriver(HypervisorConfig(name="lv", transport="local"), LocalTransport())


def _dominfos(tmp_path: Path) -> int:
    return sum(" dominfo " in line for line in (tmp_path / "calls").read_text().splitlines())


def test_a_snapshot_right_after_resolve_takes_its_answer(
    driver: LibvirtDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = driver.resolve("7")
    assert (ref.vmid, ref.name) == ("vm-7", "vm-7") and _dominfos(tmp_path) == 1
    info = driver.snapshot(ref)
    assert _dominfos(tmp_path) == 1  # nothing asked again
    assert (info.uuid, info.state, info.memory_bytes) == ("u-7", "running", 256 << 20)
    assert info.domain_xml_sha256 and info.versions == {"libvirt": "9.0.0"}
    # Used once: the next snapshot asks.
    again = driver.snapshot(ref)
    assert _dominfos(tmp_path) == 2 and again.state == "running"
    # Too old, or another domain: asked again.
    monkeypatch.setattr(libvirt, "FRESH_SEC", 0.0)
    driver.snapshot(driver.resolve("7"))
    assert _dominfos(tmp_path) == 4
    monkeypatch.setattr(libvirt, "FRESH_SEC", 60.0)
    other = driver.resolve("8")
    driver.snapshot(ref)
    assert _dominfos(tmp_path) == 6 and other.name == "vm-8"
