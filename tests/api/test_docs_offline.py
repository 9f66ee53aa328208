"""Issue 16 item 1: /docs and /redoc load nothing from outside the API (their assets come
from an installed package, api/docs.py), and stay behind the token like every route but
/health. The browser test (tests/e2e/test_docs_browser.py) shows they render offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.docs import ASSETS, ASSETS_URL, assets_dir
from api.main import create_app
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns, client

PAGES = ["/docs", "/redoc"]


def _client(tmp_path: Path, **settings: object) -> TestClient:
    s = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return client(create_app(s, store=SQLiteRecordStore(tmp_path / "r.db"), runs=FakeRuns()))


def _references(html: str) -> list[str]:
    """Every URL a page loads or links to: src/href attributes and quoted URLs in its
    inline script (Swagger UI's `url: '/openapi.json'`, ReDoc's spec-url)."""
    urls = re.findall(r'(?:src|href|spec-url)\s*=\s*"([^"]*)"', html)
    urls += re.findall(r"""\burl:\s*['"]([^'"]*)['"]""", html)
    return urls


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_only_from_the_api_itself(tmp_path: Path, page: str) -> None:
    c = _client(tmp_path)
    r = c.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = _references(r.text)
    assert refs, r.text
    # No CDN, no font service, no other host: every reference is a path of this API...
    assert not re.search(r"https?://|//[a-z]", r.text.replace("http://www.w3.org", "")), r.text
    assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    # ...and the API answers each with the file the package ships.
    for ref in refs:
        got = c.get(ref)
        assert got.status_code == 200, ref
        name = ref.removeprefix(ASSETS_URL + "/")
        if name in ASSETS:
            assert got.content == (assets_dir() / name).read_bytes()
            assert got.headers["content-type"] == ASSETS[name]


def test_swagger_ui_sends_nothing_to_an_online_validator(tmp_path: Path) -> None:
    html = _client(tmp_path).get("/docs").text
    assert '"validatorUrl": null' in html


@pytest.mark.parametrize(
    "path", [*PAGES, "/docs/oauth2-redirect", *(f"{ASSETS_URL}/{name}" for name in ASSETS)]
)
def test_docs_and_their_assets_need_the_token(tmp_path: Path, path: str) -> None:
    c = _client(tmp_path, api={"token": "secret"})
    r = c.get(path)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert list(r.json()) == ["detail"]
    assert c.get(path, headers={"authorization": "Bearer secret"}).status_code == 200


@pytest.mark.parametrize(
    "name", ["core.py", "../core.py", "..%2Fcore.py", "%2e%2e%2f__init__.py", "RECORD", ""]
)
def test_only_the_named_assets_are_served(tmp_path: Path, name: str) -> None:
    r = _client(tmp_path).get(f"{ASSETS_URL}/{name}")
    assert r.status_code == 404 and list(r.json()) == ["detail"]


def test_docs_routes_are_not_operations_of_the_api(tmp_path: Path) -> None:
    paths = _client(tmp_path).get("/openapi.json").json()["paths"]
    assert all(p.startswith("/api/memory-dumps/") for p in paths), sorted(paths)
