"""Issue 16 item 3: without a hypervisor in the inventory nothing that takes capture runs
starts (``memdump serve``, the runner, a production worker), and the refusal names the
settings, instead of a stack whose every "all" capture is an empty success."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.stack import serve
from memdump.errors import ConfigError
from memdump.settings import Settings
from memdump.targets import require_hypervisors
from tests.helpers.stack import REPO, free_port

HV = {"name": "hv1", "transport": "local"}


@pytest.fixture(autouse=True)
def no_inventory_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings() reads the environment: the lab's inventory (scripts/test sources
    .lab/env) must not count here."""
    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    monkeypatch.delenv("MEMDUMP_HYPERVISORS", raising=False)


def test_no_inventory_at_all_names_both_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        require_hypervisors(Settings(data_dir=tmp_path), "X refuses to start")
    text = str(err.value)
    assert text.startswith("no hypervisor in the inventory")
    assert "neither MEMDUMP_INVENTORY_FILE nor MEMDUMP_HYPERVISORS is set" in text
    assert "X refuses to start" in text
    assert err.value.fields["setting"] == "MEMDUMP_INVENTORY_FILE"


def test_an_inventory_file_that_lists_none_is_named(tmp_path: Path) -> None:
    inv = tmp_path / "inventory.yaml"
    inv.write_text("hypervisors: []\n")
    with pytest.raises(ConfigError, match=f"MEMDUMP_INVENTORY_FILE={inv} lists none"):
        require_hypervisors(Settings(data_dir=tmp_path, inventory_file=inv), "refused")


def test_one_hypervisor_is_enough(tmp_path: Path) -> None:
    require_hypervisors(Settings(data_dir=tmp_path, hypervisors=[HV]), "refused")  # type: ignore[list-item]
    inv = tmp_path / "inventory.yaml"
    inv.write_text("hypervisors:\n  - name: hv2\n    transport: local\n")
    require_hypervisors(Settings(data_dir=tmp_path, inventory_file=inv), "refused")


def test_serve_refuses_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[object] = []
    monkeypatch.setattr("deployments.stack.popen_dying_with_parent", started.append)
    with pytest.raises(ConfigError, match="memdump serve refuses to start"):
        serve(Settings(data_dir=tmp_path / "data"))
    assert started == []
    assert not (tmp_path / "data").exists()  # not even its Prefect home


def _no_inventory_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMDUMP_", "PREFECT_"))}
    env.update(
        MEMDUMP_DATA_DIR=str(tmp_path / "data"),
        MEMDUMP_API__PORT=str(free_port()),
        MEMDUMP_ORCHESTRATION__PREFECT_PORT=str(free_port()),
        # Were anything to reach for Prefect, it would find nothing here.
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
    )
    return env


@pytest.mark.parametrize(
    ("argv", "who"),
    [
        (["-m", "memdump.cli", "serve"], "memdump: no hypervisor in the inventory"),
        (["-m", "deployments.serve"], "deployments.serve: no hypervisor in the inventory"),
        (["-m", "deployments.worker"], "deployments.worker: no hypervisor in the inventory"),
    ],
    ids=["memdump-serve", "runner", "worker"],
)
def test_processes_refuse_to_start_without_a_hypervisor(
    tmp_path: Path, argv: list[str], who: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=_no_inventory_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # it started after all: end it and what it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (out + err).decode(errors="replace")
    assert proc.returncode not in (0, None), text
    assert who in text, text
    assert "MEMDUMP_INVENTORY_FILE" in text and "MEMDUMP_HYPERVISORS" in text, text
    assert "started" not in text and "Traceback" not in text, text
