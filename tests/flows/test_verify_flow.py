"""The scheduled verification flow under Prefect's test harness, on real files: dumps
that are intact pass, a damaged one and a deleted one fail the run, each named."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from memdump.manifest import encode, manifest_path
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.signing import Signer, collector_signer, envelope, write_signature
from tests.helpers.elfgen import make_core, mixed_bytes
from tests.helpers.signing import trusting


def _dump(d: Path, i: int, when: datetime, signer: Signer) -> DumpRecord:
    raw = make_core([(0, mixed_bytes(256 * 1024, i))])
    gz = gzip.compress(raw, 1)
    path = d / f"vm-{i}_{i}.mem.gz"
    path.write_bytes(gz)
    doc = {"output": {"raw_sha256": hashlib.sha256(raw).hexdigest(),
                      "gz_sha256": hashlib.sha256(gz).hexdigest()}}  # fmt: skip
    manifest_path(path).write_bytes(encode(doc))
    # Signed by a trusted key (issue 15): only then is a dump `verified`.
    write_signature(manifest_path(path), envelope(doc, signer, file=manifest_path(path).name))
    return DumpRecord(
        when, f"vm-{i}", f"vm-{i}", hashlib.sha256(raw).hexdigest(), 1.0, len(gz), 1, 2, 3,
        str(path), hashlib.sha256(gz).hexdigest(), len(raw), "lab",
        manifest_sha256=hashlib.sha256(encode(doc)).hexdigest(),
    )  # fmt: skip


def test_verify_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.verify import verify_dumps

    monkeypatch.setenv("MEMDUMP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MEMDUMP_DUMP_DIR", str(tmp_path))  # verify reads only in here
    keys = trusting(Settings(data_dir=tmp_path), tmp_path)
    monkeypatch.setenv("MEMDUMP_TRUSTED_KEYS", str(keys.trusted_keys))
    signer = collector_signer(keys)
    store = SQLiteRecordStore(tmp_path / "records.db")
    now = datetime.now(UTC)
    recs = [_dump(tmp_path, i, now - timedelta(hours=i), signer) for i in range(4)]
    old = _dump(tmp_path, 9, now - timedelta(days=30), signer)  # outside the window: not read
    for r in [*recs, old]:
        store.add(r)

    state = verify_dumps(days=7, return_state=True)
    assert state.is_completed() and state.message == "4 dump(s) verified", state

    damaged = Path(recs[1].dump_path)
    data = bytearray(damaged.read_bytes())
    data[-20] ^= 0xFF
    damaged.write_bytes(data)
    Path(recs[2].dump_path).unlink()
    Path(old.dump_path).unlink()
    state = verify_dumps(days=7, return_state=True)
    assert state.is_failed(), state
    msg = str(state.message)
    assert msg.startswith("2 of 4 dump(s) not verified")
    assert f"{recs[1].dump_path}: mismatch" in msg and f"{recs[2].dump_path}: missing" in msg
