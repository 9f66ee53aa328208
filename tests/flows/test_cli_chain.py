"""``memdump capture VM`` leaves what a trigger leaves (issue 13, item 2): both run the
engine's one chain (memdump.chain), so each gives a dump, its manifest, an S3 object
when S3 is configured and a record, of the same shape. The trigger runs as a real flow
under Prefect's test harness; S3 is a real moto server; only the driver is a fake (the
same small ELF core for both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memdump.hypervisors import VMRef
from memdump.records.sqlite import SQLiteRecordStore
from tests.helpers.capture_modes import REF, LiveDriver
from tests.helpers.moto import new_bucket

# What differs between two captures of the same VM: when, where, and what started it.
VARYING = {
    "timestamp",
    "duration_sec",
    "ctime",
    "mtime",
    "atime",
    "dump_path",
    "s3_uri",
    "s3_version_id",
    "manifest_sha256",
    "pause_ms",
    # the first capture has no previous one to compare with; the second has the first
    "chunks_changed",
    "chunks_compared_with",
    "chunks_changed_reason",
    # signed over the fields above (memdump.recordsig): the same for neither
    "record_signature",
}


@pytest.fixture
def one_vm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    s3, bucket = new_bucket(moto_url, "cli")
    for key, value in {
        "MEMDUMP_DATA_DIR": str(tmp_path / "data"),
        "MEMDUMP_DUMP_DIR": str(tmp_path / "dumps"),
        "MEMDUMP_ANALYSIS__ENABLED": "false",
        "MEMDUMP_ORCHESTRATION__CAPTURE_RETRY_DELAY_SEC": "0",
        "MEMDUMP_HYPERVISORS": '[{"name": "hv", "transport": "local", "capture_mode": "live"}]',
        "MEMDUMP_S3__ENDPOINT_URL": moto_url,
        "MEMDUMP_S3__BUCKET": bucket,
        "MEMDUMP_S3__ACCESS_KEY_ID": "t",
        "MEMDUMP_S3__SECRET_ACCESS_KEY": "t",
        "MEMDUMP_S3__KEEP_LOCAL": "false",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MEMDUMP_INVENTORY_FILE", raising=False)
    monkeypatch.delenv("MEMDUMP_CAPTURE_MODE", raising=False)
    driver = LiveDriver()

    def find(_drivers: list[Any], vm_id: str) -> tuple[Any, VMRef]:
        assert vm_id == REF.vmid
        return driver, REF

    # The flow's task finds the VM through the chain's resolver, the CLI through its own
    # lookup; both then run memdump.chain.run_chain.
    monkeypatch.setattr("memdump.chain.open_driver", lambda hv, ssh: driver)
    monkeypatch.setattr("memdump.chain.find", find)
    monkeypatch.setattr("memdump.cli.capture.open_drivers", lambda settings: [driver])
    monkeypatch.setattr("memdump.cli.capture.find", find)
    return {"s3": s3, "bucket": bucket, "db": tmp_path / "data" / "records.db"}


def _shape(doc: Any) -> Any:
    """The keys of a JSON document, nested (values left out)."""
    if isinstance(doc, dict):
        return {k: _shape(v) for k, v in doc.items()}
    return type(doc).__name__


def test_cli_capture_records_and_offloads_like_a_trigger(
    one_vm: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.capture import capture_vms
    from memdump import cli

    state = capture_vms(vm_ids=[REF.vmid], source="api", return_state=True)
    assert state.is_completed(), state
    capsys.readouterr()
    assert cli.main(["capture", REF.vmid]) == 0
    printed = json.loads(capsys.readouterr().out)

    rows = SQLiteRecordStore(one_vm["db"]).list(10, 0)
    assert len(rows) == 2  # the CLI's capture is recorded too
    cli_row, trigger_row = rows  # newest first
    assert printed["dump_path"] == cli_row["dump_path"]
    assert list(cli_row) == list(trigger_row)
    for key in cli_row:
        if key not in VARYING:
            assert cli_row[key] == trigger_row[key], key
    # Offloaded alike: the verified object replaces the local file, with its manifest.
    for row in (cli_row, trigger_row):
        assert row["dump_path"] == row["s3_uri"]
        assert row["dump_path"].startswith(f"s3://{one_vm['bucket']}/")
        assert row["local_path"] == row["collector"] == ""
    assert cli_row["dump_path"] != trigger_row["dump_path"]
    # The second capture is compared with the first, whose index is read from S3 (the
    # local copy is gone) by ranged GETs: the same image, no chunk changed.
    assert (trigger_row["chunks_changed"], cli_row["chunks_changed"]) == (None, 0)
    assert "no previous capture" in trigger_row["chunks_changed_reason"]
    assert cli_row["chunks_compared_with"] == trigger_row["dump_path"]
    cli_doc, trigger_doc = _manifest(one_vm, cli_row), _manifest(one_vm, trigger_row)
    assert cli_doc.pop("changes")["previous"]["dump_path"] == trigger_row["dump_path"]
    assert trigger_doc.pop("changes")["previous"] is None
    # What started each: the CLI, or the API through this flow run.
    assert cli_doc["capture"].pop("trigger") == {"source": "cli"}
    started_by = trigger_doc["capture"].pop("trigger")
    assert started_by == {"source": "api", "flow_run_id": str(state.state_details.flow_run_id)}
    assert _shape(cli_doc) == _shape(trigger_doc)
    assert list((Path(one_vm["db"]).parents[1] / "dumps").glob("*.mem.gz")) == []


def _manifest(one_vm: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    key = row["dump_path"].removeprefix(f"s3://{one_vm['bucket']}/")
    mkey = key.removesuffix(".mem.gz") + ".manifest.json"
    body = one_vm["s3"].get_object(Bucket=one_vm["bucket"], Key=mkey)["Body"].read()
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_cli_capture_keeps_a_record_the_store_cannot_take(
    one_vm: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from memdump import cli
    from memdump.records import open_recorder
    from memdump.settings import Settings
    from tests.helpers.stores import FlakyStore

    store = FlakyStore(one_vm["db"])
    store.down = True
    monkeypatch.setattr("memdump.records.open_store", lambda settings: store)
    assert cli.main(["capture", REF.vmid]) == 0  # the capture is complete; its record waits
    out, err = capsys.readouterr()
    assert "record kept in the outbox (depth 1)" in err
    recorder = open_recorder(Settings())
    assert recorder.outbox.state().depth == 1
    store.down = False
    assert recorder.replay() == 0
    assert [r["dump_path"] for r in store.list(10, 0)] == [json.loads(out)["dump_path"]]
