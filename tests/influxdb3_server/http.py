"""The HTTP/1.1 half of the server: InfluxDB 3's write, query, health and configure APIs.

Status codes and bodies follow InfluxDB 3 Core (influxdb3_server/src/http.rs):

* writes answer 204; a rejected line gives 400 with
  ``{"error": "partial write of line protocol occurred", "data": [<line error>, ...]}``
  (the valid lines are kept), or with accept_partial=false
  ``{"error": "parsing failed for write_lp endpoint", "data": <first line error>}``
  (nothing is kept); a line error is ``{"original_line", "line_number", "error_message"}``;
* a missing or wrong token gives 401 with an *empty* body, a malformed Authorization
  header 400 with ``{"error": "..."}``;
* parameter errors are plain-text 400s, unknown paths a plain-text 404 ``not found``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gzip
import json
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pyarrow as pa

from tests.influxdb3_server.flight import QueryError, execute_sql
from tests.influxdb3_server.lineprotocol import parse_lines
from tests.influxdb3_server.store import (
    CONFIGURE_FIELD_TYPES,
    ColumnType,
    DatabaseNotFound,
    Precision,
    Store,
)

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # InfluxDB's default --max-http-request-size
_MAX_HEADER_BYTES = 64 * 1024
VERSION = "3.0.0-memdump-test"

_V3_PRECISIONS = {
    "auto": Precision.AUTO,
    "nanosecond": Precision.NANOSECOND,
    "microsecond": Precision.MICROSECOND,
    "millisecond": Precision.MILLISECOND,
    "second": Precision.SECOND,
    # Short forms, as the v2 API and some clients spell them.
    "ns": Precision.NANOSECOND,
    "us": Precision.MICROSECOND,
    "ms": Precision.MILLISECOND,
    "s": Precision.SECOND,
}
_V2_PRECISIONS = {
    "ns": Precision.NANOSECOND,
    "us": Precision.MICROSECOND,
    "ms": Precision.MILLISECOND,
    "s": Precision.SECOND,
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    """Turns into an error response; raised anywhere inside a handler."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def text(status: int, message: str) -> Response:
    return Response(status, message.encode(), "text/plain; charset=utf-8")


def json_response(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json")


def error_json(status: int, message: str, data: Any = None) -> Response:
    return json_response(status, {"error": message, "data": data})


# POSTs that only read (a query's parameters in its body).
_READ_POSTS = frozenset({"/api/v3/query_sql", "/api/v3/query_influxql", "/ping"})


class HttpApi:
    """Routes one parsed request to its handler; runs in a worker thread."""

    def __init__(
        self,
        store: Store,
        token: str | None,
        public_paths: frozenset[str],
        read_tokens: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self._token = token
        # Tokens that may only read (InfluxDB 3 Enterprise's "db:*:read" resource tokens):
        # queries, health and listings pass, writes and configuration get a 403.
        self._read_tokens = read_tokens
        self._public_paths = public_paths
        self._process_id = str(uuid.uuid4())
        self._routes: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("POST", "/api/v3/write_lp"): self._write_v3,
            ("POST", "/api/v2/write"): self._write_v2,
            ("GET", "/api/v3/query_sql"): self._query_sql,
            ("POST", "/api/v3/query_sql"): self._query_sql,
            ("GET", "/api/v3/query_influxql"): self._query_influxql,
            ("POST", "/api/v3/query_influxql"): self._query_influxql,
            ("GET", "/health"): self._health,
            ("GET", "/api/v1/health"): self._health,
            ("GET", "/ping"): self._ping,
            ("POST", "/ping"): self._ping,
            ("GET", "/api/v3/configure/database"): self._show_databases,
            ("POST", "/api/v3/configure/database"): self._create_database,
            ("POST", "/api/v3/configure/table"): self._create_table,
        }

    def handle(self, req: Request) -> Response:
        if req.method == "OPTIONS":  # CORS preflight, answered before auth like upstream
            return Response(
                204,
                headers={
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Allow-Methods": "*",
                    "Access-Control-Allow-Headers": "*",
                    "Access-Control-Max-Age": "86400",
                },
            )
        try:
            if req.path not in self._public_paths:
                self._authenticate(req)
            route = self._routes.get((req.method, req.path))
            response = route(req) if route else text(404, "not found")
        except BadRequest as e:
            response = e.response
        except UnicodeDecodeError as e:
            response = text(500, f"body content is not valid utf8: {e}")
        except Exception as e:  # a bug here must show up as a 500, not a dropped connection
            response = text(500, f"internal error in the test server: {e!r}")
        response.headers.setdefault("Access-Control-Allow-Origin", "*")
        return response

    def _authenticate(self, req: Request) -> None:
        if self._token is None:
            return
        header = req.headers.get("authorization")
        if header is None:
            raise BadRequest(Response(401))
        parts = header.split(" ")
        if len(parts) != 2 or parts[0] not in ("Bearer", "Token", "Basic"):
            raise BadRequest(
                json_response(
                    400,
                    {
                        "error": "Authorization header was malformed, the request was not in the "
                        "form of 'Authorization: <auth-scheme> <token>', supported auth-schemes "
                        "are Bearer, Token and Basic"
                    },
                )
            )
        scheme, token = parts
        if scheme == "Basic":  # v1 style: the password part of user:password is the token
            try:
                token = base64.b64decode(token, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                raise BadRequest(Response(401)) from None
        if token in self._read_tokens:
            if req.method == "POST" and req.path not in _READ_POSTS:
                raise BadRequest(error_json(403, "token does not have write permission"))
            return
        if token != self._token:
            raise BadRequest(Response(401))

    # -- writes ---------------------------------------------------------------------------

    def _write_v3(self, req: Request) -> Response:
        if not req.query:
            return text(400, "missing query parameter 'db'")
        db = req.param("db")
        if db is None:
            return text(400, "serde error: missing field `db`")
        precision = _choice(req.param("precision") or "auto", _V3_PRECISIONS, "precision")
        accept_partial = _flag(req.param("accept_partial"), "accept_partial", default=True)
        _flag(req.param("no_sync"), "no_sync", default=False)  # validated; writes are in memory
        return self._write(req, db, precision, accept_partial)

    def _write_v2(self, req: Request) -> Response:
        db = req.param("bucket")
        if not db:
            return error_json(400, "missing bucket value")
        raw_precision = req.param("precision") or "ns"
        if raw_precision not in _V2_PRECISIONS:
            return error_json(400, f"invalid precision value: {raw_precision}")
        # The v2 endpoint shares the v3 write path in InfluxDB 3, so partial writes apply.
        return self._write(req, db, _V2_PRECISIONS[raw_precision], accept_partial=True)

    def _write(self, req: Request, db: str, precision: Precision, accept_partial: bool) -> Response:
        _validate_db_name(db)
        body = _decode_body(req).decode("utf-8")
        parsed = list(parse_lines(body))
        if not parsed:
            return text(400, "empty write request: no lines of line protocol")
        result = self._store.write(db, parsed, precision, accept_partial, time.time_ns())
        if result.aborted_at is not None:
            return error_json(
                400, "parsing failed for write_lp endpoint", result.aborted_at.as_json()
            )
        if result.rejected:
            return error_json(
                400,
                "partial write of line protocol occurred",
                [e.as_json() for e in result.rejected],
            )
        return Response(204)

    # -- queries and the rest -------------------------------------------------------------

    def _query_sql(self, req: Request) -> Response:
        if req.method == "POST":
            try:
                args = json.loads(req.body or b"{}")
            except ValueError as e:
                return text(400, f"serde json error: {e}")
            db, sql, fmt, params = (
                args.get("db"),
                args.get("q"),
                args.get("format"),
                args.get("params"),
            )
        else:
            db, sql, fmt = req.param("db"), req.param("q"), req.param("format")
            raw = req.param("params")
            try:
                params = json.loads(raw) if raw else None
            except ValueError as e:
                return text(400, f"serde json error: {e}")
        if not db or not sql:
            return text(400, "missing query parameters 'db' and 'q'")
        fmt = fmt or "json"
        if fmt not in ("json", "jsonl"):
            return text(400, f"invalid mime type ({fmt}); the test server speaks json and jsonl")
        try:
            table = execute_sql(self._store, db, sql, params)
        except QueryError as e:
            if e.code == "not_found":
                return error_json(404, f"query error: {e}")
            return text(500, f"query error: {e}")
        rows = _json_rows(table)
        if fmt == "jsonl":
            lines = "".join(json.dumps(r) + "\n" for r in rows)
            return Response(200, lines.encode(), "application/jsonl")
        return json_response(200, rows)

    def _query_influxql(self, req: Request) -> Response:
        return text(400, "InfluxQL is not supported by the InfluxDB 3 test server; query with SQL")

    def _health(self, req: Request) -> Response:
        return text(200, "OK")

    def _ping(self, req: Request) -> Response:
        response = json_response(
            200, {"version": VERSION, "revision": "test", "process_id": self._process_id}
        )
        response.headers.update({"X-Influxdb-Version": VERSION, "X-Influxdb-Build": "Core"})
        return response

    def _show_databases(self, req: Request) -> Response:
        return json_response(200, [{"iox::database": db} for db in self._store.databases()])

    def _create_database(self, req: Request) -> Response:
        args = _json_body(req)
        db = args.get("db")
        if not isinstance(db, str):
            return text(400, "serde json error: missing field `db`")
        _validate_db_name(db)
        if not self._store.create_database(db):
            return text(409, "attempted to create a resource that already exists")
        return Response(200)

    def _create_table(self, req: Request) -> Response:
        args = _json_body(req)
        db, table = args.get("db"), args.get("table")
        if not isinstance(db, str) or not isinstance(table, str):
            return text(400, "serde json error: missing field `db` or `table`")
        columns = {tag: ColumnType.TAG for tag in args.get("tags", [])}
        for f in args.get("fields", []):
            ctype = CONFIGURE_FIELD_TYPES.get(f.get("type"))
            if ctype is None:
                return text(400, f"invalid field type {f.get('type')!r}")
            columns[f["name"]] = ctype
        try:
            self._store.create_table(db, table, columns)
        except DatabaseNotFound as e:
            return text(404, str(e))
        except FileExistsError as e:
            return text(409, str(e))
        return Response(200)


def _choice(value: str, choices: dict[str, Precision], name: str) -> Precision:
    if value not in choices:
        expected = ", ".join(f"`{c}`" for c in choices)
        raise BadRequest(
            text(
                400,
                f"serde error: unknown variant `{value}` for {name}, expected one of {expected}",
            )
        )
    return choices[value]


def _flag(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    if value not in ("true", "false"):
        raise BadRequest(
            text(
                400, f"serde error: invalid value `{value}` for {name}, expected `true` or `false`"
            )
        )
    return value == "true"


def _validate_db_name(db: str) -> None:
    # InfluxDB 3: non-empty, starts with a letter or digit, then letters, digits, _ or -.
    if not db:
        message = "db name cannot be empty"
    elif not db[0].isascii() or not db[0].isalnum():
        message = "db name did not start with a number or letter"
    elif not all(c.isascii() and (c.isalnum() or c in "_-") for c in db):
        message = (
            "invalid character in database name: must be ASCII, containing only letters, "
            "numbers, underscores, or hyphens"
        )
    else:
        return
    raise BadRequest(error_json(400, message))


def _decode_body(req: Request) -> bytes:
    encoding = req.headers.get("content-encoding", "identity")
    if encoding == "identity":
        return req.body
    if encoding != "gzip":
        raise BadRequest(text(400, f"unacceptable content-encoding: {encoding}"))
    try:
        # Bounded decompression: a small gzip body must not expand past the request limit.
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = decoder.decompress(req.body, MAX_REQUEST_BYTES + 1)
        if not decoder.eof and len(data) <= MAX_REQUEST_BYTES:
            raise gzip.BadGzipFile("truncated gzip stream")
    except (zlib.error, gzip.BadGzipFile) as e:
        raise BadRequest(text(500, f"error decoding gzip stream: {e}")) from None
    if len(data) > MAX_REQUEST_BYTES:
        raise BadRequest(text(500, f"max request size ({MAX_REQUEST_BYTES} bytes) exceeded"))
    return data


def _json_body(req: Request) -> dict[str, Any]:
    try:
        value = json.loads(req.body or b"{}")
    except ValueError as e:
        raise BadRequest(text(400, f"serde json error: {e}")) from None
    if not isinstance(value, dict):
        raise BadRequest(text(400, "serde json error: expected a JSON object"))
    return value


def _json_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows like InfluxDB's JSON format: nulls left out, timestamps as naive ISO text."""
    columns = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_timestamp(column.type):
            values = [None if v is None else _iso(v) for v in column.cast(pa.int64()).to_pylist()]
        else:
            values = column.to_pylist()
        columns.append((name, values))
    return [
        {name: values[i] for name, values in columns if values[i] is not None}
        for i in range(table.num_rows)
    ]


def _iso(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac == 0:
        return base
    for digits, unit in ((3, 1_000_000), (6, 1_000)):
        if frac % unit == 0:
            return f"{base}.{frac // unit:0{digits}d}"
    return f"{base}.{frac:09d}"


# -- HTTP/1.1 on an asyncio stream, spoken by h11 ------------------------------------------


async def serve_http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    prefix: bytes,
    handle: Callable[[Request], Response],
) -> None:
    """Serve HTTP/1.1 requests on one connection until either side closes it (keep-alive).

    h11 does the protocol (request parsing, chunked bodies, Expect: 100-continue,
    keep-alive); ``prefix`` is what the splice already read to tell HTTP from gRPC."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
    conn.receive_data(prefix)
    loop = asyncio.get_running_loop()
    try:
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request)
            request = _request(event)
            length = request.headers.get("content-length")
            if length is not None and int(length) > MAX_REQUEST_BYTES:
                too_big = text(500, f"max request size ({MAX_REQUEST_BYTES} bytes) exceeded")
                too_big.headers["Connection"] = "close"
                await _send(conn, writer, too_big, request.method)
                return
            if conn.client_is_waiting_for_100_continue:
                go_on = h11.InformationalResponse(status_code=100, headers=[], reason="Continue")
                writer.write(conn.send(go_on))
            body = bytearray()
            while not isinstance(event := await _next_event(conn, reader), h11.EndOfMessage):
                assert isinstance(event, h11.Data)
                body += event.data
                if len(body) > MAX_REQUEST_BYTES:  # a chunked body has no length up front
                    return
            request.body = bytes(body)
            # Handlers parse, gzip-decode and run DataFusion: keep that off the event loop,
            # which also carries the spliced gRPC traffic.
            response = await loop.run_in_executor(None, handle, request)
            await _send(conn, writer, response, request.method)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close (either side), or an HTTP/1.0 client
            conn.start_next_cycle()
    except h11.RemoteProtocolError:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            bad = text(400, "malformed HTTP request")
            bad.headers["Connection"] = "close"
            with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                await _send(conn, writer, bad, "")
    except ConnectionError:
        return
    finally:
        writer.close()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await reader.read(65536))  # b"" tells h11 the peer closed
    assert isinstance(event, h11.Event)
    return event


def _request(event: h11.Request) -> Request:
    headers: dict[str, str] = {}
    for raw_name, raw_value in event.headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    url = urlsplit(event.target.decode("latin-1"))
    query = parse_qs(url.query, keep_blank_values=True)
    return Request(event.method.decode("latin-1"), url.path, query, headers)


async def _send(
    conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, method: str
) -> None:
    headers = dict(response.headers)
    if response.content_type:
        headers["Content-Type"] = response.content_type
    if response.status not in (204, 304):
        headers["Content-Length"] = str(len(response.body))
    head = h11.Response(
        status_code=response.status,
        headers=list(headers.items()),
        reason=HTTPStatus(response.status).phrase,
    )
    data = conn.send(head)
    if response.body and method != "HEAD":
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await writer.drain()
