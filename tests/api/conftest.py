"""One Prefect test harness (a real, temporary Prefect server) for the API tests that need
one, started on first use and stopped after the last test of tests/api: each module
starting its own cost CI a server start per module."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.prefect_harness import prefect_harness
from tests.helpers.prefect_requests import PrefectRequests


@pytest.fixture(scope="package")
def prefect_server() -> Iterator[None]:
    with prefect_harness():
        yield


@pytest.fixture
def prefect_requests(prefect_server: None, monkeypatch: pytest.MonkeyPatch) -> PrefectRequests:
    """Counts what this process asks the Prefect server (through httpx, under Prefect's
    client)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    api_url = str(PREFECT_API_URL.value()).rstrip("/")
    seen = PrefectRequests()
    send = httpx.Client.send

    def counting(self: httpx.Client, request: httpx.Request, **kw: Any) -> httpx.Response:
        resp = send(self, request, **kw)
        url = str(request.url)
        if url.startswith(api_url):
            path = re.sub(r"/[0-9a-f]{8}-[0-9a-f-]{27}", "/{id}", url[len(api_url) :])
            seen.sent.append(f"{request.method} {path.split('?')[0]}")
            try:
                body = resp.json()
            except ValueError:
                body = None
            seen.rows.append(len(body) if isinstance(body, list) else None)
            seen.status.append(resp.status_code)
        return resp

    monkeypatch.setattr(httpx.Client, "send", counting)
    return seen
