"""Issue 16 item 1: the API's docs in a real browser on a machine without internet access.

Debian's chromium (headless) and the API (``uvicorn api.main:app``, as ``memdump serve``
starts it) share a network namespace whose only interface is loopback: FastAPI's
default pages, whose JavaScript comes from a CDN, render nothing there. The DOM the
browser built must hold every operation of the OpenAPI document (Swagger UI at /docs,
ReDoc at /redoc), and every request it made must have been answered by the API.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from api.main import create_app
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns, client
from tests.helpers.browser import offline_api

# The contract's operations (memory-dumps-api.md), which every page must show.
CONTRACT = {
    ("POST", "/api/memory-dumps/trigger"),
    ("GET", "/api/memory-dumps/records"),
    ("GET", "/api/memory-dumps/status"),
    ("GET", "/api/memory-dumps/stats"),
}


class SwaggerOperations(HTMLParser):
    """(method, path, summary) of each operation block Swagger UI rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[dict[str, str]] = []
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "div" and "opblock" in classes:
            self.ops.append({"method": "", "path": "", "summary": ""})
        elif self.ops and "opblock-summary-method" in classes:
            self._field = "method"
        elif self.ops and "opblock-summary-path" in classes:
            self.ops[-1]["path"] = a.get("data-path") or ""
        elif self.ops and "opblock-summary-description" in classes:
            self._field = "summary"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "div"):
            self._field = None

    def handle_data(self, data: str) -> None:
        if self._field is not None:
            self.ops[-1][self._field] += data


def _spec(tmp_path: Path) -> dict[str, Any]:
    settings = Settings(data_dir=tmp_path / "spec")
    app = create_app(settings, store=SQLiteRecordStore(tmp_path / "spec.db"), runs=FakeRuns())
    spec: dict[str, Any] = client(app).get("/openapi.json").json()
    return spec


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(METHOD, path, summary, operationId) of every operation of the document."""
    return [
        (method.upper(), path, op["summary"], op["operationId"])
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    ]


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The DOM of /docs and /redoc as chromium built it offline, and the API's log."""
    base = tmp_path_factory.mktemp("docs-browser")
    with offline_api(base / "data") as api:
        docs = api.dump_dom("/docs", base / "profile-docs")
        redoc = api.dump_dom("/redoc", base / "profile-redoc")
    return {"docs": docs, "redoc": redoc, "log": api.log.read_text(errors="replace")}


def test_swagger_ui_renders_every_operation_offline(pages: dict[str, str], tmp_path: Path) -> None:
    parser = SwaggerOperations()
    parser.feed(pages["docs"])
    rendered = {(o["method"].strip(), o["path"], o["summary"].strip()) for o in parser.ops}
    expected = {(m, p, s) for m, p, s, _ in _operations(_spec(tmp_path))}
    assert rendered == expected, pages["docs"][-3000:]
    assert CONTRACT <= {(m, p) for m, p, _ in rendered}
    assert len(parser.ops) == len(expected)  # each once


def test_redoc_renders_every_operation_offline(pages: dict[str, str], tmp_path: Path) -> None:
    ids = set(re.findall(r'id="tag/[^"/]+/operation/([^"]+)"', pages["redoc"]))
    ops = _operations(_spec(tmp_path))
    assert ids == {op_id for *_, op_id in ops}, pages["redoc"][-3000:]
    for _, path, summary, _ in ops:  # headings and paths as text, not only anchors
        assert summary in pages["redoc"] and path in pages["redoc"]


def test_every_request_of_the_pages_was_served_by_the_api(pages: dict[str, str]) -> None:
    requests = re.findall(r'"GET (\S+) HTTP/1\.1" (\d{3})', pages["log"])
    assert {path for path, _ in requests} >= {
        "/docs",
        "/redoc",
        "/openapi.json",
        "/docs-assets/swagger-ui-bundle.js",
        "/docs-assets/swagger-ui.css",
        "/docs-assets/redoc.standalone.js",
    }, pages["log"]
    assert all(code == "200" for _, code in requests), pages["log"]
