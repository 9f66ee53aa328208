"""Issue 11 item 7 for the command line: `memdump vms` lists each hypervisor on its own;
one that cannot be reached (a port where nothing listens) is reported, the lab's VMs are
still listed."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from memdump import cli
from memdump.hypervisors import open_driver
from memdump.settings import Settings

pytestmark = pytest.mark.lab


def test_vms_lists_the_reachable_hypervisors(
    lab_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lab = yaml.safe_load((lab_dir / "inventory.yaml").read_text())["hypervisors"][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"hypervisors": [{**lab, "name": "down", "port": port}, lab]}))
    monkeypatch.setenv("MEMDUMP_INVENTORY_FILE", str(inv))
    settings = Settings()
    d = open_driver(settings.hypervisor(lab["name"]), settings.ssh)
    try:
        expected = {f"{r.hypervisor}\t{r.vmid}\t{r.name}" for r in d.list_vms()}
    finally:
        d.close()

    code = cli.main(["vms"])
    out, err = capsys.readouterr()
    assert code == 1
    assert set(out.splitlines()) == expected and expected
    report = json.loads(err.strip().splitlines()[-1])
    assert report["hypervisor"] == "down" and report["error"] == "ConnectError"
