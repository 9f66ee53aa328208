"""The disk-space preflight fails a capture before the guest is paused."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from memdump.capture import capture
from memdump.errors import InsufficientSpaceError
from memdump.hypervisors.base import VMInfo, VMRef
from memdump.settings import Settings

Usage = namedtuple("Usage", "total used free")
REF = VMRef("hv", "vm1", "vm1")


class Driver:
    name = "hv"

    def __init__(self) -> None:
        self.dumped = False

    def snapshot(self, ref: VMRef) -> VMInfo:
        return VMInfo(ref, "uuid", "1", "running", 4 << 30, "host")

    def open_dump(self, ref: VMRef, **_: object) -> None:
        self.dumped = True  # would pause the guest
        raise AssertionError("the dump must not start")


def test_not_enough_space_fails_before_the_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "memdump.capture.shutil.disk_usage", lambda p: Usage(10 << 30, 9 << 30, 1 << 30)
    )
    d = Driver()
    with pytest.raises(InsufficientSpaceError) as ei:
        capture(d, REF, Settings(dump_dir=tmp_path))  # type: ignore[arg-type]
    assert not d.dumped and not ei.value.retryable
    assert ei.value.fields["needed_bytes"] == int((4 << 30) * 1.1)
    assert "not enough space" in str(ei.value)
