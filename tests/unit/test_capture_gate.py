"""What a capture task adds in front of the Prefect server (issue 17, item 3): the
process's gate, which lets captures in by the caps in the order they came (a full
hypervisor holding up nobody else), and the progress artifact, written at most every
PROGRESS_EVERY_SEC while a VM streams and once when its dump is complete."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

import tasks.capture
from tasks.capture import PROGRESS_EVERY_SEC, _Progress
from tasks.limits import CaptureGate


def _until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "the gate did not get there"
        time.sleep(0.005)


def test_the_gate_lets_captures_in_by_the_caps_in_order() -> None:
    gate = CaptureGate()
    inside: list[str] = []
    done = {vm: threading.Event() for vm in ("a1", "a2", "a3", "b1", "b2", "c1")}

    def capture(vm: str) -> None:
        with gate.place(f"hv-{vm[0]}", total=3, per_hypervisor=2):
            inside.append(vm)
            assert done[vm].wait(10)

    threads = []
    for i, vm in enumerate(done):  # one by one: each inside or queued before the next
        threads.append(threading.Thread(target=capture, args=(vm,)))
        threads[-1].start()
        _until(lambda i=i: len(inside) + gate.waiting() == i + 1)
    # hv-a is full after two; b1 goes past a3, and the third place is gone.
    assert inside == ["a1", "a2", "b1"] and gate.waiting() == 3
    assert gate.held() == (3, {"hv-a": 2, "hv-b": 1})
    # One place free: the first in line that fits takes it (b2; a3's hypervisor is full).
    done["b1"].set()
    _until(lambda: len(inside) == 4)
    assert inside[3] == "b2" and gate.waiting() == 2
    done["a1"].set()  # hv-a has room again: a3, before c1
    _until(lambda: len(inside) == 5)
    assert inside[4] == "a3" and gate.held() == (3, {"hv-a": 2, "hv-b": 1})
    done["a2"].set()
    _until(lambda: len(inside) == 6)
    assert inside[5] == "c1"
    for ev in done.values():
        ev.set()
    for t in threads:
        t.join(10)
    assert gate.held() == (0, {}) and gate.waiting() == 0


def test_a_capture_that_fails_gives_its_place_back() -> None:
    gate = CaptureGate()
    with pytest.raises(RuntimeError), gate.place("hv", total=1, per_hypervisor=1):
        raise RuntimeError("the capture failed")
    with gate.place("hv", total=1, per_hypervisor=1):
        assert gate.held() == (1, {"hv": 1})
    assert gate.held() == (0, {})


class _Client:
    def __init__(self) -> None:
        self.updates: list[tuple[float, str]] = []

    def create_artifact(self, artifact: Any) -> Any:
        return SimpleNamespace(id="art-1")

    def update_artifact(self, artifact_id: str, update: Any) -> None:
        self.updates.append((update.data, update.metadata_["bytes_done"]))


@pytest.fixture
def progress(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """A capture's progress sink on a fake clock and a fake Prefect client: returns
    (sink, clock, client)."""
    client = _Client()
    clock = [1000.0]
    monkeypatch.setattr(tasks.capture, "get_client", lambda sync_client: client)
    monkeypatch.setattr(tasks.capture, "get_task_and_flow_run_ids", lambda: (None, None))
    monkeypatch.setattr(tasks.capture, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    def make() -> tuple[_Progress, list[float], _Client]:
        return _Progress("capture-progress-vm", "vm on hv"), clock, client

    return make


def test_a_short_capture_writes_its_progress_once(progress: Callable[..., Any]) -> None:
    sink, clock, client = progress()
    mib = 1 << 20
    clock[0] += 0.2
    sink(4 * mib, 16 * mib)  # the stream loop's first report: too soon after the start
    clock[0] += 0.3
    sink(16 * mib, 16 * mib)  # the dump is complete
    sink(16 * mib, 16 * mib)  # said again (the loop, then the end): written once
    assert client.updates == [(100.0, str(16 * mib))]


def test_a_long_capture_writes_its_progress_every_interval(progress: Callable[..., Any]) -> None:
    sink, clock, client = progress()
    total = 100
    # Reports at these many intervals after the start: one is written when a full
    # interval has passed since the start or the last write (1.05, then 2.1), then the end.
    for done, at in ((10, 0.5), (20, 1.05), (30, 1.5), (40, 1.95), (50, 2.1)):
        clock[0] = 1000.0 + at * PROGRESS_EVERY_SEC
        sink(done, total)
    sink(total, total)
    assert [float(d) for _, d in client.updates] == [20, 50, 100]
    assert sink.sent == (total, total)
