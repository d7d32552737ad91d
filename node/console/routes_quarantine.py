"""Quarantine: the instances the receiver refused, with the reason (``GET /api/v1/quarantine``, page
``/quarantine``); release one into the spool, checked again as if received now, or delete it
(``POST /api/v1/quarantine/{name}/release|delete``, operator and up, audited).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from node.console.auth import Principal, Role, client_address, require
from node.console.context import ConsoleContext, get_ctx
from node.console.web import redirect_with_message, render
from node.operations import Outcome, delete_quarantined, release
from node.spool import Spool

router = APIRouter()
_viewer = require(Role.VIEWER)
_operator = require(Role.OPERATOR)


def quarantine_list(ctx: ConsoleContext) -> list[dict[str, Any]]:
    return [{"name": e.path.name, "received_at": e.received_at, "reason": e.reason, "calling": e.calling,
             "called": e.called, "peer": e.peer, "sop": e.sop, "size": e.size}
            for e in reversed(Spool(ctx.config.spool_dir, ctx.config.quarantine_dir).quarantined())]


def _act(ctx: ConsoleContext, request: Request, p: Principal, name: str, what: str) -> Outcome:
    out = release(ctx.config, ctx.store, name) if what == "release" else delete_quarantined(ctx.config, name)
    if out.message.startswith("no quarantined file"):
        raise HTTPException(404, out.message)
    ctx.store.add_audit(f"quarantine.{what}", username=p.username, client=client_address(request),
                        target=f"quarantine {name}", detail={"ok": out.ok, "message": out.message, **out.detail})
    return out


@router.get("/api/v1/quarantine", tags=["quarantine"])
def api_quarantine(_p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """The refused instances, newest first: file name, when, reason, sender, SOP instance, size."""
    return {"items": quarantine_list(ctx)}


@router.post("/api/v1/quarantine/{name}/release", tags=["quarantine"])
def api_release(name: str, request: Request, p: Principal = Depends(_operator),
                ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Back into the spool when the receiver's checks pass now (409 with the reason otherwise)."""
    out = _act(ctx, request, p, name, "release")
    if not out.ok:
        raise HTTPException(409, out.message)
    return {"ok": True, "message": out.message, **out.detail}


@router.post("/api/v1/quarantine/{name}/delete", tags=["quarantine"])
def api_delete(name: str, request: Request, p: Principal = Depends(_operator),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """The file and its reason deleted."""
    out = _act(ctx, request, p, name, "delete")
    return {"ok": out.ok, "message": out.message}


@router.get("/quarantine")
def quarantine_page(request: Request, _p: Principal = Depends(_viewer),
                    ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return render(request, "quarantine.html", {"title": "Quarantine", "entries": quarantine_list(ctx)})


@router.post("/quarantine/{name}/release")
def release_form(name: str, request: Request, p: Principal = Depends(_operator),
                 ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    out = _act(ctx, request, p, name, "release")
    return redirect_with_message(request, "/quarantine", out.message, out.ok)


@router.post("/quarantine/{name}/delete")
def delete_form(name: str, request: Request, p: Principal = Depends(_operator),
                ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    out = _act(ctx, request, p, name, "delete")
    return redirect_with_message(request, "/quarantine", out.message, out.ok)
