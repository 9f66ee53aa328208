"""Property-based API testing with schemathesis against /openapi.json (bounded): no 5xx,
every response matches the documented schema and status codes (so never a 422)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from api.main import create_app
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns

_tmp = Path(tempfile.mkdtemp(prefix="memdump-schemathesis-"))
atexit.register(shutil.rmtree, _tmp, True)
app = create_app(
    # schemathesis's ASGI client sends "Host: testserver".
    Settings(data_dir=_tmp, api={"trigger_min_interval_sec": 0, "allowed_hosts": ["testserver"]}),
    store=SQLiteRecordStore(_tmp / "r.db"),
    runs=FakeRuns(),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case: schemathesis.Case) -> None:
    case.call_and_validate()
