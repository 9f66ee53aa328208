"""The one HTTP client of the commands that talk to a running service (`memdump serve`)
over its REST API, and the options they share (--api, --timeout)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memdump.settings import Settings

if TYPE_CHECKING:
    import httpx

API_PREFIX = "/api/memory-dumps"


class ApiError(Exception):
    """The API answered an error, or could not be reached: printed, exit 1."""


def api_base(settings: Settings, given: str | None) -> str:
    """``--api``, else ``http://MEMDUMP_API__HOST:MEMDUMP_API__PORT`` (a wildcard bind
    address means this host)."""
    if given:
        return given.rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
        settings.api.host, settings.api.host
    )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


def _http(base_url: str, headers: dict[str, str], timeout: float) -> httpx.Client:
    """The HTTP client (tests put a FastAPI TestClient here)."""
    import httpx

    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout)


class Api:
    def __init__(self, base: str, token: str | None, timeout: float = 30.0) -> None:
        from memdump import __version__

        self.base = base
        self.timeout = timeout
        headers = {"user-agent": f"memdump-cli/{__version__}"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.http = _http(base, headers, timeout)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            r = self.http.request(method, API_PREFIX + path, **kw)
        except httpx.ConnectError as exc:
            raise ApiError(
                f"cannot connect to the memdump API ({exc}): "
                f"is `memdump serve` running at {self.base}?"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(
                f"the memdump API at {self.base} did not answer within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"request to the memdump API at {self.base} failed: {exc}") from None
        if r.status_code >= 400:
            try:
                detail = r.json()["detail"]
            except Exception:
                detail = r.text.strip()[:500] or r.reason_phrase
            raise ApiError(f"{detail} (HTTP {r.status_code})")
        return r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def close(self) -> None:
        self.http.close()


ApiCommand = Callable[[Api, argparse.Namespace], int]


def api_command(command: ApiCommand) -> Callable[[Settings, argparse.Namespace], int]:
    """A command handler that runs ``command`` with a client for the service; an
    ApiError is printed, exit 1."""

    def handler(settings: Settings, args: argparse.Namespace) -> int:
        token = settings.api.token.get_secret_value() if settings.api.token else None
        try:
            api = Api(api_base(settings, args.api), token, args.timeout)
            try:
                return command(api, args)
            finally:
                api.close()
        except ApiError as exc:
            print(f"memdump: {exc}", file=sys.stderr)
            return 1

    return handler


def positive(text: str) -> float:
    """A positive, finite number of seconds (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def options() -> argparse.ArgumentParser:
    """The options every service command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        metavar="URL",
        help="base URL of the service (default: http://MEMDUMP_API__HOST:MEMDUMP_API__PORT);"
        " the token is MEMDUMP_API__TOKEN",
    )
    common.add_argument(
        "--timeout", type=positive, default=30.0, help="seconds per HTTP request (default 30)"
    )
    return common
