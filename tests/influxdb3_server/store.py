"""In-memory databases: one table per measurement, typed columns, Arrow snapshots for queries.

Semantics copied from InfluxDB 3 Core because code under test may depend on them:

* a database and its tables come into existence on the first successful write;
* a column keeps the type of its first write (tag, or one field type); a line that
  disagrees is rejected on its own, the other lines of the request are kept;
* a point is identified by its measurement, tag set and time: writing the same point
  again updates its fields (last write wins per field) instead of adding a row;
* tags are ``Dictionary(Int32, Utf8)``, ``time`` is ``Timestamp(ns)`` without time zone,
  and ``SELECT *`` columns come out in name order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pyarrow as pa

from tests.influxdb3_server.lineprotocol import FieldType, FieldValue, Line, LineProtocolError

TIME = "time"
_I64 = (-(2**63), 2**63 - 1)


class Precision(Enum):
    AUTO = "auto"
    NANOSECOND = "nanosecond"
    MICROSECOND = "microsecond"
    MILLISECOND = "millisecond"
    SECOND = "second"

    def to_ns(self, ts: int) -> int:
        if self is Precision.AUTO:
            # InfluxDB 3 guesses the unit from the magnitude of the timestamp.
            size = abs(ts)
            unit = (
                Precision.SECOND
                if size < 5e9
                else Precision.MILLISECOND
                if size < 5e12
                else Precision.MICROSECOND
                if size < 5e15
                else Precision.NANOSECOND
            )
            return unit.to_ns(ts)
        return ts * _NS_PER[self]


_NS_PER = {
    Precision.NANOSECOND: 1,
    Precision.MICROSECOND: 1_000,
    Precision.MILLISECOND: 1_000_000,
    Precision.SECOND: 1_000_000_000,
}


class ColumnType(Enum):
    TAG = "iox::column_type::tag"
    TIMESTAMP = "iox::column_type::timestamp"
    FLOAT = FieldType.FLOAT.value
    INTEGER = FieldType.INTEGER.value
    UINTEGER = FieldType.UINTEGER.value
    STRING = FieldType.STRING.value
    BOOLEAN = FieldType.BOOLEAN.value

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW_TYPES[self]


_ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    ColumnType.TAG: pa.dictionary(pa.int32(), pa.string()),
    ColumnType.TIMESTAMP: pa.timestamp("ns"),
    ColumnType.FLOAT: pa.float64(),
    ColumnType.INTEGER: pa.int64(),
    ColumnType.UINTEGER: pa.uint64(),
    ColumnType.STRING: pa.string(),
    ColumnType.BOOLEAN: pa.bool_(),
}

# Names accepted by POST /api/v3/configure/table for field columns.
CONFIGURE_FIELD_TYPES = {
    "utf8": ColumnType.STRING,
    "int64": ColumnType.INTEGER,
    "uint64": ColumnType.UINTEGER,
    "float64": ColumnType.FLOAT,
    "bool": ColumnType.BOOLEAN,
}


@dataclass(frozen=True)
class LineError:
    """One rejected line, serialised exactly like InfluxDB's `WriteLineError`."""

    original_line: str
    line_number: int
    error_message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "original_line": self.original_line,
            "line_number": self.line_number,
            "error_message": self.error_message,
        }


@dataclass
class WriteResult:
    line_count: int = 0
    rejected: list[LineError] = field(default_factory=list)
    # Set when accept_partial=false stopped the write at this line: nothing was stored.
    aborted_at: LineError | None = None


class DatabaseNotFound(LookupError):
    def __init__(self, db: str) -> None:
        super().__init__(f"database not found: {db}")


@dataclass
class Table:
    name: str
    columns: dict[str, ColumnType] = field(default_factory=lambda: {TIME: ColumnType.TIMESTAMP})
    # Keyed by (time, sorted tag items) so that a rewritten point replaces its fields.
    rows: dict[tuple[int, tuple[tuple[str, str], ...]], dict[str, Any]] = field(
        default_factory=dict
    )
    _arrow: pa.Table | None = None

    def upsert(self, tags: dict[str, str], fields: dict[str, FieldValue], time_ns: int) -> None:
        key = (time_ns, tuple(sorted(tags.items())))
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = {**tags, **fields, TIME: time_ns}
        else:
            row.update(fields)
        self._arrow = None

    def to_arrow(self) -> pa.Table:
        if self._arrow is None:
            names = sorted(self.columns)
            rows = list(self.rows.values())
            arrays = [
                pa.array([r.get(n) for r in rows], type=self.columns[n].arrow_type) for n in names
            ]
            schema = pa.schema([pa.field(n, self.columns[n].arrow_type) for n in names])
            self._arrow = pa.Table.from_arrays(arrays, schema=schema)
        return self._arrow


class Store:
    """All databases of one server; safe to use from the HTTP and the Flight threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dbs: dict[str, dict[str, Table]] = {}

    def databases(self) -> list[str]:
        with self._lock:
            return sorted(self._dbs)

    def create_database(self, db: str) -> bool:
        with self._lock:
            if db in self._dbs:
                return False
            self._dbs[db] = {}
            return True

    def create_table(self, db: str, table: str, columns: dict[str, ColumnType]) -> None:
        with self._lock:
            tables = self._dbs.get(db)
            if tables is None:
                raise DatabaseNotFound(db)
            if table in tables:
                raise FileExistsError(f"table '{table}' already exists in database '{db}'")
            t = Table(table)
            t.columns.update(columns)
            tables[table] = t

    def snapshot(self, db: str) -> dict[str, pa.Table]:
        """Arrow copies of every table of `db`, for a query to run without the lock."""
        with self._lock:
            tables = self._dbs.get(db)
            if tables is None:
                raise DatabaseNotFound(db)
            return {name: t.to_arrow() for name, t in tables.items()}

    def write(
        self,
        db: str,
        parsed: list[tuple[str, Line | LineProtocolError]],
        precision: Precision,
        accept_partial: bool,
        now_ns: int,
    ) -> WriteResult:
        """Validate every line against the (growing) schema, then store the valid ones.

        Validation happens on a copy of the schema, so a request rejected because of
        accept_partial=false leaves no trace, like upstream.
        """
        result = WriteResult(line_count=len(parsed))
        accepted: list[tuple[str, Line, int]] = []
        with self._lock:
            existing = self._dbs.get(db, {})
            staged: dict[str, dict[str, ColumnType]] = {}
            for number, (raw, line) in enumerate(parsed, start=1):
                try:
                    if isinstance(line, LineProtocolError):
                        raise line
                    columns = staged.get(line.measurement)
                    if columns is None:
                        table = existing.get(line.measurement)
                        columns = dict(table.columns) if table else {TIME: ColumnType.TIMESTAMP}
                    new_columns = _check_line(line, columns)
                    time_ns = _time_ns(line, precision, now_ns)
                except LineProtocolError as e:
                    error = LineError(raw, number, str(e))
                    if not accept_partial:
                        return WriteResult(len(parsed), [error], aborted_at=error)
                    result.rejected.append(error)
                    continue
                columns.update(new_columns)
                staged[line.measurement] = columns
                accepted.append((line.measurement, line, time_ns))
            if accepted:
                tables = self._dbs.setdefault(db, {})
                for name, columns in staged.items():
                    tables.setdefault(name, Table(name)).columns.update(columns)
                for name, line, time_ns in accepted:
                    fields = {k: v for k, (_, v) in line.fields.items()}
                    tables[name].upsert(line.tags, fields, time_ns)
        return result


def _check_line(line: Line, columns: dict[str, ColumnType]) -> dict[str, ColumnType]:
    """Return the columns this line adds; raise if it conflicts with the table's schema."""
    wanted: dict[str, ColumnType] = {k: ColumnType.TAG for k in line.tags}
    for key, (ftype, _) in line.fields.items():
        if key in wanted:
            raise LineProtocolError(f"column '{key}' is used as both a tag and a field")
        wanted[key] = ColumnType(ftype.value)
    if TIME in wanted:
        raise LineProtocolError(f"column name '{TIME}' is reserved for the timestamp")
    new: dict[str, ColumnType] = {}
    for key, ctype in wanted.items():
        have = columns.get(key)
        if have is None:
            new[key] = ctype
        elif have is not ctype:
            raise LineProtocolError(
                f"invalid column type for column '{key}', expected {have.value}, got {ctype.value}"
            )
    return new


def _time_ns(line: Line, precision: Precision, now_ns: int) -> int:
    if line.timestamp is None:
        return now_ns
    ts = precision.to_ns(line.timestamp)
    if not _I64[0] <= ts <= _I64[1]:
        raise LineProtocolError(f"timestamp {line.timestamp} is out of range for {precision.value}")
    return ts
