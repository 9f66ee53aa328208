"""Issue 11 item 12: no empty token, no anonymous API beyond loopback, and a Host header
allow-list against DNS rebinding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.main import create_app
from memdump.errors import ConfigError
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from tests.helpers.api import FakeRuns

REPO = Path(__file__).resolve().parents[2]
BASE = "/api/memory-dumps"


def _app(tmp_path: Path, **settings: object) -> TestClient:
    s = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    app = create_app(s, store=SQLiteRecordStore(tmp_path / "r.db"), runs=FakeRuns())
    return TestClient(app, base_url="http://localhost")


# -- empty token ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_token_is_a_settings_error(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="MEMDUMP_API__TOKEN is empty"):
        Settings(data_dir=tmp_path, api={"token": value})  # type: ignore[arg-type]
    monkeypatch.setenv("MEMDUMP_API__TOKEN", value)
    with pytest.raises(ValidationError, match="MEMDUMP_API__TOKEN is empty"):
        Settings(data_dir=tmp_path)


# -- bind address ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.5", "api.internal"])  # noqa: S104
def test_non_loopback_bind_without_token_is_refused(tmp_path: Path, host: str) -> None:
    s = Settings(data_dir=tmp_path, api={"host": host})
    with pytest.raises(ConfigError, match="MEMDUMP_API__TOKEN") as err:
        s.check_api_exposure()
    assert err.value.fields["setting"] == "MEMDUMP_API__TOKEN"
    with pytest.raises(ConfigError, match="MEMDUMP_API__ALLOW_ANONYMOUS"):
        create_app(s, store=SQLiteRecordStore(tmp_path / "r.db"), runs=FakeRuns())
    # The same settings with a token, or the explicit override, start.
    Settings(data_dir=tmp_path, api={"host": host, "token": "t"}).check_api_exposure()  # type: ignore[arg-type]
    Settings(data_dir=tmp_path, api={"host": host, "allow_anonymous": True}).check_api_exposure()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"]
)
def test_loopback_bind_without_token_is_fine(tmp_path: Path, host: str) -> None:
    Settings(data_dir=tmp_path, api={"host": host}).check_api_exposure()
    # memdump serve may check the address it is about to give uvicorn.
    with pytest.raises(ConfigError):
        Settings(data_dir=tmp_path, api={"host": host}).check_api_exposure("0.0.0.0")  # noqa: S104


def test_request_on_a_non_loopback_socket_without_token_is_refused(tmp_path: Path) -> None:
    # `uvicorn api.main:app --host 0.0.0.0` by hand: the settings say 127.0.0.1, the
    # connection's local address (ASGI "server") says otherwise.
    hosts = ["10.0.0.5"]
    c = _app(tmp_path, api={"allowed_hosts": hosts})
    c.base_url = c.base_url.copy_with(host="10.0.0.5")
    r = c.get(f"{BASE}/stats")
    assert r.status_code == 403 and "MEMDUMP_API__TOKEN" in r.json()["detail"]
    assert list(r.json()) == ["detail"]
    for extra in ({"allow_anonymous": True}, {"token": "t"}):
        c2 = _app(tmp_path, api={"allowed_hosts": hosts, **extra})
        c2.base_url = c2.base_url.copy_with(host="10.0.0.5")
        r2 = c2.get(f"{BASE}/stats", headers={"authorization": "Bearer t"})
        assert r2.status_code == 200, r2.text


@pytest.mark.parametrize(("server", "code"), [("::ffff:127.0.0.1", 200), ("::ffff:10.0.0.5", 403)])
def test_dual_stack_socket_addresses(tmp_path: Path, server: str, code: int) -> None:
    # uvicorn --host :: shows an IPv4 client's local address as an IPv4-mapped one.
    c = _app(tmp_path, api={"allowed_hosts": ["*"]})
    c.base_url = c.base_url.copy_with(host=f"[{server}]")
    assert c.get(f"{BASE}/stats").status_code == code


# -- Host header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", ""],
)
@pytest.mark.parametrize("path", [f"{BASE}/stats", f"{BASE}/status", "/health", "/docs"])
def test_foreign_host_header_is_400(tmp_path: Path, host: str, path: str) -> None:
    c = _app(tmp_path)
    r = c.get(path, headers={"host": host})
    assert r.status_code == 400
    assert list(r.json()) == ["detail"] and "Host" in r.json()["detail"]


def test_foreign_host_is_refused_before_the_token_and_the_trigger(tmp_path: Path) -> None:
    runs = FakeRuns()
    s = Settings(data_dir=tmp_path, api={"token": "t"})  # type: ignore[arg-type]
    c = TestClient(create_app(s, store=SQLiteRecordStore(tmp_path / "r.db"), runs=runs))
    r = c.post(
        f"{BASE}/trigger",
        json={"vm_ids": ["101"]},
        headers={"host": "evil.example", "authorization": "Bearer t"},
    )
    assert r.status_code == 400 and runs.triggered == []


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"]
)
def test_default_hosts_pass(tmp_path: Path, host: str) -> None:
    assert _app(tmp_path).get(f"{BASE}/stats", headers={"host": host}).status_code == 200


def test_bound_host_and_configured_hosts(tmp_path: Path) -> None:
    c = _app(tmp_path, api={"host": "10.1.2.3", "token": "t"})
    auth = {"authorization": "Bearer t"}
    assert c.get(f"{BASE}/stats", headers={**auth, "host": "10.1.2.3:8000"}).status_code == 200
    assert c.get(f"{BASE}/stats", headers={**auth, "host": "10.1.2.4:8000"}).status_code == 400
    c = _app(tmp_path, api={"allowed_hosts": ["memdump.example:443", "ops.example"]})
    ok = ("memdump.example:443", "ops.example", "ops.example:8443")
    for host in ok:
        assert c.get(f"{BASE}/stats", headers={"host": host}).status_code == 200, host
    for host in ("memdump.example", "memdump.example:80", "localhost"):
        assert c.get(f"{BASE}/stats", headers={"host": host}).status_code == 400, host
    c = _app(tmp_path, api={"allowed_hosts": ["*"]})
    assert c.get(f"{BASE}/stats", headers={"host": "anything.example"}).status_code == 200


def test_allowed_hosts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMDUMP_API__ALLOWED_HOSTS", "memdump.example:443, Ops.example")
    assert Settings().allowed_api_hosts() == ("memdump.example:443", "ops.example")
    monkeypatch.setenv("MEMDUMP_API__ALLOWED_HOSTS", '["a.example"]')
    assert Settings().allowed_api_hosts() == ("a.example",)
    monkeypatch.setenv("MEMDUMP_API__ALLOWED_HOSTS", " , ")
    with pytest.raises(ValidationError, match="MEMDUMP_API__ALLOWED_HOSTS"):
        Settings()


# -- a real uvicorn ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _outward_ip() -> str | None:
    """This machine's address on its default route (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = str(s.getsockname()[0])
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def _uvicorn(tmp_path: Path, host: str, port: int, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEMDUMP_API_")}
    environ.update(MEMDUMP_DATA_DIR=str(tmp_path), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port)],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _get(url: str, host: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_up(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"uvicorn not up at {url}")


def test_real_uvicorn_refuses_to_start_on_all_interfaces_without_token(tmp_path: Path) -> None:
    port = _free_port()
    proc = _uvicorn(tmp_path, "0.0.0.0", port, MEMDUMP_API__HOST="0.0.0.0")  # noqa: S104
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert b"MEMDUMP_API__TOKEN" in out and b"0.0.0.0" in out
    with pytest.raises(OSError):  # nothing listens
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_real_uvicorn_bound_by_hand_answers_loopback_only(tmp_path: Path) -> None:
    """uvicorn --host 0.0.0.0 with settings that say loopback: the start-up check cannot
    see the flag, so a request arriving on another address is refused; loopback works,
    and a rebinding Host header is refused even on loopback."""
    port = _free_port()
    outward = _outward_ip()
    env = {"MEMDUMP_API__ALLOWED_HOSTS": f"localhost,127.0.0.1,{outward or 'none.invalid'}"}
    proc = _uvicorn(tmp_path, "0.0.0.0", port, **env)  # noqa: S104
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}/health")
        assert _get(f"http://127.0.0.1:{port}{BASE}/stats") == 200
        assert _get(f"http://127.0.0.1:{port}{BASE}/stats", host="evil.example") == 400
        if outward is None:
            pytest.skip("no non-loopback address on this machine")
        assert _get(f"http://{outward}:{port}{BASE}/stats") == 403
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
