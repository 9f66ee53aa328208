"""The FastAPI app. ``uvicorn api.main:app`` (``memdump serve`` does this)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.limits import BodySizeLimit
from api.routes import router
from api.runs import LatestRunCache, PrefectRuns, Runs
from memdump import __version__
from memdump.records import Outbox, open_store
from memdump.records.base import RecordStore
from memdump.settings import Settings


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
    store: RecordStore | None = None,
    runs: Runs | None = None,
) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="memdump",
        version=__version__,
        description="Forensic memory dumps of running VMs. Contract: memory-dumps-api.md.",
    )
    app.state.settings = settings
    app.state.store = store or open_store(settings)
    app.state.outbox = Outbox(settings.outbox_db)
    app.state.runs = runs or PrefectRuns(settings.flow_name, settings.deployment)
    app.state.latest_run = LatestRunCache(app.state.runs, settings.status_cache_sec)

    token = settings.api_token.get_secret_value().encode() if settings.api_token else None

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
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
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Outermost: an oversized body is refused before anything reads it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    return app


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn api.main:app``: built on first use so importing api.main has no side effects.
    if name == "app":
        return create_app()
    raise AttributeError(name)
