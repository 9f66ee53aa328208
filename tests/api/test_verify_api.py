"""Issue 11 item 9, the API side of /verify: a bound on verifications at once (429 past
it, with Retry-After) and background jobs the client polls (202 + GET /verify/{id})."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import api.routes
from api.main import create_app
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.verify import Verification
from tests.helpers.api import FakeRuns

BASE = "/api/memory-dumps"
PATH = "/var/dumps/101_1699520400.mem.gz"
GZ_SIZE = 5000


class GatedVerify:
    """Stands for memdump.verify.verify: each call waits until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0
        self.by: list[str] = []
        self.fail: Exception | None = None

    def __call__(self, record: Any, settings: Settings, *, by: str) -> Verification:
        self.calls += 1
        self.by.append(by)
        self.entered.release()
        assert self.gate.wait(30), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        return Verification("verified", str(record["dump_path"]), "hashes match", {}, 0.25)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedVerify]:
    g = GatedVerify()
    monkeypatch.setattr(api.routes, "verify", g)
    yield g
    g.gate.set()  # never leave a request thread waiting


def _client(tmp_path: Path, **settings: Any) -> TestClient:
    store = SQLiteRecordStore(tmp_path / "r.db")
    store.add(
        DumpRecord(
            datetime(2025, 11, 11, 10, 30, tzinfo=UTC),
            "vm-web-01",
            "101",
            "0" * 64,
            5.2,
            GZ_SIZE,
            1,
            2,
            3,
            PATH,
            "1" * 64,
            4096,
            "lab",
        )
    )
    s = Settings(data_dir=tmp_path, **settings)
    return TestClient(create_app(s, store=store, runs=FakeRuns()), base_url="http://localhost")


def _post(c: TestClient, **body: Any) -> Any:
    return c.post(f"{BASE}/verify", json={"dump_path": PATH, **body})


def _in_thread(c: TestClient, out: list[Any], **body: Any) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(_post(c, **body)))
    t.start()
    return t


def test_past_the_bound_a_verification_gets_429(tmp_path: Path, gated: GatedVerify) -> None:
    c = _client(tmp_path, verify={"max_concurrent": 2})
    first: list[Any] = []
    threads = [_in_thread(c, first), _in_thread(c, first)]
    for _ in threads:  # both hold a slot, inside verify
        assert gated.entered.acquire(timeout=30)
    r = _post(c)
    assert r.status_code == 429
    assert list(r.json()) == ["detail"] and "at most 2 at once" in r.json()["detail"]
    assert int(r.headers["retry-after"]) > 0
    assert gated.calls == 2  # the refused one never started reading
    gated.gate.set()
    for t in threads:
        t.join(30)
    assert [x.status_code for x in first] == [200, 200]
    assert _post(c).status_code == 200  # slots are given back


def test_slot_is_given_back_after_an_error(tmp_path: Path, gated: GatedVerify) -> None:
    c = _client(tmp_path, verify={"max_concurrent": 1})
    gated.gate.set()
    gated.fail = OSError("disk on fire")
    r = _post(c)
    assert r.status_code == 500 and "disk on fire" in r.json()["detail"]
    gated.fail = None
    assert _post(c).status_code == 200


def _poll(c: TestClient, location: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = c.get(location)
        assert r.status_code == 200
        if r.json()["state"] != "running":
            return dict(r.json())
        time.sleep(0.05)
    raise AssertionError("job still running")


def test_background_job_when_asked(tmp_path: Path, gated: GatedVerify) -> None:
    c = _client(tmp_path)
    r = _post(c, wait=False)
    assert r.status_code == 202
    job = r.json()
    assert job["state"] == "running" and job["result"] is None and job["dump_path"] == PATH
    assert r.headers["location"] == f"{BASE}/verify/{job['job_id']}"
    assert c.get(r.headers["location"]).json()["state"] == "running"
    gated.gate.set()
    done = _poll(c, r.headers["location"])
    assert done["state"] == "done" and done["detail"] is None and done["finished_at"]
    # The result is exactly what a waiting request gets.
    inline = _post(c, wait=True)
    assert inline.status_code == 200 and done["result"] == inline.json()
    # Both say who asked, for the custody log's "verified" entry (issue 15).
    assert gated.by == ["api", "api"]
    # Issue 15: the manifest's signature status and then its RFC 3161 timestamp's come
    # last, beyond the first version.
    assert list(inline.json()) == [
        "status",
        "dump_path",
        "detail",
        "checks",
        "seconds",
        "signature",
        "timestamp",
        "custody",
        "object_lock",  # the S3 copy's Object Lock (issue 15, item 5)
    ]


def test_large_dump_goes_to_the_background_unless_told_to_wait(
    tmp_path: Path, gated: GatedVerify
) -> None:
    gated.gate.set()
    c = _client(tmp_path, verify={"background_bytes": GZ_SIZE - 1})
    assert _post(c).status_code == 202
    assert _post(c, wait=True).status_code == 200
    c = _client(tmp_path, verify={"background_bytes": GZ_SIZE})
    assert _post(c).status_code == 200


def test_background_jobs_count_against_the_bound(tmp_path: Path, gated: GatedVerify) -> None:
    c = _client(tmp_path, verify={"max_concurrent": 1})
    r = _post(c, wait=False)
    assert r.status_code == 202
    assert gated.entered.acquire(timeout=30)
    assert _post(c).status_code == 429
    assert _post(c, wait=False).status_code == 429
    gated.gate.set()
    assert _poll(c, r.headers["location"])["state"] == "done"
    assert _post(c).status_code == 200


def test_failed_background_job_says_why(tmp_path: Path, gated: GatedVerify) -> None:
    c = _client(tmp_path)
    gated.fail = OSError("bucket gone")
    gated.gate.set()
    r = _post(c, wait=False)
    done = _poll(c, r.headers["location"])
    assert done["state"] == "error" and done["result"] is None
    assert done["detail"] == "Error verifying dump: bucket gone"


@pytest.mark.parametrize("job_id", ["0" * 32, "deadbeef"])
def test_unknown_job_is_404(tmp_path: Path, job_id: str) -> None:
    r = _client(tmp_path).get(f"{BASE}/verify/{job_id}")
    assert r.status_code == 404 and list(r.json()) == ["detail"]


def test_only_the_newest_finished_jobs_are_kept(tmp_path: Path, gated: GatedVerify) -> None:
    gated.gate.set()
    c = _client(tmp_path, verify={"jobs_kept": 2})
    locations = []
    for _ in range(4):
        r = _post(c, wait=False)
        _poll(c, r.headers["location"])
        locations.append(r.headers["location"])
    assert [c.get(loc).status_code for loc in locations] == [404, 404, 200, 200]


def test_openapi_documents_verify_extras(tmp_path: Path) -> None:
    spec = _client(tmp_path).get("/openapi.json").json()
    post = spec["paths"][f"{BASE}/verify"]["post"]
    assert {"200", "202", "400", "404", "429", "500"} <= set(post["responses"])
    assert "wait" in spec["components"]["schemas"]["VerifyRequest"]["properties"]
    get = spec["paths"][f"{BASE}/verify/{{job_id}}"]["get"]
    assert {"200", "404"} <= set(get["responses"])
    assert "VerifyJobResponse" in spec["components"]["schemas"]
