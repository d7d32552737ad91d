"""Page rendering: the Jinja2 templates, the navigation and ``render(request, template, context)``,
which hands every template the caller, the CSRF token (``csrf_token``, ``csrf_input``) and the nav.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from node.console.auth import CSRF_FIELD, Principal, Role

__all__ = ["NavItem", "NAV", "TEMPLATES", "STATIC_DIR", "HTMX", "render"]

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


def render(request: Request, template: str, context: Mapping[str, Any] | None = None, *,
           status_code: int = 200) -> HTMLResponse:
    """Render ``template`` with ``context`` plus ``principal``, ``csrf_token``, ``csrf_input`` (a hidden
    form field), ``nav`` (the entries the caller's role may see) and ``htmx``."""
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
    return TEMPLATES.TemplateResponse(request, template, full, status_code=status_code)
