"""/verify reads only what lies in the dump directory (issue 11, item 10): a record
pointing at another file is refused, and nothing about that file (size, hash) leaks."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient
from isal import igzip

from api.main import create_app
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings

BASE = "/api/memory-dumps"


def test_a_record_pointing_outside_the_dump_dir_is_refused(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    secret = tmp_path / "101_1699520400.mem.gz"  # a dump-like name, outside the dump dir
    body = gzip.compress(b"root:secret-hash:19000:0:99999:7:::\n" * 7)
    secret.write_bytes(body)
    gz_sha = hashlib.sha256(body).hexdigest()
    raw_sha = hashlib.sha256(igzip.decompress(body)).hexdigest()
    store = SQLiteRecordStore(tmp_path / "r.db")
    # A forged record (anyone with write access to the record store could add it).
    store.add(
        DumpRecord(
            datetime.now(UTC),
            "vm",
            "101",
            "0" * 64,
            1.0,
            1,
            1,
            2,
            3,
            str(secret),
            "0" * 64,
            1,
            "lab",
        )  # fmt: skip
    )
    settings = Settings(data_dir=tmp_path, dump_dir=dumps)
    client = TestClient(create_app(settings, store=store), base_url="http://localhost")
    r = client.post(f"{BASE}/verify", json={"dump_path": str(secret)})
    assert r.status_code == 403 and "refused" in r.json()["detail"].lower(), r.text
    for leak in (gz_sha, raw_sha, str(len(body)), str(len(igzip.decompress(body)))):
        assert leak not in r.text
    assert secret.read_bytes() == body
