"""Page rendering: the Jinja2 templates, the navigation and ``render(request, template, context)``,
which hands every template the caller, the CSRF token (``csrf_token``, ``csrf_input``) and the nav,
and ``redirect_with_message``: the one way a form action tells the next page what happened (a
short-lived signed cookie bound to the session, never the URL, so a link cannot put words on a page).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from markupsafe import Markup, escape

from node.console.auth import CSRF_FIELD, Principal, Role

__all__ = ["NavItem", "NAV", "TEMPLATES", "STATIC_DIR", "HTMX", "FLASH_COOKIE", "render", "redirect_with_message",
           "list_filters"]

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
#: the vendored htmx (pinned; node/console/static/README.md says where it came from)
HTMX = "htmx-2.0.4.min.js"


@dataclass(frozen=True)
class NavItem:
    label: str
    path: str
    role: Role = Role.VIEWER  #: shown to this role and above


#: the navigation bar, in order (feature helpers: one line each)
NAV: list[NavItem] = [
    NavItem("Health", "/"),
    NavItem("Rules", "/rules"),
    NavItem("Series", "/series"),
    NavItem("Jobs", "/jobs"),
    NavItem("Quarantine", "/quarantine"),
    NavItem("Destinations", "/destinations"),
    NavItem("Audit", "/audit", Role.ADMIN),
    NavItem("Users", "/users", Role.ADMIN),
    NavItem("API", "/api"),
]


def _when(ts: float | None) -> str:
    if not ts:
        return "—"
    return _dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


TEMPLATES = Jinja2Templates(directory=str(TEMPLATES_DIR))
TEMPLATES.env.filters["when"] = _when
TEMPLATES.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)


FLASH_COOKIE = "dn_flash"
#: long enough for the browser to follow the redirect; a message never outlives this
FLASH_MAX_AGE_S = 60


def list_filters(request: Request, path: str, after: Any) -> tuple[dict[str, str], str | None]:
    """A list page's filters (its non-empty query arguments but the page key) and the URL of its
    next page (``after``: the keyset the list query returned; none: no next page)."""
    args = {k: v for k, v in request.query_params.items() if k != "after" and v}
    return args, (f"{path}?{urlencode({**args, 'after': after})}" if after else None)


def _flash_serializer(request: Request) -> URLSafeTimedSerializer:
    # the console's signing key (the one session cookies use), with a salt of its own: a session
    # cookie is no valid message, and a message no valid session
    return URLSafeTimedSerializer(request.app.state.ctx.secret, salt="dicom-node-flash")


def _flash_owner(principal: Principal | None) -> str:
    """Whose message it is: the session (or API token) that did the action."""
    if principal is None:
        return ""
    return f"s:{principal.session_id}" if principal.session_id else f"t:{principal.token_id}"


def redirect_with_message(request: Request, url: str, message: str, ok: bool = True) -> RedirectResponse:
    """A 303 to ``url`` whose page shows ``message`` (green when ``ok``, else red) once.

    The message travels in a signed, HttpOnly, SameSite=Strict cookie bound to the caller's session
    and valid for ``FLASH_MAX_AGE_S``; ``render`` shows it and clears it.  Pages never read messages
    from the query string, so nobody can send an operator a link that shows "Job retried".
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    value = _flash_serializer(request).dumps({"m": message, "ok": bool(ok), "o": _flash_owner(principal)})
    resp = RedirectResponse(url, status_code=303)
    resp.set_cookie(FLASH_COOKIE, value, max_age=FLASH_MAX_AGE_S, path="/", httponly=True, samesite="strict",
                    secure=bool(request.app.state.ctx.https))
    return resp


def _pending_flash(request: Request) -> tuple[str, bool] | None:
    """The message ``redirect_with_message`` left for this session, or None (absent, forged, expired, another's)."""
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        data = _flash_serializer(request).loads(raw, max_age=FLASH_MAX_AGE_S)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("m"), str):
        return None
    if data.get("o") != _flash_owner(getattr(request.state, "principal", None)):
        return None
    return data["m"], bool(data.get("ok"))


def render(request: Request, template: str, context: Mapping[str, Any] | None = None, *,
           status_code: int = 200) -> HTMLResponse:
    """Render ``template`` with ``context`` plus ``principal``, ``csrf_token``, ``csrf_input`` (a hidden
    form field), ``nav`` (the entries the caller's role may see) and ``htmx``; a message that
    ``redirect_with_message`` left is shown as ``flash``/``flash_kind`` (unless the context has its
    own ``flash``) and cleared."""
    principal: Principal | None = getattr(request.state, "principal", None)
    csrf = (principal.csrf if principal else None) or getattr(request.state, "login_csrf", "") or ""
    nav = [n for n in NAV if principal is not None and principal.role >= n.role]
    full: dict[str, Any] = {
        "principal": principal,
        "csrf_token": csrf,
        "csrf_input": Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(csrf)}">'),
        "nav": nav,
        "htmx": HTMX,
        "path": request.url.path,
        "node_ae": request.app.state.ctx.config.ae_title,
    }
    full.update(context or {})
    # htmx fragments (the health refresh) leave the message to the page the redirect leads to
    consume = FLASH_COOKIE in request.cookies and not request.headers.get("hx-request")
    pending = _pending_flash(request) if consume else None
    if pending is not None and not full.get("flash"):
        full["flash"], full["flash_kind"] = pending[0], "ok" if pending[1] else "error"
    resp = TEMPLATES.TemplateResponse(request, template, full, status_code=status_code)
    if consume:
        resp.delete_cookie(FLASH_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=bool(request.app.state.ctx.https))
    return resp
