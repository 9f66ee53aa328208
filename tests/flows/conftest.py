"""One Prefect test harness (a real, temporary Prefect server) for every flow test."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.testing.utilities import prefect_test_harness

from memdump.capture import Capture
from memdump.errors import VMNotFoundError
from memdump.hypervisors import VMRef
from memdump.records.model import DumpRecord
from tests.helpers.prefect_events import reset_events_worker


@pytest.fixture
def warm_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """deployments.warm installed in this process (undone after): the forkserver's pid."""
    import multiprocessing.forkserver

    import prefect.flow_engine as flow_engine

    from deployments import warm

    monkeypatch.setattr(flow_engine, "multiprocessing", flow_engine.multiprocessing)
    pid = warm.install(["prefect.flow_engine", "tests.helpers.warm_flow", "memdump.pipeline"])
    try:
        yield pid
    finally:
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def harness() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    # Telemetry off: its heartbeat races the harness's fresh SQLite ("database is locked").
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DO_NOT_TRACK", "1")
    with prefect_test_harness(server_startup_timeout=120):
        reset_events_worker()  # events go to this harness, not to a server of before
        yield
    mp.undo()


class FakeDriver:
    name = "fakehv"

    def close(self) -> None:
        pass


def _record(vmid: str, tmp: Path) -> DumpRecord:
    return DumpRecord(
        datetime.now(UTC),
        vmid,
        vmid,
        "a" * 64,
        0.5,
        100,
        1,
        2,
        3,
        str(tmp / f"{vmid}.mem.gz"),
        "b" * 64,
        4096,
        "fakehv",
    )


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Replaces find/capture in the engine's chain (memdump.chain); behaviour per VM id via
    ``plan``."""
    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MEMDUMP_HYPERVISORS", '[{"name": "fakehv", "transport": "local"}]')
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__CAPTURE_RETRY_DELAY_SEC", "0")
    calls: dict[str, int] = {}
    plan: dict[str, list[Exception | None]] = {}
    sizes: dict[str, int] = {}  # the dump size a VM's progress reports (else 100)
    triggers: list[Any] = []

    def find(drivers: list[Any], vm_id: str) -> tuple[Any, VMRef]:
        if vm_id.startswith("unknown"):
            raise VMNotFoundError(f"no VM {vm_id!r}", vm_id=vm_id)
        return FakeDriver(), VMRef("fakehv", vm_id, vm_id)

    def capture(
        driver: Any,
        ref: VMRef,
        settings: Any,
        progress: Any = None,
        trigger: Any = None,
        mode: Any = None,
        changes: Any = None,
        record_signature: Any = None,
    ) -> Capture:
        calls[ref.vmid] = calls.get(ref.vmid, 0) + 1
        triggers.append(trigger)
        steps = plan.get(ref.vmid, [])
        err = steps.pop(0) if steps else None
        if err is not None:
            raise err
        if progress:
            total = sizes.get(ref.vmid, 100)
            progress(total // 2, total)
            progress(total, total)
        return Capture(_record(ref.vmid, tmp_path), None, None, {})  # type: ignore[arg-type]

    monkeypatch.setattr("memdump.chain.find", find)
    monkeypatch.setattr("memdump.chain.capture", capture)
    monkeypatch.setattr("memdump.chain.open_driver", lambda hv, ssh: FakeDriver())
    return {
        "calls": calls,
        "plan": plan,
        "sizes": sizes,
        "db": tmp_path / "records.db",
        "triggers": triggers,
    }
