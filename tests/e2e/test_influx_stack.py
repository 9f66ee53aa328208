"""The stack with InfluxDB 3 as the record store: records go there, and while it is down
captures still complete, their records wait in the outbox and arrive once it is back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.helpers.stack import Stack, lab_inventory, running_stack
from tests.influxdb3_server import InfluxDB3TestServer

pytestmark = pytest.mark.lab

BASE = "/api/memory-dumps"
TOKEN = "e2e-token"


@pytest.fixture(scope="module")
def influx() -> Iterator[InfluxDB3TestServer]:
    srv = InfluxDB3TestServer(host="127.0.0.1", port=0, token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def istack(
    influx: InfluxDB3TestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    inv = lab_inventory()
    with running_stack(
        tmp_path_factory.mktemp("istack"),
        inv,
        record_store="influxdb3",
        influxdb3__url=influx.url,
        influxdb3__token=TOKEN,
        influxdb3__timeout_sec="2",
        outbox_replay_sec="1",
    ) as st:
        yield st


def test_records_in_influx_and_nothing_lost_in_an_outage(
    istack: Stack, influx: InfluxDB3TestServer
) -> None:
    code, _ = istack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-db-01"]})
    assert code == 200 and istack.wait_status()["status"] == "completed"
    _, recs = istack.call("GET", f"{BASE}/records")
    assert [r["vmid"] for r in recs["records"]] == ["vm-db-01"]

    influx.stop()
    try:
        code, _ = istack.call("POST", f"{BASE}/trigger", {"vm_ids": ["vm-web-01"]})
        assert code == 200
        status = istack.wait_status()
        assert status["status"] == "completed", status  # the capture is complete
        code, body = istack.call("GET", f"{BASE}/records")
        assert code == 500 and body["detail"].startswith("Error fetching records: ")
        _, box = istack.call("GET", f"{BASE}/outbox")
        assert box["depth"] == 1 and box["last_error"]
    finally:
        influx.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, box = istack.call("GET", f"{BASE}/outbox")
        if box["depth"] == 0:
            break
        time.sleep(0.5)
    assert box["depth"] == 0
    _, recs = istack.call("GET", f"{BASE}/records")
    assert [r["vmid"] for r in recs["records"]] == ["vm-web-01", "vm-db-01"]
    _, stats = istack.call("GET", f"{BASE}/stats")
    assert stats["total_dumps"] == 2
