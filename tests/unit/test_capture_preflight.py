"""A live capture's preflight runs beside the snapshot (memdump.capture._Preflight): the
two remote commands overlap instead of following each other, the driver's open_dump gets
the preflight's answer, a refusal still falls back to paused with its reason, and the
preflight never outlives the capture."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from memdump.capture import capture
from memdump.errors import LiveCaptureUnsupportedError, VMNotRunningError
from memdump.hypervisors import VMInfo, VMRef
from memdump.settings import Settings
from tests.helpers.capture_modes import REF, LiveDriver, Source

WAIT = 10.0  # seconds: far more than either side needs when they overlap


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MEMDUMP_INVENTORY_FILE", "MEMDUMP_CAPTURE_MODE", "MEMDUMP_HYPERVISORS"):
        monkeypatch.delenv(name, raising=False)


def settings(tmp_path: Path) -> Settings:
    return Settings(
        dump_dir=tmp_path / "dumps",
        analysis={"enabled": False},
        collector_id="c1",
        capture_mode="live",
    )


@dataclass(eq=False)
class PreflightDriver(LiveDriver):
    """Its snapshot waits until the preflight has started (and the preflight until the
    snapshot has): run one after the other, each would wait in vain."""

    state: str = "running"
    refuse_preflight: bool = False
    preflight_started: threading.Event = field(default_factory=threading.Event)
    snapshot_started: threading.Event = field(default_factory=threading.Event)
    preflight_done: threading.Event = field(default_factory=threading.Event)
    overlapped: list[bool] = field(default_factory=list)
    preflights: list[Any] = field(default_factory=list)

    def snapshot(self, ref: VMRef) -> VMInfo:
        self.snapshot_started.set()
        self.overlapped.append(self.preflight_started.wait(WAIT))
        info = super().snapshot(ref)
        return VMInfo(ref, info.uuid, info.domain_id, self.state, info.memory_bytes,
                      info.hypervisor_host, info.versions, info.taken_at)  # fmt: skip

    def live_preflight(self, ref: VMRef) -> str:
        self.preflight_started.set()
        self.overlapped.append(self.snapshot_started.wait(WAIT))
        try:
            if self.refuse_preflight:
                raise LiveCaptureUnsupportedError(
                    "live capture unsupported on hv", reason="QEMU 5.2 is older than 6.0"
                )
            return f"preflight of {ref.name}"
        finally:
            self.preflight_done.set()

    def open_dump(  # type: ignore[override]
        self,
        ref: VMRef,
        *,
        staging: Literal["fifo", "file"] = "fifo",
        margin: float = 1.1,
        mode: Literal["paused", "live"] = "paused",
        spill_dir: Path | None = None,
        buffer_bytes: int = 64 << 20,
        max_bandwidth: int | None = None,
        preflight: Any = None,
    ) -> Source:
        self.preflights.append(preflight)
        return super().open_dump(
            ref,
            staging=staging,
            margin=margin,
            mode=mode,
            spill_dir=spill_dir,
            buffer_bytes=buffer_bytes,
            max_bandwidth=max_bandwidth,
        )


def test_the_preflight_runs_beside_the_snapshot_and_reaches_open_dump(tmp_path: Path) -> None:
    d = PreflightDriver()
    cap = capture(d, REF, settings(tmp_path))  # type: ignore[arg-type]
    assert d.overlapped == [True, True]
    assert cap.mode == "live"
    assert d.preflights == [f"preflight of {REF.name}"]  # its answer, not a second call


def test_a_refusing_preflight_still_falls_back_to_paused_with_its_reason(
    tmp_path: Path,
) -> None:
    d = PreflightDriver(refuse_preflight=True)
    cap = capture(d, REF, settings(tmp_path))  # type: ignore[arg-type]
    assert (cap.mode, cap.mode_requested) == ("paused", "live")
    assert cap.fallback_reason == "QEMU 5.2 is older than 6.0"
    assert [c["mode"] for c in d.calls] == ["paused"]  # live open_dump never called


def test_the_preflight_is_finished_when_the_capture_fails_early(tmp_path: Path) -> None:
    d = PreflightDriver(state="shut off")
    with pytest.raises(VMNotRunningError):
        capture(d, REF, settings(tmp_path))  # type: ignore[arg-type]
    assert d.preflight_done.is_set()
    assert not [t for t in threading.enumerate() if t.name == "memdump-preflight"]


def test_a_paused_capture_runs_no_preflight(tmp_path: Path) -> None:
    d = PreflightDriver()
    d.preflight_started.set()  # the snapshot does not wait for it
    capture(d, REF, settings(tmp_path), mode="paused")  # type: ignore[arg-type]
    assert not d.preflight_done.is_set()
