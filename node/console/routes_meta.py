"""The API's description, served locally: ``GET /api/v1/openapi.json`` and the page ``/api`` listing
every endpoint with its summary (FastAPI's own docs pages load scripts from a CDN: not used)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from node.console.auth import Principal, Role, require
from node.console.web import render

router = APIRouter()
_viewer = require(Role.VIEWER)


@router.get("/api/v1/openapi.json", tags=["meta"], include_in_schema=False)
def openapi(request: Request, _p: Principal = Depends(_viewer)) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/api", include_in_schema=False)
def api_page(request: Request, _p: Principal = Depends(_viewer)) -> Response:
    from node.console.app import walk_routes  # app imports this module

    schema = request.app.openapi()
    roles = {(r.method, r.path): r.role.label if r.role is not None else "none" for r in walk_routes(request.app)}
    endpoints = []
    for path, ops in sorted(schema.get("paths", {}).items()):
        for method, op in ops.items():
            endpoints.append({"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                              "description": (op.get("description") or "").strip().replace("``", ""),
                              "tags": op.get("tags", []), "role": roles.get((method.upper(), path), "?")})
    return render(request, "api.html", {"endpoints": endpoints, "title": "API", "version": schema["info"]["version"]})
