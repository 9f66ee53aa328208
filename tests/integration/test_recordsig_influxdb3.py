"""Issue 15, item 2 (the record) in the InfluxDB 3 store, through the real influxdb3-python
client against the project's test server: the record's signature is kept as written and
still checks out on the row read back (the types the store returns sign the same bytes);
an edit written over the point (same series and time) is caught."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memdump import recordsig
from memdump.records.influxdb3 import TABLE, InfluxDB3RecordStore
from memdump.records.model import DumpRecord
from memdump.settings import InfluxDB3Settings, Settings
from memdump.signing import collector_signer
from tests.helpers.signing import trusting
from tests.influxdb3_server import InfluxDB3TestServer

TOKEN = "test-token"


@pytest.fixture
def cfg() -> Iterator[InfluxDB3Settings]:
    srv = InfluxDB3TestServer(host="127.0.0.1", port=0, token=TOKEN).start()
    yield InfluxDB3Settings(url=srv.url, database="memdump", token=TOKEN, timeout_sec=2)
    srv.stop()


def test_the_record_signature_survives_influxdb3(cfg: InfluxDB3Settings, tmp_path: Path) -> None:
    s = trusting(Settings(data_dir=tmp_path / "data"), tmp_path)
    trusted = frozenset({collector_signer(s).fingerprint})
    rec = DumpRecord(
        datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
        "vm-web-01",
        "101",
        "a" * 64,
        2.25,
        1000,
        1699520400,
        1699520405,
        1699520410,
        "/var/dumps/101.mem.gz",
        "b" * 64,
        4096,
        "lab",
        manifest_sha256="c" * 64,
        capture_mode="paused",
        pause_ms=12.5,
        chunks_changed=None,
    )
    signed = recordsig.sign(rec, collector_signer(s))
    store = InfluxDB3RecordStore(cfg)
    assert store.add(signed)
    (row,) = store.list(10, 0)
    assert row["record_signature"] == signed.record_signature
    assert recordsig.check(row, trusted).status == "valid"
    # A field overwritten in place (same series, same time: InfluxDB merges it into the
    # row, as anyone with the write token can) is caught.
    from influxdb_client_3 import Point, WritePrecision

    from memdump.records.influxdb3 import _ns

    p = (
        Point(TABLE)
        .tag("dom", rec.dom)
        .tag("vmid", rec.vmid)
        .field("dump_path", "/var/dumps/elsewhere.mem.gz")
        .time(_ns(signed.timestamp), WritePrecision.NS)
    )
    store._write(p)
    (row,) = store.list(10, 0)
    assert row["dump_path"] == "/var/dumps/elsewhere.mem.gz"
    assert recordsig.check(row, trusted).status == "bad-signature"
    assert row["record_signature"] == signed.record_signature  # the signature untouched
    store.close()
