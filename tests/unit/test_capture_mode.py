"""Capture modes (issue 12, items 1 and 4): which mode a capture uses, the live call the
driver gets, and the fallback to a paused capture with its reason in the manifest, the
record and the log, never silently."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

import memdump.capture as engine
from memdump.capture import capture
from memdump.errors import InsufficientSpaceError, MigrationStreamError
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import HypervisorConfig, Settings
from tests.helpers.capture_modes import (
    LIVE_CORE,
    PAUSED_CORE,
    REF,
    STREAM,
    LiveDriver,
    PausedOnlyDriver,
    Source,
)

USERFAULTFD_REASON = (
    "QEMU runs as libvirt-qemu and vm.unprivileged_userfaultfd is 0 (set live_userfaultfd)"
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only what each test passes: not the lab's inventory or an operator's mode.
    for name in ("MEMDUMP_INVENTORY_FILE", "MEMDUMP_CAPTURE_MODE", "MEMDUMP_HYPERVISORS"):
        monkeypatch.delenv(name, raising=False)


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",  # its signing key too, not the repository's .data
        dump_dir=tmp_path / "dumps",
        analysis={"enabled": False},
        collector_id="c1",
        **kw,
    )


def hv(mode: str | None) -> HypervisorConfig:
    return HypervisorConfig.model_validate(
        {"name": "hv", "transport": "local", "capture_mode": mode}
    )


def read_manifest(path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest_path(Path(path)).read_bytes())
    return data


def files(s: Settings) -> list[str]:
    return sorted(p.suffix for p in s.dump_dir.iterdir())


# -- which mode ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("global_mode", "hv_mode", "want"),
    [
        ("paused", None, "paused"),
        ("live", None, "live"),  # the hypervisor follows the global mode
        ("paused", "live", "live"),  # ... unless its own is set
        ("live", "paused", "paused"),
    ],
)
def test_mode_per_hypervisor_else_global(
    tmp_path: Path, global_mode: str, hv_mode: str | None, want: str
) -> None:
    s = settings(tmp_path, capture_mode=global_mode, hypervisors=[hv(hv_mode)])
    assert engine.capture_mode(s, "hv") == want
    d = LiveDriver()
    cap = capture(d, REF, s)  # type: ignore[arg-type]
    assert [c["mode"] for c in d.calls] == [want]
    assert cap.mode == cap.mode_requested == cap.record.capture_mode == want
    assert cap.record.live_fallback_reason == "" and cap.fallback_reason == ""


def test_mode_argument_overrides_the_configuration(tmp_path: Path) -> None:
    s = settings(tmp_path, capture_mode="paused", hypervisors=[hv("paused")])
    d = LiveDriver()
    assert capture(d, REF, s, mode="live").mode == "live"  # type: ignore[arg-type]
    s = settings(tmp_path, capture_mode="live")
    assert capture(d, REF, s, mode="paused").mode == "paused"  # type: ignore[arg-type]
    assert [c["mode"] for c in d.calls] == ["live", "paused"]


def test_hypervisor_entry_given_by_the_caller(tmp_path: Path) -> None:
    # A driver opened from a config outside Settings' inventory.
    d = LiveDriver()
    cap = capture(d, REF, settings(tmp_path), hv=hv("live"))  # type: ignore[arg-type]
    assert cap.mode == "live"


# -- live ------------------------------------------------------------------------------


def test_live_capture_gets_the_live_call_and_records_it(tmp_path: Path) -> None:
    s = settings(
        tmp_path, capture_mode="live", live_buffer_bytes=8 << 20, live_max_bandwidth_bytes=1 << 28
    )
    d = LiveDriver()
    cap = capture(d, REF, s)  # type: ignore[arg-type]
    (call,) = d.calls
    assert call == {
        "mode": "live",
        "staging": "fifo",
        "spill_dir": s.dump_dir.resolve(),
        "buffer_bytes": 8 << 20,
        "max_bandwidth": 1 << 28,
    }
    rec = cap.record
    assert rec.sha256 == hashlib.sha256(LIVE_CORE).hexdigest()
    assert (rec.capture_mode, rec.live_fallback_reason, rec.pause_ms) == ("live", "", 7.0)
    m = read_manifest(rec.dump_path)
    c = m["capture"]
    assert m["manifest_version"] == 3
    assert (c["mode_requested"], c["mode"], c["fallback_reason"]) == ("live", "live", None)
    assert c["pause_ms"] == 7.0
    assert c["format"] == f"ELF64 core: {engine.LIVE_FORMAT}"
    live = c["live"]
    # The acquisition hash (of the migration stream) beside the ELF's.
    assert live["acquisition_sha256"] == hashlib.sha256(STREAM).hexdigest()
    assert m["output"]["raw_sha256"] == rec.sha256 != live["acquisition_sha256"]
    assert live["stream_bytes"] == len(STREAM)
    assert live["pages"] == {"normal": 3, "zero": 1, "early": 1}
    assert (live["downtime_ms"], live["setup_ms"], live["total_ms"]) == (7, 2, 480)
    assert live["pause_ms_events"] == 6.5
    assert live["userfaultfd"] == "sysctl-window" and live["userfaultfd_window_ms"] == 3.5
    assert live["taint"] == ["custom-monitor"]
    assert live["snapshot_at"] == "2026-11-29T04:00:00.002000+00:00"
    assert live["pause_window"] == {
        "from": "2026-11-29T04:00:00.000000Z",
        "to": "2026-11-29T04:00:00.480000Z",
    }
    assert live["details"]["migration_status"] == "completed"


# -- fallback --------------------------------------------------------------------------


def test_refused_at_open_falls_back_to_paused_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings(tmp_path, capture_mode="live")
    d = LiveDriver(refuse="open")
    with caplog.at_level(logging.WARNING, logger="memdump.capture"):
        cap = capture(d, REF, s)  # type: ignore[arg-type]
    assert [c["mode"] for c in d.calls] == ["live", "paused"]
    rec = cap.record
    assert rec.sha256 == hashlib.sha256(PAUSED_CORE).hexdigest()
    assert (rec.capture_mode, rec.live_fallback_reason) == ("paused", USERFAULTFD_REASON)
    assert rec.pause_ms == 480.0  # the paused dump's window
    c = read_manifest(rec.dump_path)["capture"]
    assert (c["mode_requested"], c["mode"]) == ("live", "paused")
    assert c["fallback_reason"] == USERFAULTFD_REASON and c["live"] is None
    assert c["format"] == "ELF64 core: fake"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert USERFAULTFD_REASON in warning.getMessage() and "paused" in warning.getMessage()
    assert files(s) == [".gz", ".json", ".sig"]  # one dump, its manifest and signature

    # The reason reaches the record store.
    store = SQLiteRecordStore(tmp_path / "records.db")
    store.add(rec)
    (row,) = store.list(10, 0)
    assert (row["capture_mode"], row["live_fallback_reason"], row["pause_ms"]) == (
        "paused",
        USERFAULTFD_REASON,
        480.0,
    )


@pytest.mark.parametrize("refuse", ["stream", "stream-chained"])
def test_refused_by_the_hypervisor_script_falls_back(tmp_path: Path, refuse: Any) -> None:
    # write_dump raises it: the live source is torn down, its .part removed.
    s = settings(tmp_path, capture_mode="live")
    d = LiveDriver(refuse=refuse)
    cap = capture(d, REF, s)  # type: ignore[arg-type]
    assert [c["mode"] for c in d.calls] == ["live", "paused"]
    assert d.sources[0].aborted
    assert cap.record.capture_mode == "paused"
    assert cap.record.live_fallback_reason == "background-snapshot is off"
    assert read_manifest(cap.record.dump_path)["capture"]["fallback_reason"] == (
        "background-snapshot is off"
    )
    assert files(s) == [".gz", ".json", ".sig"]


def test_driver_without_live_mode_falls_back(tmp_path: Path) -> None:
    s = settings(tmp_path, hypervisors=[hv("live")])
    d = PausedOnlyDriver()
    cap = capture(d, REF, s)  # type: ignore[arg-type]
    assert d.calls == [{"staging": "fifo", "margin": s.disk_space_margin}]
    assert cap.record.capture_mode == "paused"
    assert cap.record.live_fallback_reason == "driver fakepaused has no live mode"
    c = read_manifest(cap.record.dump_path)["capture"]
    assert (c["mode_requested"], c["mode"]) == ("live", "paused")
    assert c["fallback_reason"] == "driver fakepaused has no live mode"


@pytest.mark.parametrize(
    ("free_mib", "used"),
    [(1, None), (1.2, "paused"), (2.2, "live")],  # the guest has 1 MiB; margin 1.1
)
def test_live_needs_room_for_the_spill_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_mib: float, used: str | None
) -> None:
    """A busy guest can make the converter spill up to its whole memory into dump_dir:
    with room for the image but not for that, the capture is paused, with the reason;
    without room for the image, it is refused before the guest is touched."""
    s = settings(tmp_path, capture_mode="live")
    s.dump_dir.mkdir(mode=0o700)
    real = engine.shutil.disk_usage(s.dump_dir)
    free = int(free_mib * (1 << 20))
    monkeypatch.setattr(
        engine.shutil, "disk_usage", lambda _p: type(real)(real.total, real.used, free)
    )
    d = LiveDriver()
    if used is None:
        with pytest.raises(InsufficientSpaceError):
            capture(d, REF, s)  # type: ignore[arg-type]
        assert d.calls == []
        return
    cap = capture(d, REF, s)  # type: ignore[arg-type]
    assert [c["mode"] for c in d.calls] == [used]
    assert cap.record.capture_mode == used
    if used == "paused":
        assert "spill file" in cap.record.live_fallback_reason
        assert read_manifest(cap.record.dump_path)["capture"]["fallback_reason"] == (
            cap.record.live_fallback_reason
        )
    else:
        assert cap.record.live_fallback_reason == ""


def test_other_live_errors_are_errors_not_fallbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings(tmp_path, capture_mode="live")
    d = LiveDriver()

    def broken(self: Source) -> None:
        raise MigrationStreamError("page sent twice", offset=4096)

    monkeypatch.setattr(Source, "close_ok", broken)
    with pytest.raises(MigrationStreamError):
        capture(d, REF, s)  # type: ignore[arg-type]
    assert [c["mode"] for c in d.calls] == ["live"]  # no second capture
    assert list(s.dump_dir.iterdir()) == []


# -- paused, as before -----------------------------------------------------------------


def test_live_is_the_default_and_a_driver_without_it_says_so(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert s.capture_mode == "live"
    cap = capture(PausedOnlyDriver(), REF, s)  # type: ignore[arg-type]
    rec = cap.record
    assert (cap.mode_requested, rec.capture_mode) == ("live", "paused")
    assert rec.live_fallback_reason == "driver fakepaused has no live mode"
    assert read_manifest(rec.dump_path)["capture"]["fallback_reason"] == rec.live_fallback_reason


def test_paused_capture_is_unchanged(tmp_path: Path) -> None:
    s = settings(tmp_path, capture_mode="paused")
    d = PausedOnlyDriver()  # open_dump without a mode argument: called as before
    cap = capture(d, REF, s)  # type: ignore[arg-type]
    assert d.calls == [{"staging": "fifo", "margin": s.disk_space_margin}]
    rec = cap.record
    assert rec.sha256 == hashlib.sha256(PAUSED_CORE).hexdigest()
    assert (rec.capture_mode, rec.live_fallback_reason, rec.pause_ms) == ("paused", "", 480.0)
    c = read_manifest(rec.dump_path)["capture"]
    assert (c["mode_requested"], c["mode"], c["fallback_reason"], c["live"]) == (
        "paused",
        "paused",
        None,
        None,
    )
    assert c["pause_window_sec"] == 0.48 and c["pause_ms"] == 480.0


# -- memdump capture --mode ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "refuse", "want", "stderr"),
    [
        (["--mode", "live"], "none", "live", ""),
        (["--mode", "live"], "open", "paused", "captured paused, not live: QEMU runs as"),
        (["--mode", "paused"], "none", "paused", ""),
        ([], "none", "live", ""),  # no option: the hypervisor's capture_mode
    ],
)
def test_cli_mode_option(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    refuse: Any,
    want: str,
    stderr: str,
) -> None:
    from memdump import cli
    from memdump.cli import capture as capture_command

    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("MEMDUMP_DUMP_DIR", str(tmp_path / "dumps"))
    monkeypatch.setenv("MEMDUMP_ANALYSIS__ENABLED", "false")
    monkeypatch.setenv(
        "MEMDUMP_HYPERVISORS", '[{"name": "hv", "transport": "local", "capture_mode": "live"}]'
    )
    d = LiveDriver(refuse=refuse)
    monkeypatch.setattr(capture_command, "open_drivers", lambda settings: [d])
    monkeypatch.setattr(capture_command, "find", lambda drivers, vm_id: (d, REF))
    assert cli.main(["capture", *argv, "vm1"]) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["capture_mode"] == want and d.calls[-1]["mode"] == want
    assert (stderr in err) if stderr else err == ""
    if stderr:
        assert rec["live_fallback_reason"] == USERFAULTFD_REASON


def test_cli_refuses_an_unknown_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from memdump import cli

    with pytest.raises(SystemExit) as ei:
        cli.main(["capture", "--mode", "frozen", "vm1"])
    assert ei.value.code == 2 and "invalid choice: 'frozen'" in capsys.readouterr().err
