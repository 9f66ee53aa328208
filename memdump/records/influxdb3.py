"""InfluxDB 3 record store (influxdb3-python): table ``mem_dumps``, tags ``dom`` and
``vmid``, the contract's other fields as fields, ``time`` = the dump's timestamp.

Queries are SQL over Arrow Flight with bound parameters (request values never become
SQL text). Timeouts are short and bounded: a store that cannot be reached fails fast,
and its records wait in the outbox. Client errors are mapped to RecordStoreError here.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from memdump.errors import RecordStoreError
from memdump.records.base import RecordQuery, Stats
from memdump.records.model import (
    API_FIELDS,
    INTEGER_LATER_FIELDS,
    LATER_FIELDS,
    NUMERIC_LATER_FIELDS,
    DumpRecord,
    iso_utc,
)
from memdump.settings import InfluxDB3Settings

TABLE = "mem_dumps"
_INT_FIELDS = ("gzip_size_bytes", "ctime", "mtime", "atime", "raw_size_bytes")
_STR_FIELDS = (
    "sha256",
    "dump_path",
    "gz_sha256",
    "hypervisor",
    *(f for f in LATER_FIELDS if f not in NUMERIC_LATER_FIELDS),
)
# Numeric fields written only when known (InfluxDB has no null: a missing field reads as it).
_FLOAT_FIELDS = tuple(f for f in NUMERIC_LATER_FIELDS if f not in INTEGER_LATER_FIELDS)
_LATER_INT_FIELDS = INTEGER_LATER_FIELDS
# Fields a table written before they existed may lack (InfluxDB adds a column on the
# first write that carries it): such a table is read without them (as "").
_LATER_FIELDS = LATER_FIELDS
_COLUMNS_SQL = "SELECT column_name FROM information_schema.columns WHERE table_name = $table"
_LOCATION_MARKS = {"local": "local_deleted_at", "s3": "s3_deleted_at"}
_STATS_SQL = (
    "SELECT COUNT(*) AS n, COUNT(DISTINCT vmid) AS vms,"
    " SUM(CASE WHEN COALESCE(deleted_at, '') = '' THEN gzip_size_bytes END) AS size,"
    " AVG(duration_sec) AS avg, CAST(MAX(time) AS BIGINT) AS last_ns FROM mem_dumps"
)
# A table from before retention existed has no deleted_at column: nothing was deleted.
_STATS_SQL_BEFORE_RETENTION = (
    "SELECT COUNT(*) AS n, COUNT(DISTINCT vmid) AS vms, SUM(gzip_size_bytes) AS size,"
    " AVG(duration_sec) AS avg, CAST(MAX(time) AS BIGINT) AS last_ns FROM mem_dumps"
)


def _ns(ts: datetime) -> int:
    delta = ts.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _iso_from_ns(ns: int) -> str:
    return iso_utc(
        datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=(ns % 10**9) // 1000)
    )


def _missing(exc: Exception) -> bool:
    # InfluxDB 3 creates a database/table on first write; before that, queries fail.
    text = str(exc)
    return "not found" in text and ("database" in text or "table" in text)


def _where(q: RecordQuery) -> tuple[str, dict[str, Any]]:
    """WHERE clause from fixed fragments; values go in as bound parameters."""
    parts: list[str] = []
    params: dict[str, Any] = {}
    if q.since is not None:
        parts.append("CAST(time AS BIGINT) >= $since")
        params["since"] = _ns(q.since)
    if q.until is not None:
        parts.append("CAST(time AS BIGINT) < $until")
        params["until"] = _ns(q.until)
    for column in ("vmid", "dom", "dump_path"):
        value = getattr(q, column)
        if value is not None:
            parts.append(f"{column} = ${column}")
            params[column] = value
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


class InfluxDB3RecordStore:
    def __init__(self, cfg: InfluxDB3Settings, *, token: SecretStr | None = None) -> None:
        """``token``: the credential to use instead of ``cfg.token`` (open_reader's
        read-only one)."""
        from influxdb_client_3 import (
            InfluxDBClient3,
            WriteOptions,
            flight_client_options,
            write_client_options,
        )
        from influxdb_client_3.write_client.client.write_api import WriteType

        ms = int(cfg.timeout_sec * 1000)
        self._cfg = cfg
        self._has_all_fields = False
        self._client = InfluxDBClient3(
            host=cfg.url,
            database=cfg.database,
            token=secret.get_secret_value() if (secret := token or cfg.token) else "",
            write_client_options=write_client_options(
                write_options=WriteOptions(write_type=WriteType.synchronous, max_retries=0)
            ),
            # gRPC's reconnect backoff would keep queries failing for seconds after the
            # server is back; keep it short.
            flight_client_options=flight_client_options(
                generic_options=[
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ]
            ),
            write_timeout=ms,
            query_timeout=ms,
        )

    def add(self, record: DumpRecord) -> bool:
        from influxdb_client_3 import Point, WritePrecision

        r = record
        point = Point(TABLE).tag("dom", r.dom).tag("vmid", r.vmid)
        point = point.field("duration_sec", float(r.duration_sec))
        for name in _INT_FIELDS:
            point = point.field(name, int(getattr(r, name)))
        for name in _STR_FIELDS:
            point = point.field(name, str(getattr(r, name)))
        for name in _FLOAT_FIELDS:
            if (value := getattr(r, name)) is not None:
                point = point.field(name, float(value))
        for name in _LATER_INT_FIELDS:
            if (value := getattr(r, name)) is not None:
                point = point.field(name, int(value))
        # Same series + same time = the same row: a replayed write is not a duplicate.
        self._write(point.time(_ns(r.timestamp), WritePrecision.NS))
        return True

    def _write(self, point: Any) -> None:
        try:
            self._client.write(record=point)
        except Exception as exc:
            raise RecordStoreError(
                f"InfluxDB 3 write failed: {_reason(exc)}", retryable=True, store="influxdb3"
            ) from exc

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        for attempt in range(3):
            try:
                table = self._client.query(sql, language="sql", query_parameters=params or None)
                break
            except Exception as exc:
                if _missing(exc):
                    return []
                # Right after the server comes back, gRPC may still report the channel
                # unavailable for a few hundred ms: try again briefly before giving up.
                if attempt < 2 and "unavailable" in str(exc).lower():
                    time.sleep(0.3)
                    continue
                raise RecordStoreError(_reason(exc), retryable=True, store="influxdb3") from exc
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows

    def list(
        self, limit: int, offset: int, query: RecordQuery | None = None
    ) -> list[dict[str, Any]]:
        where, params = _where(query or RecordQuery())
        params.update(limit=int(limit), offset=int(offset))
        tail = f" FROM {TABLE}{where} ORDER BY time DESC, vmid LIMIT $limit OFFSET $offset"
        missing = self._missing_later_fields()
        fields = [f for f in API_FIELDS[1:] if f not in missing]
        rows = self._query(
            "SELECT CAST(time AS BIGINT) AS time_ns, " + ", ".join(fields) + tail, params
        )
        out = []
        for row in rows:
            d = {k: row.get(k) for k in API_FIELDS}
            for k in _LATER_FIELDS:
                if k not in NUMERIC_LATER_FIELDS:
                    d[k] = d[k] or ""
            d["timestamp"] = _iso_from_ns(int(row["time_ns"]))
            out.append(d)
        return out

    def _missing_later_fields(self) -> set[str]:
        """The later fields the table has no column for yet (a table from before them).
        Once it has them all it always will, so that answer is kept."""
        if self._has_all_fields:
            return set()
        rows = self._query(_COLUMNS_SQL, {"table": TABLE})
        have = {str(r.get("column_name")) for r in rows}
        missing = {f for f in _LATER_FIELDS if f not in have}
        self._has_all_fields = bool(rows) and not missing
        return missing

    def _mark(self, record: dict[str, Any], field: str, when: datetime) -> None:
        from influxdb_client_3 import Point, WritePrecision

        # Same series and time: InfluxDB merges the field into the existing row.
        ts = datetime.fromisoformat(str(record["timestamp"])).replace(tzinfo=UTC)
        point = (
            Point(TABLE)
            .tag("dom", str(record["dom"]))
            .tag("vmid", str(record["vmid"]))
            .field(field, iso_utc(when))
            .time(_ns(ts), WritePrecision.NS)
        )
        self._write(point)

    def mark_deleted(self, record: dict[str, Any], when: datetime) -> None:
        self._mark(record, "deleted_at", when)

    def mark_location_deleted(self, record: dict[str, Any], kind: str, when: datetime) -> None:
        self._mark(record, _LOCATION_MARKS[kind], when)

    def stats(self) -> Stats:
        try:
            rows = self._query(_STATS_SQL)
        except RecordStoreError as exc:
            if "deleted_at" not in str(exc):
                raise
            rows = self._query(_STATS_SQL_BEFORE_RETENTION)
        if not rows or not rows[0].get("n"):
            return Stats(0, 0, 0, 0.0, None)
        r = rows[0]
        last = None if r["last_ns"] is None else _iso_from_ns(int(r["last_ns"]))
        return Stats(
            int(r["n"]), int(r["vms"]), int(r["size"] or 0), round(float(r["avg"] or 0.0), 3), last
        )

    def close(self) -> None:
        self._client.close()


def _reason(exc: Exception) -> str:
    text = str(exc).split("Detail: Python exception", 1)[0].strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
