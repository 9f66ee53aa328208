"""`memdump serve` starts its runner beside its Prefect server: the runner
(deployments.serve.wait_for_prefect) asks nothing of Prefect before the server's health
check answers, with the server's credential, and gives up with a clear error."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from deployments.serve import wait_for_prefect
from memdump.errors import ConfigError


class _Health(BaseHTTPRequestHandler):
    answers: list[int] = []
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        code = self.answers.pop(0) if self.answers else 200
        self.send_response(code)
        self.send_header("content-length", "4")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Health.answers, _Health.seen = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/api"
    srv.shutdown()
    srv.server_close()


def test_waits_for_the_health_check_with_the_servers_credential(server: str) -> None:
    _Health.answers = [503, 503]  # starting: migrations, blocks
    with temporary_settings({PREFECT_API_URL: server, PREFECT_API_AUTH_STRING: "memdump:s3cret"}):
        wait_for_prefect(timeout=30)
    token = base64.b64encode(b"memdump:s3cret").decode()
    assert _Health.seen == [("/api/health", f"Basic {token}")] * 3


def test_a_server_that_never_answers_is_an_error_naming_it() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    with (
        temporary_settings({PREFECT_API_URL: url}),
        pytest.raises(ConfigError, match=f"Prefect's API at {url} not ready after 1 s"),
    ):
        wait_for_prefect(timeout=1)
