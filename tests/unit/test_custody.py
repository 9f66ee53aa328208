"""Issue 15, item 3: the custody log (memdump.custody): appended, hash-chained and signed;
a removed, edited or reordered entry is named by its index; a removed last entry is
caught against the other copy and the record; two appenders at once keep one chain; a
failed append waits in the outbox and never fails its caller; `memdump custody` exits
0/1/2."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import stat
from pathlib import Path
from typing import Any

import pytest

from memdump import custody
from memdump.cli.app import main
from memdump.settings import Settings
from memdump.signing import canonical, trusted_keys
from tests.helpers.signing import other_signer, trusting

MANIFEST_SHA = hashlib.sha256(b"the manifest").hexdigest()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps", collector_id="col-1")
    return trusting(s, tmp_path)


@pytest.fixture
def dump(settings: Settings) -> Path:
    d = settings.dump_dir / "hv"
    d.mkdir(parents=True, mode=0o700)
    path = d / "101_1700000000.mem.gz"
    path.write_bytes(b"dump")
    path.with_name("101_1700000000.manifest.json").write_bytes(b"the manifest")
    return path


def _targets(settings: Settings, dump: Path) -> custody.Targets:
    return custody.targets(settings, local_dump=dump, s3_key=None, manifest_sha256=MANIFEST_SHA)


def _log(settings: Settings, dump: Path, events: int = 4) -> list[bytes]:
    t = _targets(settings, dump)
    names = ["captured", "analysed", "verified", "verified", "verified"]
    for i in range(events):
        assert custody.record_event(settings, t, names[i], {"n": i})
    return custody.LocalLog(custody.log_path(dump)).read()


def _check(settings: Settings, lines: list[bytes]) -> custody.ChainCheck:
    return custody.check_chain(lines, trusted_keys(settings), MANIFEST_SHA)


def test_appended_entries_chain_from_the_manifest_and_are_signed(
    settings: Settings, dump: Path
) -> None:
    lines = _log(settings, dump)
    path = custody.log_path(dump)
    assert path.name == "101_1700000000.custody.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().endswith(b"\n") and len(lines) == 4
    docs = [json.loads(line) for line in lines]
    assert [d["index"] for d in docs] == [0, 1, 2, 3]
    assert docs[0]["prev"] == MANIFEST_SHA
    for a, b in zip(lines, docs[1:], strict=False):
        assert b["prev"] == hashlib.sha256(a).hexdigest()
    assert docs[0]["by"]["collector_id"] == "col-1"
    for line, doc in zip(lines, docs, strict=True):
        assert canonical(doc) == line  # one canonical JSON line per entry
    result = _check(settings, lines)
    assert result.ok, result.problems
    assert [e["event"] for e in result.entries] == ["captured", "analysed", "verified", "verified"]


def test_a_removed_entry_is_named(settings: Settings, dump: Path) -> None:
    lines = _log(settings, dump)
    result = _check(settings, [lines[0], lines[1], lines[3]])
    assert not result.ok
    assert [(p.index, p.kind) for p in result.problems] == [(2, "removed")]
    assert "entry 2 removed" in str(result.problems[0])


def test_a_removed_first_entry_is_named(settings: Settings, dump: Path) -> None:
    lines = _log(settings, dump)
    result = _check(settings, lines[1:])
    assert [(p.index, p.kind) for p in result.problems] == [(0, "removed")]
    assert "entry 0 removed" in result.problems[0].detail


def test_an_edited_entry_is_named(settings: Settings, dump: Path) -> None:
    lines = _log(settings, dump)
    doc = json.loads(lines[1])
    doc["details"]["n"] = 99
    edited = [lines[0], canonical(doc), lines[2], lines[3]]
    result = _check(settings, edited)
    kinds = [(p.index, p.kind) for p in result.problems]
    assert (1, "edited") in kinds  # its signature
    assert (2, "edited") in kinds  # and the next entry's prev
    assert "entry 1 was edited" in str([str(p) for p in result.problems])


def test_an_entry_re_signed_by_an_untrusted_key_is_named(
    settings: Settings, dump: Path, tmp_path: Path
) -> None:
    lines = _log(settings, dump)
    doc = json.loads(lines[3])
    forged = custody.make_entry(
        other_signer(tmp_path), 3, doc["prev"], "verified", {"n": 99}, doc["at"]
    )
    result = _check(settings, [*lines[:3], forged])
    assert [(p.index, p.kind) for p in result.problems] == [(3, "untrusted-key")]


def test_a_reordered_pair_is_named(settings: Settings, dump: Path) -> None:
    lines = _log(settings, dump)
    result = _check(settings, [lines[0], lines[2], lines[1], lines[3]])
    kinds = [(p.index, p.kind) for p in result.problems]
    assert kinds == [(1, "reordered"), (2, "reordered")], kinds
    assert "entry 2 at position 1" in result.problems[0].detail


def test_a_log_beside_another_manifest_is_caught(settings: Settings, dump: Path) -> None:
    lines = _log(settings, dump)
    result = custody.check_chain(lines, trusted_keys(settings), "ab" * 32)
    assert [(p.index, p.kind) for p in result.problems] == [(0, "removed")]


def test_a_removed_last_entry_is_caught_by_the_other_copy_and_the_record(
    settings: Settings, dump: Path
) -> None:
    """Truncation leaves a valid shorter chain: the chain alone cannot see it (stated in
    the module and README); the other copy and the record can."""
    t = _targets(settings, dump)
    custody.record_event(settings, t, "captured", {})
    custody.record_event(settings, t, "offloaded", {"uri": "s3://b/x.mem.gz"})
    custody.record_event(settings, t, "deleted", {"copy": "local"})
    lines = custody.LocalLog(custody.log_path(dump)).read()
    trusted = trusted_keys(settings)
    assert _check(settings, lines[:-1]).ok  # the chain alone: not caught
    copies = {"local": lines[:-1], "S3": lines}
    found = custody.check_copies(copies, trusted, MANIFEST_SHA)
    assert found["status"] == "broken"
    assert found["problems"][0]["kind"] == "truncated" and found["problems"][0]["index"] == 2
    row = {"s3_uri": "s3://b/x.mem.gz", "local_deleted_at": "2026-01-01T00:00:00"}
    alone = custody.check_copies({"local": lines[:-1]}, trusted, MANIFEST_SHA, row)
    assert [p["kind"] for p in alone["problems"]] == ["truncated"]
    assert "local copy was deleted" in alone["problems"][0]["detail"]
    twice = custody.check_copies({"local": lines[:1]}, trusted, MANIFEST_SHA, row)
    assert len(twice["problems"]) == 2  # neither the offload nor the deletion is logged
    whole = custody.check_copies({"local": lines}, trusted, MANIFEST_SHA, row)
    assert whole["status"] == "intact", whole


def _append_many(args: tuple[dict[str, Any], str, int]) -> None:
    settings_json, dump, n = args
    s = Settings.model_validate(settings_json)
    t = custody.targets(s, local_dump=Path(dump), s3_key=None, manifest_sha256=MANIFEST_SHA)
    for i in range(n):
        assert custody.record_event(s, t, "verified", {"i": i})


def test_two_appenders_at_once_keep_one_chain(settings: Settings, dump: Path) -> None:
    n = 40
    data = settings.model_dump(mode="json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=((data, str(dump), n),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = custody.LocalLog(custody.log_path(dump)).read()
    assert len(lines) == 2 * n
    result = _check(settings, lines)
    assert result.ok, result.problems[:3]


def test_a_failed_append_waits_in_the_outbox_and_is_appended_first_later(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = settings.dump_dir / "later" / "7_1.mem.gz"  # its directory does not exist yet
    t = custody.targets(settings, local_dump=gone, s3_key=None, manifest_sha256=MANIFEST_SHA)
    assert custody.record_event(settings, t, "captured", {"x": 1}) is False  # never raises
    assert "CUSTODY LOG NOT WRITTEN" in caplog.text
    (kept,) = custody.pending(settings)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    gone.parent.mkdir(parents=True, mode=0o700)
    assert custody.record_event(settings, t, "analysed", {}) is True
    assert custody.pending(settings) == []
    lines = custody.LocalLog(custody.log_path(gone)).read()
    docs = [json.loads(x) for x in lines]
    assert [d["event"] for d in docs] == ["captured", "analysed"]
    assert "late" in docs[0]["details"] and docs[0]["details"]["x"] == 1
    assert _check(settings, lines).ok


def _cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MEMDUMP_DUMP_DIR", str(settings.dump_dir))
    monkeypatch.setenv("MEMDUMP_SIGNING_KEY_FILE", str(settings.signing_key_file))
    monkeypatch.setenv("MEMDUMP_TRUSTED_KEYS", str(settings.trusted_keys))
    return main(["custody", "--no-record", *argv])


def test_memdump_custody_exits_0_intact_1_broken_naming_the_entry_2_error(
    settings: Settings, dump: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    lines = _log(settings, dump)
    assert _cli(settings, monkeypatch, str(dump)) == 0
    out = capsys.readouterr().out
    assert "captured" in out and "# intact: 4 entries" in out
    path = custody.log_path(dump)
    path.write_bytes(b"".join(x + b"\n" for x in [lines[0], lines[1], lines[3]]))
    assert _cli(settings, monkeypatch, str(dump)) == 1
    assert "BROKEN entry 2: removed: entry 2 removed" in capsys.readouterr().out
    doc = json.loads(lines[2])
    doc["details"]["n"] = 7
    path.write_bytes(b"".join(x + b"\n" for x in [lines[0], lines[1], canonical(doc), lines[3]]))
    assert _cli(settings, monkeypatch, "--json", str(dump)) == 1
    found = json.loads(capsys.readouterr().out)
    assert {"index": 2, "kind": "edited"}.items() <= found["problems"][0].items()
    assert _cli(settings, monkeypatch, str(dump.with_name("9_9.mem.gz"))) == 2
