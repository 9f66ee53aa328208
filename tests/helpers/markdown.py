"""Rendering markdown the way a viewer would (CommonMark + GFM tables), to check that
escaped values stay text."""

from __future__ import annotations

from markdown_it import MarkdownIt


def render_table(markdown: str) -> list[list[str]]:
    """The table rows of ``markdown`` as rendered text; refuses any other markup."""
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    tokens = md.parse(markdown)
    kinds = {t.type for t in tokens} | {c.type for t in tokens for c in t.children or []}
    assert kinds <= {
        "table_open",
        "thead_open",
        "tr_open",
        "th_open",
        "inline",
        "text",
        "th_close",
        "tr_close",
        "thead_close",
        "tbody_open",
        "td_open",
        "td_close",
        "tbody_close",
        "table_close",
        "strong_open",
        "strong_close",
    }, kinds  # no link, image, html, code, emphasis, list, heading
    rows: list[list[str]] = []
    row: list[str] = []
    for t in tokens:
        if t.type == "tr_open":
            row = []
        elif t.type == "inline":
            row.append(t.content and "".join(c.content for c in t.children or []))
        elif t.type == "tr_close":
            rows.append(row)
    return rows
