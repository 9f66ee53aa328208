"""Escaping for what people read: markdown artifacts and CSV exports.

Values from records, hypervisors and errors (VM names, paths, stderr) are data, never
markup or formulas. Each escape is defined here once and used wherever such a value
reaches markdown or a CSV cell.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Every ASCII punctuation character: CommonMark lets any of them be backslash-escaped and
# then renders it literally (no emphasis, link, table cell, HTML, autolink, list...).
_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")
# A spreadsheet reads a cell starting with one of these as a formula (or, for tab and
# CR, strips them and reads what follows): OWASP's CSV injection list.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def md_text(value: object, max_len: int | None = None) -> str:
    """``value`` as literal inline markdown: ASCII punctuation backslash-escaped, control
    characters (newlines included) shown as ``\\xNN``, so it stays on its line and in its
    table cell. ``max_len`` cuts the raw text first (an escape is never cut in two)."""
    text = str(value)
    if max_len is not None and len(text) > max_len:
        text = text[:max_len] + "..."
    escaped = _PUNCT.sub(r"\\\1", text)
    return _CONTROL.sub(lambda m: f"\\\\x{ord(m.group()):02x}", escaped)


def plain_text(value: object) -> str:
    """``value`` for a terminal or a plain-text line: control characters (escape
    sequences, newlines, tabs) shown as ``\\xNN``, the rest as it is."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def csv_cell(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula: text starting with ``=``, ``+``,
    ``-``, ``@``, tab or CR gets a leading ``'``. Numbers and None pass unchanged (a
    negative number is a value, not a formula)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
