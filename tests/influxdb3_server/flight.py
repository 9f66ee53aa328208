"""Arrow Flight `DoGet` the way InfluxDB 3 serves it, with SQL run by DataFusion.

The influxdb3-python client sends a JSON ticket
``{"database": ..., "sql_query": ..., "query_type": "sql"|"influxql", "params": {...}}``
and the gRPC header ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from datafusion import SessionConfig, SessionContext, SQLOptions

from tests.influxdb3_server.store import DatabaseNotFound, Store

# Queries may only read: no CREATE/INSERT/COPY/SET against the test data or the disk.
_READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)


class QueryError(Exception):
    """A query that InfluxDB would refuse; `code` says which gRPC status it maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "invalid_argument" | "not_found"


def execute_sql(store: Store, database: str, sql: str, params: dict[str, Any] | None) -> pa.Table:
    """Run `sql` over a snapshot of `database`; tables are reachable as `t`, `iox.t`
    and `public.iox.t` like in InfluxDB 3, plus `information_schema` (SHOW TABLES)."""
    try:
        tables = store.snapshot(database)
    except DatabaseNotFound as e:
        raise QueryError("not_found", str(e)) from None
    config = (
        SessionConfig()
        .with_default_catalog_and_schema("public", "iox")
        .with_information_schema(True)
        .with_target_partitions(1)  # tiny tables: one partition keeps row order stable
    )
    ctx = SessionContext(config)
    schema = ctx.catalog("public").schema("iox")
    # In-memory tables are made in a scratch context and added by reference, because
    # registering by name would parse "a.b" as schema.table; one (maybe empty) batch per
    # table keeps DataFusion's planner happy for tables without rows.
    scratch = SessionContext()
    for name, table in tables.items():
        batches = table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
        schema.register_table(name, scratch.create_dataframe([batches], schema=table.schema))
    values = _sql_params(params)
    try:
        # param_values binds $name placeholders after parsing: values are never spliced
        # into the SQL text, and LIMIT $n / OFFSET $n work too.
        return ctx.sql(sql, options=_READ_ONLY, param_values=values).to_arrow_table()
    except Exception as e:  # DataFusion raises plain Exception/ValueError subclasses
        raise QueryError("invalid_argument", f"error while planning or running query: {e}") from e


def _sql_params(params: dict[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise QueryError("invalid_argument", "query parameters must be a JSON object")
    for name, value in params.items():
        # InfluxDB accepts JSON scalars only (null, bool, number, string).
        if isinstance(value, list | dict) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise QueryError(
                "invalid_argument", f"query parameter ${name} must be a JSON scalar, got {value!r}"
            )
    return dict(params)


def _to_flight_error(error: QueryError) -> Exception:
    # pyarrow turns ArrowInvalid into INVALID_ARGUMENT and KeyError into NOT_FOUND (with
    # the Python traceback appended to the message; only FlightError subclasses avoid
    # that, and there is none for these two codes).
    if error.code == "not_found":
        return _NotFound(str(error))
    invalid: Exception = pa.ArrowInvalid(str(error))  # annotated: pyarrow has no type stubs
    return invalid


class _NotFound(KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class _AuthMiddleware(flight.ServerMiddleware):
    pass


class _AuthFactory(flight.ServerMiddlewareFactory):
    """Rejects calls without ``authorization: Bearer <token>`` (or ``Token <token>``)."""

    def __init__(self, tokens: set[str]) -> None:
        self._accepted = {f"{scheme} {t}" for t in tokens for scheme in ("Bearer", "Token")}

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> _AuthMiddleware:
        values = headers.get("authorization", [])
        if not any(v in self._accepted for v in values):
            raise flight.FlightUnauthenticatedError("the request was not authenticated")
        return _AuthMiddleware()


class InfluxFlightServer(flight.FlightServerBase):
    """Listens on an internal loopback port; the public port's front splices gRPC here."""

    def __init__(
        self, store: Store, token: str | None, read_tokens: frozenset[str] = frozenset()
    ) -> None:
        # Flight serves queries only: a read-only token is as good as the full one here.
        tokens = {token, *read_tokens} if token is not None else None
        middleware = {"auth": _AuthFactory(tokens)} if tokens is not None else {}
        super().__init__("grpc+tcp://127.0.0.1:0", middleware=middleware)
        self._store = store

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.RecordBatchStream:
        try:
            request = json.loads(ticket.ticket)
        except ValueError:
            raise pa.ArrowInvalid("ticket is not the JSON InfluxDB 3 expects") from None
        if not isinstance(request, dict) or not isinstance(request.get("sql_query"), str):
            raise pa.ArrowInvalid('ticket must be a JSON object with "database" and "sql_query"')
        query_type = request.get("query_type", "sql")
        if query_type == "influxql":
            raise pa.ArrowInvalid(
                "InfluxQL is not supported by the InfluxDB 3 test server; query with SQL"
            )
        if query_type != "sql":
            raise pa.ArrowInvalid(
                f"unknown query_type {query_type!r}, expected 'sql' or 'influxql'"
            )
        database = request.get("database")
        if not isinstance(database, str) or not database:
            raise pa.ArrowInvalid('ticket has no "database"')
        try:
            table = execute_sql(self._store, database, request["sql_query"], request.get("params"))
        except QueryError as e:
            raise _to_flight_error(e) from None
        return flight.RecordBatchStream(table)
