"""Walks EVERY route registered in the console app (every feature's routers, as they are merged)
as anonymous, as each role by session cookie and by API token, and checks the answer against the
role the route requires: a route without ``require(...)`` fails here unless it is public."""

from __future__ import annotations

import re

import pytest
from console_helpers import ROLES, ConsoleNode

from node.console.app import PUBLIC_PATHS, RouteInfo, walk_routes
from node.console.auth import Role

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
#: a path parameter value no real object has (no route acts on something real here)
MISSING_ID = "999999"


def _routes(node: ConsoleNode) -> list[RouteInfo]:
    routes = walk_routes(node.service.console.app)
    assert len(routes) >= 15, routes
    return routes


def _url(route: RouteInfo) -> str:
    return re.sub(r"\{[^}]+\}", MISSING_ID, route.path)


def _call(session, route: RouteInfo):
    kwargs: dict[str, object] = {"json": {}} if route.method in UNSAFE else {}
    return session.request(route.method, _url(route), **kwargs)


def test_every_route_requires_a_role_unless_public(console_node: ConsoleNode) -> None:
    unguarded = [f"{r.method} {r.path}" for r in _routes(console_node) if r.role is None and r.path not in PUBLIC_PATHS]
    assert not unguarded, f"routes without require(Role.X): {unguarded}"


def test_anonymous_is_refused_everywhere_but_public_paths(console_node: ConsoleNode) -> None:
    anon = console_node.anonymous()
    for route in _routes(console_node):
        r = _call(anon, route)
        where = f"{route.method} {route.path}: {r.status_code} {r.text[:200]}"
        if route.path in PUBLIC_PATHS:
            assert r.status_code not in (401, 500), where
        elif route.path.startswith("/api/") or route.path == "/metrics":
            assert r.status_code == 401, where
        else:
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), where


@pytest.mark.parametrize("role", ROLES)
def test_each_role_by_token(console_node: ConsoleNode, role: str) -> None:
    """Too low a role: 403; enough: anything but 401/403/500 (a missing object or body may give 404/422)."""
    client = console_node.token_client(role, name=f"walk-{role}")
    me = Role.parse(role)
    for route in _routes(console_node):
        if route.role is None:
            continue
        r = _call(client, route)
        where = f"{role} {route.method} {route.path}: {r.status_code} {r.text[:200]}"
        if me < route.role:
            assert r.status_code == 403, where
        else:
            assert r.status_code not in (401, 403) and r.status_code < 500, where


@pytest.mark.parametrize("role", ROLES)
def test_each_role_by_session(console_node: ConsoleNode, role: str) -> None:
    """Reads as with a token; every change without the session's CSRF token is refused (403)."""
    client = console_node.client(role)
    no_csrf = console_node.anonymous()
    no_csrf.cookies = client.cookies
    me = Role.parse(role)
    for route in _routes(console_node):
        if route.role is None:
            continue
        if route.method in UNSAFE:
            r = _call(no_csrf, route)
            assert r.status_code == 403 and "CSRF" in r.text, f"{role} {route.method} {route.path} without CSRF: {r.status_code}"
            continue
        r = _call(client, route)
        where = f"{role} {route.method} {route.path}: {r.status_code} {r.text[:200]}"
        if me < route.role:
            assert r.status_code == 403, where
        else:
            assert r.status_code not in (401, 403) and r.status_code < 500, where
