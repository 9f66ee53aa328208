"""Issue 15, item 3 (the ``copied`` event): ``memdump copy`` (memdump.export) copies a
recorded dump with its manifest, signature and custody log into a directory (0600 files,
0700 directory), logs the copy in the original's custody log, and the copied log, which
ends with that entry, checks out against the copied manifest. A copy is never written
over an existing file; a dump that does not match its record is not copied and nothing
is logged; a hostile case reference is refused."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from memdump import custody
from memdump.cli.custody import cmd_custody
from memdump.errors import CopyRefusedError, InvalidIdentifierError
from memdump.export import copy_dump
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.signing import trusted_keys
from tests.helpers.signing import trusting
from tests.helpers.verify_dumps import Made, core, flip, guest_ram, write_dump


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps", collector_id="col-1")
    return trusting(s, tmp_path)


@pytest.fixture
def made(settings: Settings) -> Made:
    return write_dump(settings.dump_dir, core(guest_ram(1)), settings=settings)


def _row(settings: Settings, made: Made) -> dict[str, Any]:
    store = SQLiteRecordStore(settings.records_db)
    store.add(made.record)
    (row,) = store.list(10, 0)
    # The capture's own first entry, as the chain writes it.
    t = custody.targets_of(settings, row)
    assert custody.record_event(settings, t, "captured", {"sha256": row["sha256"]})
    return row


def test_a_copy_carries_its_evidence_and_is_logged(
    settings: Settings, made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = _row(settings, made)
    dest = tmp_path / "case" / "INC-42"
    done = copy_dump(row, settings, dest, case="INC-42")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    names = sorted(Path(p).name for p in done.files)
    stem = made.path.name.removesuffix(".mem.gz")
    assert names == sorted(
        [
            made.path.name,
            f"{stem}.manifest.json",
            f"{stem}.manifest.json.sig",
            f"{stem}.custody.jsonl",
        ]
    )
    for p in done.files:
        assert stat.S_IMODE(Path(p).stat().st_mode) == 0o600
    assert (dest / made.path.name).read_bytes() == made.path.read_bytes()
    assert (
        manifest_path(dest / made.path.name).read_bytes() == manifest_path(made.path).read_bytes()
    )
    # The original's log names the copy; the copied log is the original's, entry included.
    original = custody.LocalLog(custody.log_path(made.path)).read()
    last = json.loads(original[-1])
    assert last["event"] == "copied" and done.logged and done.log_entries == 2
    assert last["details"]["to"] == str((dest / made.path.name).resolve())
    assert last["details"]["case"] == "INC-42" and last["details"]["gz_sha256"] == row["gz_sha256"]
    copied = custody.LocalLog(dest / f"{stem}.custody.jsonl").read()
    assert copied == original
    genesis = row["manifest_sha256"]
    found = custody.check_copies({"copy": copied}, trusted_keys(settings), genesis, row)
    assert found["status"] == "intact", found
    # As the README says an examiner checks it: `memdump custody` of the copy.
    args = argparse.Namespace(dump=str(dest / made.path.name), json=True, no_record=True)
    assert cmd_custody(settings, args) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 2


def test_never_over_an_existing_copy(settings: Settings, made: Made, tmp_path: Path) -> None:
    row = _row(settings, made)
    dest = tmp_path / "case"
    first = copy_dump(row, settings, dest)
    before = {p: Path(p).read_bytes() for p in first.files}
    entries = len(custody.LocalLog(custody.log_path(made.path)).read())
    with pytest.raises(CopyRefusedError, match="exists already"):
        copy_dump(row, settings, dest)
    assert {p: Path(p).read_bytes() for p in first.files} == before  # untouched
    assert len(custody.LocalLog(custody.log_path(made.path)).read()) == entries  # not logged


def test_a_dump_that_does_not_match_its_record_is_not_copied(
    settings: Settings, made: Made, tmp_path: Path
) -> None:
    row = _row(settings, made)
    flip(made.path, made.path.stat().st_size // 2)
    dest = tmp_path / "case"
    with pytest.raises(CopyRefusedError, match="does not match its record"):
        copy_dump(row, settings, dest)
    assert list(dest.iterdir()) == []  # the partial copy removed
    assert len(custody.LocalLog(custody.log_path(made.path)).read()) == 1  # not logged


def test_a_hostile_case_reference_is_refused(
    settings: Settings, made: Made, tmp_path: Path
) -> None:
    row = _row(settings, made)
    with pytest.raises(InvalidIdentifierError):
        copy_dump(row, settings, tmp_path / "case", case="../x\n| evil |")
    assert not (tmp_path / "case").exists()


def test_a_dump_with_no_copy_left_is_not_copied(
    settings: Settings, made: Made, tmp_path: Path
) -> None:
    row = _row(settings, made)
    made.path.unlink()
    with pytest.raises(CopyRefusedError, match="no copy .* is left"):
        copy_dump(row, settings, tmp_path / "case")
    assert not (tmp_path / "case").exists()
