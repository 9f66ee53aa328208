"""The API's own docs, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, served with
every asset they load from this app, so they work on a machine without internet access.

FastAPI's default pages load their JavaScript and CSS from a public CDN: offline (as
forensic networks often are) they render as a blank page. The assets come from the pip
package ``fastapi-offline``, which ships the Swagger UI and ReDoc bundles FastAPI's
defaults point at (installed with the other Python dependencies, pinned in
pyproject.toml; see README "REST API"). Only its static files are used: the pages are
built here, on FastAPI's own HTML helpers, with local URLs.

The pages and the assets pass through the app's middleware like any route: with
MEMDUMP_API__TOKEN set they need the bearer token, as the docs always did.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
# What the pages load, by name: nothing else under ASSETS_URL is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# Swagger UI would send the document to an online validator (validator.swagger.io) and
# show its badge: never from here.
SWAGGER_PARAMETERS = {"validatorUrl": None}


def assets_dir() -> Path:
    """Where the installed package keeps the bundles."""
    return Path(str(files("fastapi_offline") / "static"))


def add_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc on ``app`` (created with ``docs_url=None, redoc_url=None``),
    all assets local. A missing asset is an error at start, not a blank page later."""
    root = assets_dir()
    missing = [name for name in ASSETS if not (root / name).is_file()]
    if missing:
        raise RuntimeError(f"API docs assets missing from {root}: {', '.join(missing)}")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or f"{DOCS_URL}/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=base + oauth2_redirect,
            swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,  # fonts from Google: not offline
        )

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:  # a fixed set: no path from the request reaches the disk
            raise HTTPException(404, "Not Found")
        return FileResponse(root / name, media_type=media_type)
