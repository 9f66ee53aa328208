"""Fake drivers for capture-mode tests (issue 12): a driver with a live mode that can be
told to refuse it (from open_dump or mid-stream, as the real drivers do), and a driver
that has no live mode at all. Both produce a small valid ELF core."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from memdump.errors import LiveCaptureUnsupportedError, MemdumpError
from memdump.hypervisors.base import VMInfo, VMRef
from tests.helpers.elfgen import make_core

REF = VMRef("hv", "vm1", "vm1")
CORE = make_core([(0, b"\x11" * 8192), (1 << 20, b"\x22" * 4096)])
PAUSED_CORE = CORE
# A live core: same layout, its own note (notes differ from a paused dump's).
LIVE_CORE = make_core([(0, b"\x11" * 8192), (1 << 20, b"\x22" * 4096)], note=b"L" * 64)
STREAM = b"QEVM" + b"\x00" * 100  # stands for the migration stream the core was made from
T0 = datetime(2026, 11, 29, 4, 0, 0, tzinfo=UTC)
WINDOW = (T0, T0 + timedelta(milliseconds=480))
LIVE_STATS: dict[str, Any] = {
    "mode": "live",
    "stream_sha256": hashlib.sha256(STREAM).hexdigest(),
    "stream_bytes": len(STREAM),
    "pages": {"normal": 3, "zero": 1, "early": 1},
    # as the qemu driver reports QEMU's final query-migrate and events
    "downtime_ms": 7,
    "pause_ms_events": 6.5,
    "setup_time_ms": 2,
    "total_time_ms": 480,
    "migration_status": "completed",
    "userfaultfd": "sysctl-window",
    "userfaultfd_window_ms": 3.5,
    "taint": ["custom-monitor"],
    "snapshot_instant": (T0 + timedelta(milliseconds=2)).isoformat(),
}
Refusal = Literal["open", "stream", "stream-chained", "none"]


class Source:
    """ELF bytes, with the attributes drivers give their sources."""

    def __init__(
        self,
        data: bytes,
        *,
        live: dict[str, Any] | None = None,
        refuse_at_end: bool = False,
        chained: bool = False,
    ) -> None:
        self.data, self.pos = data, 0
        self.pause_window = WINDOW
        self.staging = "fifo"
        # LiveCoreSource says "elf"; a paused driver names its dump tool.
        self.dump_format = "elf" if live is not None else "ELF64 core: fake"
        self.aborted = False
        self.refuse_at_end, self.chained = refuse_at_end, chained
        if live is not None:
            self.live = live

    def readinto(self, view: memoryview) -> int:
        out = self.data[self.pos : self.pos + len(view)]
        self.pos += len(out)
        view[: len(out)] = out
        return len(out)

    def close_ok(self) -> None:
        if not self.refuse_at_end:
            return
        refusal = LiveCaptureUnsupportedError(
            "live capture unsupported: QEMU said no", reason="background-snapshot is off"
        )
        if not self.chained:
            raise refusal
        # As a converter that reports the driver's refusal as the cause of its own error.
        raise MemdumpError("migration stream ended before it began") from refusal

    def abort(self) -> None:
        self.aborted = True


@dataclass(eq=False)  # hashable by identity, as real drivers
class LiveDriver:
    """open_dump takes a mode. ``refuse``: "open" (preflight refusal), "stream" (the
    script found it unsupported: the stream ends and close_ok raises), "stream-chained"
    (the same, wrapped by the converter), "none"."""

    refuse: Refusal = "none"
    kind: str = "fakelive"
    name: str = "hv"
    calls: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    def snapshot(self, ref: VMRef) -> VMInfo:
        return VMInfo(ref, "uuid-1", "1", "running", 1 << 20, "host", {"qemu": "7.2"}, T0)

    def open_dump(
        self,
        ref: VMRef,
        *,
        staging: Literal["fifo", "file"] = "fifo",
        margin: float = 1.1,
        mode: Literal["paused", "live"] = "paused",
        spill_dir: Path | None = None,
        buffer_bytes: int = 64 << 20,
        max_bandwidth: int | None = None,  # the real drivers' cap on a snapshot
    ) -> Source:
        self.calls.append(
            {
                "mode": mode,
                "staging": staging,
                "spill_dir": spill_dir,
                "buffer_bytes": buffer_bytes,
                "max_bandwidth": max_bandwidth,
            }
        )
        if mode == "paused":
            src = Source(PAUSED_CORE)
        elif self.refuse == "open":
            raise LiveCaptureUnsupportedError(
                "live capture unsupported on hv",
                reason="QEMU runs as libvirt-qemu and vm.unprivileged_userfaultfd is 0"
                " (set live_userfaultfd)",
            )
        elif self.refuse in ("stream", "stream-chained"):
            src = Source(b"", refuse_at_end=True, chained=self.refuse == "stream-chained")
        else:
            src = Source(LIVE_CORE, live=dict(LIVE_STATS))
        self.sources.append(src)
        return src

    def close(self) -> None:
        pass


@dataclass(eq=False)  # hashable by identity, as real drivers
class PausedOnlyDriver:
    """A driver from before live capture: open_dump knows staging and margin only."""

    kind: str = "fakepaused"
    name: str = "hv"
    calls: list[dict[str, Any]] = field(default_factory=list)

    def snapshot(self, ref: VMRef) -> VMInfo:
        return VMInfo(ref, "uuid-1", "1", "running", 1 << 20, "host", {}, T0)

    def open_dump(
        self, ref: VMRef, *, staging: Literal["fifo", "file"] = "fifo", margin: float = 1.1
    ) -> Source:
        self.calls.append({"staging": staging, "margin": margin})
        return Source(PAUSED_CORE)

    def close(self) -> None:
        pass
