"""/docs (Swagger UI) and /redoc (ReDoc) served whole by the server, so that they work offline.

FastAPI's own pages load their scripts, styles and favicon from CDNs, and are blank without the
internet. These are the same pages (FastAPI's `get_swagger_ui_html`, `get_redoc_html`, set up as
`FastAPI.setup` does) pointing at the copies that the fastapi-offline package ships: Swagger UI's
and ReDoc's dist files and FastAPI's favicon, served by StaticFiles under STATIC_URL. The app is
made with `docs_url=None, redoc_url=None`; none of these routes is in the OpenAPI document.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/static/docs"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
DOCS_URL, REDOC_URL = "/docs", "/redoc"
# The pages load nothing from elsewhere, not even what a bundle names itself: ReDoc's sidebar shows
# Redocly's logo from cdn.redoc.ly (and hides it when it does not load). The policy only keeps them
# to the server: inline scripts and styles, eval, data: and blob: URLs stay as the bundles use them.
CSP = "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"


def mount_docs(app: FastAPI) -> None:
    assets = StaticFiles(packages=[("fastapi_offline", "static")])  # raises here if the package is missing
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url  # "/docs/oauth2-redirect"

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return _self_contained(get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css", swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            oauth2_redirect_url=root + oauth2_redirect_url, init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters))

    async def swagger_ui_oauth2_redirect(request: Request) -> HTMLResponse:
        return _self_contained(get_swagger_ui_oauth2_redirect_html())

    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return _self_contained(get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js", redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False))

    async def asset(request: Request) -> Response:
        return await assets.get_response(request.path_params["name"], request.scope)

    # A route, not a mount: a route says its methods (the app's 405 handler lists them in Allow)
    app.add_route(f"{STATIC_URL}/{{name}}", asset, include_in_schema=False)
    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_route(oauth2_redirect_url, swagger_ui_oauth2_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)


def _root_path(request: Request) -> str:
    """The prefix a proxy serves the app under (uvicorn --root-path), "" when none."""
    return request.scope.get("root_path", "").rstrip("/")


def _self_contained(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page
