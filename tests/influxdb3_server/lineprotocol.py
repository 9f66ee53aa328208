"""InfluxDB line protocol parser with the rules of InfluxDB 3's parser.

The grammar and the error messages follow the `influxdb_line_protocol` crate that
InfluxDB 3 uses, so the test server accepts and rejects the same input as the real one:

* measurement: ends at a space, tab, newline or comma; ``\\,`` ``\\ `` ``\\\\`` are escapes;
* tag keys/values and field keys: ``\\,`` ``\\=`` ``\\ `` ``\\\\`` are escapes; a key ends at
  ``=``, a tag value at ``,`` (an unescaped comma inside a key is literal, like upstream);
* a backslash before any other character is kept literally, but no name may end with one;
* string field values: ``\\"`` and ``\\\\`` are escapes, a lone backslash stays, and the
  string may contain newlines;
* field values: ``1i`` integer, ``1u`` unsigned, ``1``/``1.5``/``1e3`` float, ``"s"`` string,
  ``t T true True TRUE f F false False FALSE`` boolean;
* an optional integer timestamp.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

# Upstream limits string field values (and names) to 64 KiB.
STRING_LIMIT_BYTES = 65536
_CONTEXT_CHARS = 10

_INT_RE = re.compile(r"-?\d+i")
_UINT_RE = re.compile(r"\d+u")
# Order matters: the longest float form must be tried first, like the upstream `alt`.
_FLOAT_RES = (
    re.compile(r"-?\d+\.\d+[eE][+-]?\d+"),
    re.compile(r"-?\d+[eE][+-]?\d+"),
    re.compile(r"-?\d+\.\d+"),
    re.compile(r"-?\d+"),
)
_TIMESTAMP_RE = re.compile(r"-?\d+")
_BOOLS = (
    ("true", True),
    ("True", True),
    ("TRUE", True),
    ("t", True),
    ("T", True),
    ("false", False),
    ("False", False),
    ("FALSE", False),
    ("f", False),
    ("F", False),
)
_I64 = (-(2**63), 2**63 - 1)
_U64_MAX = 2**64 - 1
_WHITESPACE = " \t\n"


class FieldType(Enum):
    """Field value types; the values are InfluxDB 3's column type names."""

    FLOAT = "iox::column_type::field::float"
    INTEGER = "iox::column_type::field::integer"
    UINTEGER = "iox::column_type::field::uinteger"
    STRING = "iox::column_type::field::string"
    BOOLEAN = "iox::column_type::field::boolean"


FieldValue = float | int | str | bool


@dataclass(frozen=True)
class Line:
    """One parsed line: tags and fields keep their order in the input."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, tuple[FieldType, FieldValue]]
    timestamp: int | None


class LineProtocolError(ValueError):
    """A line that is not valid line protocol; the message is InfluxDB's."""


def _context(text: str) -> str:
    if text == "":
        return "end of input"
    shown = text if len(text) <= _CONTEXT_CHARS else text[:_CONTEXT_CHARS] + "..."
    return f"`{shown}`"


class _Cursor:
    """A position in one line; every parse step consumes from here."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    @property
    def rest(self) -> str:
        return self.text[self.pos :]

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def name(self, stops: str, escapable: str) -> str:
        """Read a measurement, key or tag value up to an unescaped stop character."""
        out: list[str] = []
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c == "\\":
                nxt = text[self.pos + 1 : self.pos + 2]
                if nxt and nxt in escapable:
                    out.append(nxt)
                else:
                    # Unknown escape: upstream keeps the backslash and the next char as-is.
                    out.append("\\" + nxt)
                self.pos += 1 + len(nxt)
                continue
            if c in stops:
                break
            out.append(c)
            self.pos += 1
        value = "".join(out)
        if value.endswith("\\"):
            raise LineProtocolError(
                "Measurements, tag keys and values, and field keys may not end with a backslash"
            )
        if len(value.encode()) > STRING_LIMIT_BYTES:
            raise LineProtocolError("String is greater than 64KB")
        return value

    def spaces(self) -> bool:
        start = self.pos
        while self.peek() == " ":
            self.pos += 1
        return self.pos > start

    def match(self, pattern: re.Pattern[str]) -> str | None:
        m = pattern.match(self.text, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return m.group()


def split_lines(body: str) -> list[str]:
    """Split a request body into lines the way InfluxDB does.

    A newline ends a line unless it is escaped or inside a quoted string field value, so
    string fields may span lines (this is a port of the Go parser's `scanLine` rules).
    """
    lines: list[str] = []
    start = 0
    quoted = fields = escaped = False
    equals = commas = 0
    for i, c in enumerate(body):
        if escaped:
            escaped = False
            continue
        if c == "\\":
            escaped = True
            continue
        if c == " ":
            fields = True
            continue
        if fields and not quoted and c == "=":
            equals += 1
            continue
        if fields and not quoted and c == ",":
            commas += 1
            continue
        if fields and c == '"' and equals > commas:
            quoted = not quoted
            continue
        if c == "\n" and not quoted:
            lines.append(body[start:i])
            start = i + 1
            quoted = fields = False
            equals = commas = 0
    lines.append(body[start:])
    return lines


def _trim_leading(text: str) -> str:
    """Drop leading whitespace and whole comment lines, as upstream does."""
    while True:
        text = text.lstrip(_WHITESPACE)
        if not text.startswith("#"):
            return text
        newline = text.find("\n")
        text = "" if newline < 0 else text[newline:]


def parse_lines(body: str) -> Iterator[tuple[str, Line | LineProtocolError]]:
    """Yield ``(raw line, parsed line or error)`` for every non-blank, non-comment line."""
    for raw in split_lines(body):
        text = _trim_leading(raw)
        if not text:
            continue
        try:
            yield raw, parse_line(text)
        except LineProtocolError as e:
            yield raw, e


def parse_line(text: str) -> Line:
    cur = _Cursor(text)
    measurement = cur.name(_WHITESPACE + ",\0", ", \\")
    if not measurement:
        raise LineProtocolError("Invalid measurement was provided")
    tags = _tag_set(cur) if cur.peek() == "," else {}
    if not cur.spaces():
        raise LineProtocolError(f"Expected at least one space character, got {_context(cur.rest)}")
    fields = _field_set(cur)
    timestamp = None
    before = cur.pos
    if cur.spaces():
        digits = cur.match(_TIMESTAMP_RE)
        if digits is None:
            cur.pos = before  # the space is then reported as trailing content
        else:
            timestamp = int(digits)
            if not _I64[0] <= timestamp <= _I64[1]:
                raise LineProtocolError(f"Unable to parse timestamp value `{digits}`")
            cur.spaces()
    if cur.rest:
        raise LineProtocolError(
            f"Could not parse entire line. Found trailing content: {_context(cur.rest)}"
        )
    return Line(measurement, tags, fields, timestamp)


def _tag_set(cur: _Cursor) -> dict[str, str]:
    cur.pos += 1  # the comma after the measurement
    after_comma = cur.rest
    tags: dict[str, str] = {}
    while True:
        start = cur.rest
        key = cur.name(_WHITESPACE + "=", ",= \\")
        if not key:
            raise LineProtocolError(f"Expected tag key, got {_context(start)}")
        if cur.peek() != "=":
            raise LineProtocolError(
                f"Tag set malformed: could not find equals sign in {_context(after_comma)}"
            )
        cur.pos += 1
        start = cur.rest
        value = cur.name(_WHITESPACE + ",", ",= \\")
        if not value:
            raise LineProtocolError(f"Expected tag value, got {_context(start)}")
        if key in tags:
            raise LineProtocolError(f"Must not contain duplicate tags, but `{key}` was repeated")
        tags[key] = value
        if cur.peek() != ",":
            return tags
        cur.pos += 1


def _field_set(cur: _Cursor) -> dict[str, tuple[FieldType, FieldValue]]:
    fields: dict[str, tuple[FieldType, FieldValue]] = {}
    while True:
        start = cur.pos
        field = _field(cur)
        if field is None:
            if not fields:
                raise LineProtocolError("No fields were provided")
            # Left for the caller to report as trailing content. Upstream's list parser
            # keeps the comma it consumed after the first field but not after later ones,
            # so "m a=1," is accepted and "m a=1,b=2," is not; mirror that.
            cur.pos = start if len(fields) == 1 else start - 1
            return fields
        key, value = field
        fields[key] = value  # a repeated field key: the last value wins
        if cur.peek() != ",":
            return fields
        cur.pos += 1


def _field(cur: _Cursor) -> tuple[str, tuple[FieldType, FieldValue]] | None:
    key = cur.name(_WHITESPACE + "=", ",= \\")
    if not key or cur.peek() != "=":
        return None
    cur.pos += 1
    value = _field_value(cur)
    return None if value is None else (key, value)


def _field_value(cur: _Cursor) -> tuple[FieldType, FieldValue] | None:
    if (token := cur.match(_INT_RE)) is not None:
        number = int(token[:-1])
        if not _I64[0] <= number <= _I64[1]:
            raise LineProtocolError(f"Unable to parse integer value `{token[:-1]}`")
        return FieldType.INTEGER, number
    if (token := cur.match(_UINT_RE)) is not None:
        number = int(token[:-1])
        if number > _U64_MAX:
            raise LineProtocolError(f"Unable to parse unsigned integer value `{token[:-1]}`")
        return FieldType.UINTEGER, number
    for pattern in _FLOAT_RES:
        if (token := cur.match(pattern)) is not None:
            return FieldType.FLOAT, float(token)
    if cur.peek() == '"':
        text = _string_value(cur)
        return None if text is None else (FieldType.STRING, text)
    for word, flag in _BOOLS:
        if cur.text.startswith(word, cur.pos):
            cur.pos += len(word)
            return FieldType.BOOLEAN, flag
    return None


def _string_value(cur: _Cursor) -> str | None:
    text = cur.text
    i = cur.pos + 1
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1 : i + 2] in ('"', "\\"):
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            value = "".join(out)
            if len(value.encode()) > STRING_LIMIT_BYTES:
                raise LineProtocolError("String is greater than 64KB")
            cur.pos = i + 1
            return value
        else:
            out.append(c)
            i += 1
    return None  # no closing quote: not a string value
