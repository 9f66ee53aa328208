"""The InfluxDB 3 test server, driven by the real influxdb3-python client where it can be."""

from __future__ import annotations

import gzip
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import urllib3
from influxdb_client_3 import InfluxDBClient3, Point, WritePrecision, flight_client_options
from influxdb_client_3.exceptions import (
    InfluxDB3ClientQueryError,
    InfluxDBError,
    InfluxDBPartialWriteError,
)

from tests.influxdb3_server import InfluxDB3TestServer
from tests.influxdb3_server.lineprotocol import FieldType, LineProtocolError, parse_line

TOKEN = "test-token"  # noqa: S105 - the fixture server's token
WRONG_TOKEN = "wrong"  # noqa: S105
REPO = Path(__file__).resolve().parents[2]
# A client that gives up quickly and reconnects quickly after an outage (see test_stop_start).
FAST_GRPC = flight_client_options(
    generic_options=[
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]
)


@pytest.fixture(scope="module")
def srv() -> Iterator[InfluxDB3TestServer]:
    server = InfluxDB3TestServer(token=TOKEN).start()
    yield server
    server.stop()


_DB_NUMBERS = itertools.count()


@pytest.fixture
def db(request: pytest.FixtureRequest) -> str:
    """A database of its own for each test, since the server is shared."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))
    return f"{next(_DB_NUMBERS)}-{name}"[:64]


@pytest.fixture
def client(srv: InfluxDB3TestServer, db: str) -> Iterator[InfluxDBClient3]:
    c = InfluxDBClient3(
        host=srv.url, token=TOKEN, database=db, write_timeout=5_000, query_timeout=5_000
    )
    yield c
    c.close()


def raw(
    srv: InfluxDB3TestServer,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
) -> tuple[int, bytes]:
    all_headers = {"Authorization": f"Bearer {token}"} if token else {}
    all_headers.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def rows(client: InfluxDBClient3, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Query rows with `time` as integer nanoseconds (no pandas needed for ns times)."""
    table = client.query(sql, language="sql", query_parameters=params or None)
    if "time" in table.column_names:
        i = table.column_names.index("time")
        table = table.set_column(i, "time", table.column("time").cast(pa.int64()))
    return table.to_pylist()


# -- line protocol --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "measurement", "tags", "fields", "timestamp"),
    [
        ("m f=1", "m", {}, {"f": (FieldType.FLOAT, 1.0)}, None),
        (
            r"my\ m\,x,t\ k\=\,=v\ a\,l\=ue f\,\=\ k=-1.5e3 -12",
            "my m,x",
            {"t k=,": "v a,l=ue"},
            {"f,= k": (FieldType.FLOAT, -1500.0)},
            -12,
        ),
        (
            r'm s="q\"b\\s\n",i=-3i,u=3u,t=t,T=TRUE,f=False,e=""',
            "m",
            {},
            {
                "s": (FieldType.STRING, 'q"b\\s\\n'),
                "i": (FieldType.INTEGER, -3),
                "u": (FieldType.UINTEGER, 3),
                "t": (FieldType.BOOLEAN, True),
                "T": (FieldType.BOOLEAN, True),
                "f": (FieldType.BOOLEAN, False),
                "e": (FieldType.STRING, ""),
            },
            None,
        ),
        # A backslash before a character that needs no escape stays literally.
        (r"a\b,t=x\y f=1i 5", r"a\b", {"t": r"x\y"}, {"f": (FieldType.INTEGER, 1)}, 5),
        (
            'mé,tâg=🚀 fïeld="ünï 🚀" 1',
            "mé",
            {"tâg": "🚀"},
            {"fïeld": (FieldType.STRING, "ünï 🚀")},
            1,
        ),
        ("m f=1,", "m", {}, {"f": (FieldType.FLOAT, 1.0)}, None),  # upstream quirk
    ],
)
def test_parse_line(
    line: str, measurement: str, tags: dict[str, str], fields: dict[str, Any], timestamp: int | None
) -> None:
    parsed = parse_line(line)
    assert (parsed.measurement, parsed.tags, parsed.fields, parsed.timestamp) == (
        measurement,
        tags,
        fields,
        timestamp,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("measurement", "Expected at least one space character, got end of input"),
        (",t=1 f=1", "Invalid measurement was provided"),
        ("m,t f=1", "Tag set malformed: could not find equals sign in `t f=1`"),
        ("m, t=1 f=1", "Expected tag key, got ` t=1 f=1`"),
        ("m,t= f=1", "Expected tag value, got ` f=1`"),
        ("m,t=1,t=2 f=1", "Must not contain duplicate tags, but `t` was repeated"),
        ("m f=", "No fields were provided"),
        ('m f="open', "No fields were provided"),
        ("m f=1,g=2,h=", "Could not parse entire line. Found trailing content: `,h=`"),
        ("m f=tru", "Could not parse entire line. Found trailing content: `ru`"),
        ("m f=1 ", "Could not parse entire line. Found trailing content: ` `"),
        ("m f=99999999999999999999i", "Unable to parse integer value `99999999999999999999`"),
        ("m f=1 99999999999999999999", "Unable to parse timestamp value `99999999999999999999`"),
        ("m\\", "Measurements, tag keys and values, and field keys may not end with a backslash"),
    ],
)
def test_parse_line_errors_are_influxdbs(line: str, message: str) -> None:
    with pytest.raises(LineProtocolError) as e:
        parse_line(line)
    assert str(e.value) == message


# -- writes through the client --------------------------------------------------------------


def test_escaping_round_trips_through_the_client(client: InfluxDBClient3) -> None:
    name = "mem dumps,x=1"
    tag_key, tag_value = "vm id,=x", "vm 101,a=b\\c ü"
    field_key = "dump path,=x"
    text = 'say "hi" \\ back\\slash \\" ünï 🚀\nsecond line'
    point = (
        Point(name)
        .tag(tag_key, tag_value)
        .field(field_key, text)
        .field("n", 7)
        .time(1_700_000_000_123_456_789, WritePrecision.NS)
    )
    client.write(record=point)
    got = rows(client, 'SELECT * FROM "mem dumps,x=1"')
    assert got == [
        {"dump path,=x": text, "n": 7, "time": 1_700_000_000_123_456_789, tag_key: tag_value}
    ]


def test_raw_line_protocol_with_comments_blank_lines_and_multiline_strings(
    client: InfluxDBClient3,
) -> None:
    body = '# comment\n\nm,t=a f="one\ntwo" 1\n   \nm,t=b f="x" 2\n'
    client.write(record=body)
    assert rows(client, "SELECT t, f, time FROM m ORDER BY time") == [
        {"t": "a", "f": "one\ntwo", "time": 1},
        {"t": "b", "f": "x", "time": 2},
    ]


@pytest.mark.parametrize("use_v2_api", [True, False])
@pytest.mark.parametrize(
    ("precision", "value"),
    [
        (WritePrecision.S, 1_700_000_000),
        (WritePrecision.MS, 1_700_000_000_123),
        (WritePrecision.US, 1_700_000_000_123_456),
        (WritePrecision.NS, 1_700_000_000_123_456_789),
    ],
)
def test_precisions_store_nanoseconds(
    client: InfluxDBClient3, precision: str, value: int, use_v2_api: bool
) -> None:
    client.write(record=f"p f=1 {value}", write_precision=precision, use_v2_api=use_v2_api)
    scale = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[precision]
    assert rows(client, "SELECT time FROM p") == [{"time": value * scale}]


def test_v3_precision_names_and_auto_detection(srv: InfluxDB3TestServer, db: str) -> None:
    for precision, ts in [
        ("second", 1_700_000_001),
        ("s", 1_700_000_002),
        ("millisecond", 1_700_000_003_000),
        ("auto", 1_700_000_004),  # < 5e9: seconds
        ("auto", 1_700_000_005_000),  # < 5e12: milliseconds
        ("auto", 1_700_000_006_000_000),  # < 5e15: microseconds
        ("auto", 1_700_000_007_000_000_000),  # nanoseconds
    ]:
        path = f"/api/v3/write_lp?db={db}&precision={precision}"
        assert raw(srv, "POST", path, f"p f=1 {ts}".encode())[0] == 204
    c = InfluxDBClient3(host=srv.url, token=TOKEN, database=db)
    assert [r["time"] for r in rows(c, "SELECT time FROM p ORDER BY time")] == [
        (1_700_000_000 + i) * 10**9 for i in range(1, 8)
    ]
    status, body = raw(srv, "POST", f"/api/v3/write_lp?db={db}&precision=minute", b"p f=1 1")
    assert status == 400 and b"unknown variant `minute`" in body


def test_field_types_and_arrow_schema(client: InfluxDBClient3) -> None:
    client.write(record='t,tag=a f=1.5,i=2i,u=3u,b=true,s="x" 10')
    table = client.query("SELECT * FROM t")
    assert table.schema == pa.schema(
        [
            ("b", pa.bool_()),
            ("f", pa.float64()),
            ("i", pa.int64()),
            ("s", pa.string()),
            ("tag", pa.dictionary(pa.int32(), pa.string())),
            ("time", pa.timestamp("ns")),  # no time zone, like InfluxDB 3
            ("u", pa.uint64()),
        ]
    )


def test_conflicting_field_type_rejects_only_that_line(client: InfluxDBClient3) -> None:
    client.write(record="c,t=a f=1i 1")
    with pytest.raises(InfluxDBPartialWriteError) as e:
        client.write(record='c,t=a f=2i 2\nc,t=a f="no" 3\nc,f=1i g=1 4')
    assert [(x.line_number, x.error_message) for x in e.value.line_errors] == [
        (
            2,
            "invalid column type for column 'f', expected iox::column_type::field::integer, "
            "got iox::column_type::field::string",
        ),
        (
            3,
            "invalid column type for column 'f', expected iox::column_type::field::integer, "
            "got iox::column_type::tag",
        ),
    ]
    assert rows(client, "SELECT f, time FROM c ORDER BY time") == [
        {"f": 1, "time": 1},
        {"f": 2, "time": 2},
    ]


def test_rewriting_a_point_updates_it_instead_of_adding_a_row(client: InfluxDBClient3) -> None:
    client.write(record="d,vmid=1 a=1i,b=1i 5")
    client.write(record="d,vmid=1 b=2i 5\nd,vmid=2 a=9i 5")
    assert rows(client, "SELECT * FROM d ORDER BY vmid") == [
        {"a": 1, "b": 2, "time": 5, "vmid": "1"},
        {"a": 9, "b": None, "time": 5, "vmid": "2"},
    ]


def test_gzip_bodies(srv: InfluxDB3TestServer, db: str) -> None:
    c = InfluxDBClient3(host=srv.url, token=TOKEN, database=db, enable_gzip=True)
    c.write(record="g f=1i 1")  # the client sends Content-Encoding: gzip
    for i, path in enumerate(
        # v3 defaults to precision=auto, which would read 2 as seconds; v2 defaults to ns.
        (f"/api/v3/write_lp?db={db}&precision=nanosecond", f"/api/v2/write?bucket={db}&org=x"),
        start=2,
    ):
        lp = gzip.compress(f"g f={i}i {i}".encode())
        assert raw(srv, "POST", path, lp, {"Content-Encoding": "gzip"}) == (204, b"")
    assert [r["f"] for r in rows(c, "SELECT f FROM g ORDER BY time")] == [1, 2, 3]
    lp = gzip.compress(b"g f=4i 4")
    status, body = raw(
        srv, "POST", f"/api/v3/write_lp?db={db}", b"nope", {"Content-Encoding": "gzip"}
    )
    assert status == 500 and body.startswith(b"error decoding gzip stream")
    status, body = raw(srv, "POST", f"/api/v3/write_lp?db={db}", lp, {"Content-Encoding": "br"})
    assert (status, body) == (400, b"unacceptable content-encoding: br")


# -- partial writes -------------------------------------------------------------------------

BAD_BATCH = b'w f=1i 1\nw f="x" 2\nw f=3i 3\nw g= 4'
LINE_2 = {
    "original_line": 'w f="x" 2',
    "line_number": 2,
    "error_message": "invalid column type for column 'f', expected iox::column_type::field::integer"
    ", got iox::column_type::field::string",
}
LINE_4 = {"original_line": "w g= 4", "line_number": 4, "error_message": "No fields were provided"}


def test_v3_partial_write_keeps_the_good_lines(srv: InfluxDB3TestServer, db: str) -> None:
    status, body = raw(srv, "POST", f"/api/v3/write_lp?db={db}", BAD_BATCH)
    assert status == 400
    assert json.loads(body) == {
        "error": "partial write of line protocol occurred",
        "data": [LINE_2, LINE_4],
    }
    c = InfluxDBClient3(host=srv.url, token=TOKEN, database=db)
    assert [r["f"] for r in rows(c, "SELECT f FROM w ORDER BY time")] == [1, 3]


def test_v3_accept_partial_false_stores_nothing(srv: InfluxDB3TestServer, db: str) -> None:
    status, body = raw(srv, "POST", f"/api/v3/write_lp?db={db}&accept_partial=false", BAD_BATCH)
    assert status == 400
    assert json.loads(body) == {"error": "parsing failed for write_lp endpoint", "data": LINE_2}
    c = InfluxDBClient3(host=srv.url, token=TOKEN, database=db, write_use_v2_api=False)
    with pytest.raises(InfluxDBPartialWriteError) as e:
        c.write(record=BAD_BATCH, accept_partial=False)
    assert [x.line_number for x in e.value.line_errors] == [2]
    with pytest.raises(InfluxDB3ClientQueryError, match="database not found"):
        c.query("SELECT * FROM w")  # not even the database was created


def test_v2_write_with_one_bad_line(client: InfluxDBClient3) -> None:
    with pytest.raises(InfluxDBPartialWriteError) as e:
        client.write(record=b"v f=1i 1\nv f=oops 2\nv f=3i 3")  # default: /api/v2/write
    assert e.value.response.status == 400
    assert [(x.line_number, x.original_line) for x in e.value.line_errors] == [(2, "v f=oops 2")]
    assert [r["f"] for r in rows(client, "SELECT f FROM v ORDER BY time")] == [1, 3]


def test_write_parameter_errors(srv: InfluxDB3TestServer) -> None:
    assert raw(srv, "POST", "/api/v3/write_lp", b"m f=1") == (
        400,
        b"missing query parameter 'db'",
    )
    status, body = raw(srv, "POST", "/api/v3/write_lp?db=_bad", b"m f=1")
    assert status == 400 and json.loads(body)["error"] == (
        "db name did not start with a number or letter"
    )
    assert raw(srv, "POST", "/api/v3/write_lp?db=x&accept_partial=yes", b"m f=1")[0] == 400
    assert raw(srv, "POST", "/api/v2/write?org=o", b"m f=1")[0] == 400
    assert raw(srv, "POST", "/api/v3/write_lp?db=x", b"\n# only a comment\n")[0] == 400
    assert raw(srv, "GET", "/api/v3/nope") == (404, b"not found")


# -- authentication -------------------------------------------------------------------------


def test_http_auth(srv: InfluxDB3TestServer, db: str) -> None:
    path = f"/api/v3/write_lp?db={db}"
    assert raw(srv, "POST", path, b"a f=1", token=None) == (401, b"")
    assert raw(srv, "POST", path, b"a f=1", token=WRONG_TOKEN) == (401, b"")
    status, body = raw(srv, "POST", path, b"a f=1", {"Authorization": "Bearer"}, token=None)
    assert status == 400 and "malformed" in json.loads(body)["error"]
    assert raw(srv, "POST", path, b"a f=1", {"Authorization": f"Token {TOKEN}"}, None)[0] == 204
    assert raw(srv, "GET", "/health", token=None) == (200, b"OK")  # like --disable-authz health
    assert raw(srv, "GET", "/ping", token=None)[0] == 401

    bad = InfluxDBClient3(host=srv.url, token=WRONG_TOKEN, database=db)
    with pytest.raises(InfluxDBError) as e:
        bad.write(record="a f=1")
    assert e.value.response.status == 401
    bearer = InfluxDBClient3(host=srv.url, token=TOKEN, database=db, auth_scheme="Bearer")
    bearer.write(record="a f=2")
    assert bearer.get_server_version() is not None


def test_flight_auth(srv: InfluxDB3TestServer, client: InfluxDBClient3, db: str) -> None:
    client.write(record="a f=1")
    bad = InfluxDBClient3(host=srv.url, token=WRONG_TOKEN, database=db)
    with pytest.raises(InfluxDB3ClientQueryError, match="not authenticated"):
        bad.query("SELECT * FROM a")
    # The gRPC status itself, without the client's wrapping:
    fc = flight.FlightClient(f"grpc+tcp://127.0.0.1:{srv.port}")
    ticket = flight.Ticket(json.dumps({"database": db, "sql_query": "SELECT 1"}))
    with pytest.raises(flight.FlightUnauthenticatedError):
        fc.do_get(ticket).read_all()
    ok = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
    assert fc.do_get(ticket, ok).read_all().num_rows == 1


# -- queries --------------------------------------------------------------------------------


def mem_dump(i: int, vmid: str) -> Point:
    t = datetime(2025, 11, 11, 10, i, 0, 123456, tzinfo=UTC)
    return (
        Point("mem_dumps")
        .tag("dom", f"vm-{vmid}")
        .tag("vmid", vmid)
        .field("sha256", f"{i:064x}")
        .field("duration_sec", 1.0 + i)
        .field("gzip_size_bytes", 1000 * (i + 1))
        .field("ctime", 1)
        .field("mtime", 2)
        .field("atime", 3)
        .field("dump_path", f"/d/{vmid}_{i}.mem.gz")
        .field("gz_sha256", "ab" * 32)
        .field("raw_size_bytes", 4096)
        .field("hypervisor", "lab")
        .time(t, WritePrecision.NS)
    )


def test_memdump_queries(client: InfluxDBClient3) -> None:
    client.write(record=[mem_dump(i, vmid) for i, vmid in enumerate(["101", "102", "101", "103"])])
    sql = "SELECT * FROM mem_dumps ORDER BY time DESC LIMIT $limit OFFSET $offset"
    page = rows(client, sql, limit=2, offset=1)
    assert [r["sha256"][-1] for r in page] == ["2", "1"]
    assert page[0] == {
        "atime": 3,
        "ctime": 1,
        "dom": "vm-101",
        "dump_path": "/d/101_2.mem.gz",
        "duration_sec": 3.0,
        "gz_sha256": "ab" * 32,
        "gzip_size_bytes": 3000,
        "hypervisor": "lab",
        "mtime": 2,
        "raw_size_bytes": 4096,
        "sha256": f"{2:064x}",
        "time": 1762855320123456000,
        "vmid": "101",
    }
    assert rows(client, sql, limit=10, offset=4) == []
    stats = client.query(
        "SELECT COUNT(*), COUNT(DISTINCT vmid), SUM(gzip_size_bytes), AVG(duration_sec), "
        "MAX(time) FROM mem_dumps"
    )
    assert stats.num_rows == 1
    assert [c[0].as_py() for c in stats.columns[:4]] == [4, 3, 10000, 2.5]
    assert stats.columns[4][0].value == 1762855380123456000
    assert stats.schema.field(4).type == pa.timestamp("ns")


def test_query_parameters_bind_as_values(client: InfluxDBClient3) -> None:
    client.write(record=[mem_dump(i, vmid) for i, vmid in enumerate(["101", "102", "101"])])
    assert len(rows(client, "SELECT * FROM mem_dumps WHERE vmid = $vmid", vmid="101")) == 2
    assert rows(client, "SELECT * FROM mem_dumps WHERE vmid = $v", v="101' OR '1'='1") == []
    got = rows(
        client,
        "SELECT sha256 FROM mem_dumps WHERE duration_sec > $d AND gzip_size_bytes >= $n "
        "AND time >= $t ORDER BY time",
        d=1.5,
        n=2000,
        t="2025-11-11T10:02:00",
    )
    assert [r["sha256"][-1] for r in got] == ["2"]


def test_empty_results_keep_their_schema(srv: InfluxDB3TestServer, db: str) -> None:
    c = InfluxDBClient3(host=srv.url, token=TOKEN, database=db)
    with pytest.raises(InfluxDB3ClientQueryError, match=f"database not found: {db}"):
        c.query("SELECT * FROM mem_dumps")
    # Pre-create the table (InfluxDB 3 /api/v3/configure/*) so a fresh database answers.
    assert raw(srv, "POST", "/api/v3/configure/database", json.dumps({"db": db}).encode()) == (
        200,
        b"",
    )
    table_spec = {
        "db": db,
        "table": "mem_dumps",
        "tags": ["dom", "vmid"],
        "fields": [
            {"name": "sha256", "type": "utf8"},
            {"name": "gzip_size_bytes", "type": "int64"},
        ],
    }
    assert raw(srv, "POST", "/api/v3/configure/table", json.dumps(table_spec).encode())[0] == 200
    empty = c.query(
        "SELECT * FROM mem_dumps ORDER BY time DESC LIMIT $n", query_parameters={"n": 5}
    )
    assert empty.num_rows == 0
    assert empty.column_names == ["dom", "gzip_size_bytes", "sha256", "time", "vmid"]
    stats = c.query("SELECT COUNT(*), SUM(gzip_size_bytes), MAX(time) FROM mem_dumps")
    assert stats.to_pylist() == [
        {"count(*)": 0, "sum(mem_dumps.gzip_size_bytes)": None, "max(mem_dumps.time)": None}
    ]
    with pytest.raises(InfluxDB3ClientQueryError, match="table 'public.iox.nope' not found"):
        c.query("SELECT * FROM nope")


def test_query_errors_have_grpc_codes(
    srv: InfluxDB3TestServer, client: InfluxDBClient3, db: str
) -> None:
    client.write(record="q f=1")
    with pytest.raises(InfluxDB3ClientQueryError, match="InfluxQL is not supported"):
        client.query("SELECT * FROM q GROUP BY time(1d)", language="influxql")
    fc = flight.FlightClient(f"grpc+tcp://127.0.0.1:{srv.port}")
    auth = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])

    def get(**ticket: Any) -> pa.Table:
        return fc.do_get(flight.Ticket(json.dumps(ticket)), auth).read_all()

    with pytest.raises(pa.ArrowInvalid, match="InfluxQL"):  # INVALID_ARGUMENT
        get(database=db, sql_query="SELECT 1", query_type="influxql")
    with pytest.raises(pa.ArrowInvalid, match="SQL error"):
        get(database=db, sql_query="SELEC 1", query_type="sql")
    with pytest.raises(pa.ArrowInvalid, match="DDL not supported"):
        get(database=db, sql_query="CREATE TABLE x AS SELECT 1", query_type="sql")
    with pytest.raises(pa.ArrowKeyError, match="database not found: nope"):  # NOT_FOUND
        get(database="nope", sql_query="SELECT 1", query_type="sql")


def test_http_query_sql(srv: InfluxDB3TestServer, client: InfluxDBClient3, db: str) -> None:
    client.write(record='h,t=a f=1.5,s="x" 1700000000123000000')
    q = f"/api/v3/query_sql?db={db}&q=SELECT+*+FROM+h"
    assert raw(srv, "GET", q) == (
        200,
        b'[{"f": 1.5, "s": "x", "t": "a", "time": "2023-11-14T22:13:20.123"}]',
    )
    assert raw(srv, "GET", q + "&format=jsonl")[1].count(b"\n") == 1


# -- the connection level -------------------------------------------------------------------


def test_http_keep_alive(srv: InfluxDB3TestServer, db: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for i in range(3):
        conn.request("POST", f"/api/v3/write_lp?db={db}", body=f"k f={i}i {i}", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 204 and resp.read() == b""
    sock = conn.sock
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b"OK"
    assert conn.sock is sock  # the same TCP connection served every request
    conn.close()


def exchange(srv: InfluxDB3TestServer, data: bytes) -> bytes:
    """Send ``data`` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_http_chunked_body_expect_continue_and_pipelining(
    srv: InfluxDB3TestServer, client: InfluxDBClient3, db: str
) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    write = (
        f"POST /api/v3/write_lp?db={db}&precision=nanosecond HTTP/1.1\r\nHost: x\r\n".encode()
        + auth
        + b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        + b"4\r\nc f=\r\n3;ext=1\r\n1i \r\n1\r\n7\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = exchange(srv, write + last)  # two requests in one send: answered in order
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n")
    assert out.index(b"HTTP/1.1 204") < out.index(b"HTTP/1.1 200 OK\r\n")
    assert out.endswith(b"\r\n\r\nOK")
    assert rows(client, "SELECT f, time FROM c") == [{"f": 1, "time": 7}]


def test_http_bad_and_oversized_requests_close_the_connection(srv: InfluxDB3TestServer) -> None:
    out = exchange(srv, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and out.endswith(b"\r\n\r\nmalformed HTTP request")
    too_big = (
        f"POST /api/v3/write_lp?db=x HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * 1024 * 1024 + 1}"
        "\r\n\r\n"
    )
    out = exchange(srv, too_big.encode())  # answered before the body: no 10 MiB to send
    assert out.startswith(b"HTTP/1.1 500 ")
    assert out.endswith(b"max request size (10485760 bytes) exceeded")
    # An HTTP/1.0 request without keep-alive is answered, then the connection closes.
    out = exchange(srv, b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nOK")


def test_stop_start_is_an_outage(db: str) -> None:
    server = InfluxDB3TestServer(token=TOKEN).start()
    try:
        c = InfluxDBClient3(
            host=server.url,
            token=TOKEN,
            database=db,
            write_timeout=2_000,
            query_timeout=2_000,
            flight_client_options=FAST_GRPC,
        )
        c.write(record="o f=1i 1")
        assert rows(c, "SELECT f, time FROM o") == [{"f": 1, "time": 1}]
        url = server.url
        server.stop()

        t0 = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError):  # connection refused, not InfluxDBError
            c.write(record="o f=2i 2")
        with pytest.raises(InfluxDB3ClientQueryError, match="unavailable"):
            c.query("SELECT f FROM o")
        assert time.monotonic() - t0 < 1.0

        t0 = time.monotonic()
        server.start()
        assert time.monotonic() - t0 < 2.0
        assert server.url == url
        c.write(record="o f=2i 2")
        # gRPC reconnects with a backoff: the first query after an outage may still fail.
        deadline = time.monotonic() + 5
        while True:
            try:
                got = rows(c, "SELECT f, time FROM o ORDER BY time")
                break
            except InfluxDB3ClientQueryError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert got == [{"f": 1, "time": 1}, {"f": 2, "time": 2}]  # data survived the outage
    finally:
        server.stop()


def test_cli_runs_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.influxdb3_server", "--port", "0", "--token", TOKEN]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("InfluxDB 3 test server listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
