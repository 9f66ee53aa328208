"""The FastAPI app. ``uvicorn api.main:app`` (``memdump serve`` does this)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.docs import add_docs
from api.limits import BodySizeLimit
from api.routes import document_limits, router
from api.runs import LatestRunCache, PrefectRuns, Runs
from api.verify_jobs import VerifyJobs
from deployments.wake import wake_path
from memdump import __version__
from memdump.fsperm import private_umask
from memdump.records import open_reader
from memdump.records.base import RecordReader
from memdump.records.outbox import OutboxReader
from memdump.settings import Settings

# The longest the API's start waits for its Prefect client to be warm (see lifespan).
WARM_WAIT_SEC = 15.0

# uvicorn imports this module first: whatever it writes (verify's custody entries) is 0600.
private_umask()


def _remote_ip(host: str) -> bool:
    """A non-loopback IP address. Servers put the socket's IP here; a name (a test
    client's "testserver") is not a socket address and is not judged."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    # A dual-stack socket ("::") shows an IPv4 client as ::ffff:127.0.0.1.
    mapped = getattr(ip, "ipv4_mapped", None)
    return not (mapped or ip).is_loopback


def host_allowed(header: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names an allowed host: entries without a port allow any
    port, ``name:port`` only that port, ``*`` anything."""
    if "*" in allowed:
        return True
    host, port = split_host(header.strip().lower())
    if not host:
        return False
    for entry in allowed:
        ehost, eport = split_host(entry)
        if ehost == host and (eport is None or eport == port):
            return True
    return False


def split_host(value: str) -> tuple[str, str | None]:
    """``name[:port]``, ``[v6][:port]`` or a bare IPv6 address -> (host, port or None)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, (rest[1:] if rest.startswith(":") and rest[1:] else None)
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port or None
    return value, None


def _describe(errors: list[Any]) -> str:
    """One human-readable line from pydantic's error list (the contract has no 422)."""
    parts = []
    for err in errors[:5]:
        kind = err.get("type", "")
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if kind == "json_invalid":
            return "Invalid JSON in request body"
        if kind == "missing":
            parts.append(f"missing field: {loc}" if loc else "missing request body")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field: {loc}")
        else:
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", ""))
    return "Invalid request: " + "; ".join(parts)


def create_app(
    settings: Settings | None = None,
    *,
    store: RecordReader | None = None,
    runs: Runs | None = None,
) -> FastAPI:
    settings = settings or Settings()
    # However the app is served (memdump serve, uvicorn by hand): no anonymous API
    # beyond loopback. A --host given to uvicorn directly is caught per request below.
    settings.check_api_exposure()
    prefect_runs = (
        PrefectRuns(
            settings.orchestration.flow_name,
            settings.orchestration.deployment,
            wake=wake_path(settings.data_dir),
        )
        if runs is None
        else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if prefect_runs is not None:
            # The first trigger's Prefect client start-up, paid before the API answers
            # (`memdump serve` waits for it, as for the rest of its start-up): started
            # beside it, the first trigger still raced it and took 0.75 s (2026-12-01).
            # A Prefect server that is slow to answer holds the start for WARM_WAIT_SEC
            # at most; the warming then goes on beside the API.
            warm = threading.Thread(target=prefect_runs.warm, name="memdump-api-warm", daemon=True)
            warm.start()
            await asyncio.to_thread(warm.join, WARM_WAIT_SEC)
        yield

    app = FastAPI(
        title="memdump",
        version=__version__,
        description="Forensic memory dumps of running VMs. Contract: memory-dumps-api.md.",
        # FastAPI's own pages load their assets from a CDN: ours are local (api.docs).
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    add_docs(app)
    app.state.settings = settings
    # Read-only (least privilege): records are written by the collectors, never the API.
    app.state.store = store or open_reader(settings)
    app.state.outbox = OutboxReader(settings.outbox_db)
    app.state.runs = runs if runs is not None else prefect_runs
    app.state.latest_run = LatestRunCache(app.state.runs, settings.api.status_cache_sec)

    app.state.verify_jobs = VerifyJobs(settings.verify.max_concurrent, settings.verify.jobs_kept)
    token = settings.api.token.get_secret_value().encode() if settings.api.token else None
    allowed_hosts = settings.allowed_api_hosts()
    anonymous_anywhere = settings.api.allow_anonymous

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        # DNS rebinding: a browser sends the attacker's name as Host, whatever address
        # it resolved to. Checked first, for every path.
        if not host_allowed(request.headers.get("host", ""), allowed_hosts):
            return JSONResponse(
                {"detail": "Invalid Host header (not in MEMDUMP_API__ALLOWED_HOSTS)"},
                status_code=400,
            )
        if token is None and not anonymous_anywhere:
            # Served beyond loopback without a token (e.g. `uvicorn --host 0.0.0.0`,
            # which the start-up check cannot see): the connection's local address says.
            server = request.scope.get("server")
            if server and server[1] is not None and _remote_ip(str(server[0])):
                return JSONResponse(
                    {
                        "detail": "This API has no MEMDUMP_API__TOKEN and answers on loopback"
                        " only (MEMDUMP_API__ALLOW_ANONYMOUS=true overrides)"
                    },
                    status_code=403,
                )
        # Everything but /health (docs included) needs the bearer token when one is set.
        if token is not None and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token):
                return JSONResponse(
                    {"detail": "Not authenticated: a valid bearer token is required"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe(list(exc.errors()))}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(
            {"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(router)

    def openapi() -> dict[str, Any]:
        # FastAPI documents a 422 for every validated route; this API answers 400 instead.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            schemas = spec.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            document_limits(spec, settings.api.records_max_limit)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Outermost: an oversized body is refused before anything reads it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.api.max_body_bytes)
    return app


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn api.main:app``: built on first use so importing api.main has no side effects.
    if name == "app":
        return create_app()
    raise AttributeError(name)
