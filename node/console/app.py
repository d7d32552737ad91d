"""``create_app(ctx)``: the console's FastAPI app, built from the feature routers listed in
``ROUTER_MODULES`` (each ``node/console/routes_<area>.py`` exports ``router = APIRouter()``).

JSON API under ``/api/v1/...``, pages at plain paths.  Every route takes ``require(Role.X)``
(node/console/auth.py) except the few in ``PUBLIC_PATHS``; tests/test_console_routes.py walks
every registered route as each role and anonymous.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node import __version__
from node.console.auth import LoginRequired, PasswordChangeRequired, Role, is_api_path
from node.console.context import ConsoleContext
from node.console.web import STATIC_DIR, render

__all__ = ["create_app", "walk_routes", "RouteInfo", "ROUTER_MODULES", "PUBLIC_PATHS", "SECURITY_HEADERS",
           "MAX_BODY_BYTES", "MAX_UPLOAD_BYTES", "UPLOAD_PATHS"]

# ---- feature routers: ONE LINE EACH, in nav order (other features append their module here) ----
ROUTER_MODULES: list[str] = [
    "node.console.routes_auth",
    "node.console.routes_health",
    "node.console.routes_rules",
    "node.console.routes_series",
    "node.console.routes_jobs",
    "node.console.routes_quarantine",
    "node.console.routes_metrics",
    "node.console.routes_destinations",
    "node.console.routes_audit",
    "node.console.routes_users",
    "node.console.routes_meta",
]
# ---- end of feature routers ----

#: on every answer: the browser loads scripts, styles, images and frames from the console only
#: (no inline scripts, no ``style=`` attributes: put them in static/console.js and console.css; an
#: injected ``<script>`` or ``onerror=`` does not run even where escaping is missed), never frames it,
#: never sniffs types
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
#: the largest request body (a rule file, a form, JSON); larger: 413, before it is read
MAX_BODY_BYTES = 4 << 20
#: the largest body of a dry-run upload (a folder of DICOM files; only their headers are kept)
MAX_UPLOAD_BYTES = 1 << 30
UPLOAD_PATHS = frozenset({"/api/v1/rules/dry-run/upload", "/rules/dry-run"})


class _SecurityLayer:
    """ASGI layer around the whole app: adds :data:`SECURITY_HEADERS` (and HSTS under TLS) to every
    answer, ``Cache-Control: no-store`` to all but /static (pages and answers hold patient data), and
    caps request bodies: by ``Content-Length``, or counted as they arrive (a chunked body cannot get
    round it; without a cap Starlette spools any upload to disk, a viewer could fill it)."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = MAX_UPLOAD_BYTES if path in UPLOAD_PATHS else MAX_BODY_BYTES
        started = False

        async def send_secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if self.https:
                    headers.setdefault("Strict-Transport-Security", "max-age=31536000")
                if not path.startswith("/static/"):
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        async def too_large() -> None:
            answer = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
            await answer(scope, receive, send_secured)

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await too_large()
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI and the routes pass an HTTPException on: answered as 413
                    raise StarletteHTTPException(413, f"request body over {limit} bytes")
            return message

        try:
            await self.app(scope, counted, send_secured)
        except StarletteHTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await too_large()


#: routes anyone may call without logging in (liveness probes, the login page, static files)
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/readyz"})


def _wants_json(request: Request) -> bool:
    return is_api_path(request.url.path)


def create_app(ctx: ConsoleContext) -> FastAPI:
    """The console app for ``ctx`` (``app.state.ctx``; routes reach it through ``get_ctx``)."""
    app = FastAPI(
        title="dicom-node console API",
        version=__version__,
        description="Operations console of the DICOM segmentation node. Authenticate with "
                    "`Authorization: Bearer <token>` (tokens: /account/tokens).",
        docs_url=None,  # FastAPI's docs pages load scripts from a CDN: the description is served as JSON
        redoc_url=None,
        openapi_url=None,  # served by routes_meta.py, behind login
    )
    app.state.ctx = ctx
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    app.add_middleware(_SecurityLayer, https=ctx.https)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, _exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(PasswordChangeRequired)
    async def _password(_request: Request, _exc: PasswordChangeRequired) -> Response:
        return RedirectResponse("/account/password", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if _wants_json(request) or request.headers.get("hx-request"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        return render(request, "error.html", {"status": exc.status_code, "message": exc.detail, "title": "Error"},
                      status_code=exc.status_code)

    for name in ROUTER_MODULES:
        app.include_router(importlib.import_module(name).router)

    return app


@dataclass(frozen=True)
class RouteInfo:
    method: str
    path: str
    #: the lowest role allowed (the ``require(...)`` among its dependencies); None: no login needed
    role: Role | None


def _route_role(route: Any) -> Role | None:
    found: list[Role] = []

    def visit(dependant: Any) -> None:
        if dependant is None:
            return
        role = getattr(dependant.call, "_console_role", None)
        if role is not None:
            found.append(role)
        for sub in dependant.dependencies:
            visit(sub)

    visit(getattr(route, "dependant", None))
    return max(found) if found else None


def walk_routes(app: FastAPI) -> list[RouteInfo]:
    """Every route the app serves through its routers (static files excepted), with the role it
    requires.  FastAPI from 0.16x keeps included routers as branches: followed here, with their
    prefixes."""
    found: list[RouteInfo] = []

    def visit(routes: list[Any], prefix: str) -> None:
        for route in routes:
            original = getattr(route, "original_router", None)
            if original is not None:
                visit(list(original.routes), prefix + getattr(route.include_context, "prefix", ""))
                continue
            methods = getattr(route, "methods", None)
            if not methods:
                continue  # mounts (static files)
            role = _route_role(route)
            for m in sorted(methods - {"HEAD"}):
                found.append(RouteInfo(m, prefix + route.path, role))

    visit(list(app.router.routes), "")
    return found
