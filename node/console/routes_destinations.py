"""Destinations and AEs: each destination's state (last success, last error, pending dispatches,
paused), a C-ECHO test, pause/resume of dispatch per destination (kept in the store, honoured by
``Store.claim_dispatch``), the calling AEs allowed to send and the known AEs (``origin``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import escape

from node.config import StowDestination
from node.console.auth import Principal, Role, client_address, require
from node.console.context import ConsoleContext, get_ctx
from node.console.web import redirect_with_message, render
from node.routing.rules import ORIGIN
from node.scp.sender import DestinationUnavailable, echo
from node.scp.tls import client_context

router = APIRouter()
_viewer = require(Role.VIEWER)
_operator = require(Role.OPERATOR)


def destinations_report(ctx: ConsoleContext) -> dict[str, Any]:
    """What ``GET /api/v1/destinations`` answers."""
    cfg = ctx.config
    stats = ctx.store.destination_stats()
    rows: list[dict[str, Any]] = []
    for name in sorted(set(cfg.destinations) | set(stats)):
        d = cfg.destinations.get(name)
        s = stats.get(name) or {"pending": 0, "failed": 0, "last_success": None, "last_error": None,
                                "last_error_at": None, "paused": False, "changed_at": None, "changed_by": None}
        address: dict[str, Any]
        if isinstance(d, StowDestination):
            address = {"kind": "stow", "url": d.stow}
        elif d is not None:
            address = {"kind": "dimse", "ae_title": d.ae_title, "host": d.host, "port": d.port, "tls": d.tls}
        elif name == ORIGIN:
            address = {"kind": "origin"}
        else:
            address = {"kind": "share" if name == "share" else "unknown"}
        rows.append({"name": name, "configured": d is not None, **address, **s})
    return {
        "destinations": rows,
        "allowed_calling_aes": [{"ae_title": a.ae_title, "host": a.host} for a in cfg.allowed_calling_aes],
        "allowed_calling_aes_open": not cfg.allowed_calling_aes,
        "known_aes": [{"calling_ae": k, "host": v.host, "port": v.port, "ae_title": v.ae_title or k}
                      for k, v in sorted(cfg.known_aes.items())],
        "our_ae_title": cfg.ae_title,
    }


def _known(ctx: ConsoleContext, name: str) -> None:
    if name not in ctx.config.destinations and name not in ctx.store.destination_stats():
        raise HTTPException(404, f"no destination {name!r}")


def _echo(ctx: ConsoleContext, p: Principal, client: str, name: str) -> dict[str, Any]:
    d = ctx.config.destinations.get(name)
    if d is None:
        raise HTTPException(404, f"no configured destination {name!r}")
    if isinstance(d, StowDestination):
        raise HTTPException(400, f"{name} is a DICOMweb (STOW-RS) destination: C-ECHO is for DIMSE peers")
    t0 = time.monotonic()
    try:
        tls = client_context(ctx.config.tls) if d.tls else None
        status = echo(d, calling_ae=ctx.config.ae_title, timeouts=ctx.config.timeouts, tls=tls)
        ok, detail = status == 0, f"status 0x{status:04X}"
    except (DestinationUnavailable, OSError, ValueError) as exc:
        ok, detail = False, str(exc)
    result = {"name": name, "ok": ok, "detail": detail, "seconds": round(time.monotonic() - t0, 3)}
    ctx.store.add_audit("destination.echo", username=p.username, client=client, target=f"destination {name}",
                        detail={"ok": ok, "detail": detail})
    return result


def _pause(ctx: ConsoleContext, p: Principal, client: str, name: str, paused: bool) -> dict[str, Any]:
    _known(ctx, name)
    ctx.store.set_destination_paused(name, paused, by=p.username)
    ctx.store.add_audit("destination.pause" if paused else "destination.resume", username=p.username, client=client,
                        target=f"destination {name}")
    if not paused and ctx.node is not None:
        ctx.node.dispatch_now()  # what waited is due: send it now rather than at the next tick
    return {"name": name, "paused": paused}


@router.get("/api/v1/destinations", tags=["destinations"])
def destinations_api(_p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Each destination's address and state; the allowed calling AEs and the known AEs."""
    return destinations_report(ctx)


@router.post("/api/v1/destinations/{name}/echo", tags=["destinations"])
def echo_api(name: str, request: Request, p: Principal = Depends(_operator),
             ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """C-ECHO the destination now (``ok``, the status or the error, the time it took)."""
    return _echo(ctx, p, client_address(request), name)


@router.post("/api/v1/destinations/{name}/pause", tags=["destinations"])
def pause_api(name: str, request: Request, p: Principal = Depends(_operator),
              ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Stop dispatching to the destination (its dispatches wait, pending, until resumed; kept across restarts)."""
    return _pause(ctx, p, client_address(request), name, True)


@router.post("/api/v1/destinations/{name}/resume", tags=["destinations"])
def resume_api(name: str, request: Request, p: Principal = Depends(_operator),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    return _pause(ctx, p, client_address(request), name, False)


@router.get("/destinations", include_in_schema=False)
def destinations_page(request: Request, _p: Principal = Depends(_viewer),
                      ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return render(request, "destinations.html", {"r": destinations_report(ctx), "title": "Destinations"})


def _back(request: Request, message: str, ok: bool = True) -> Response:
    return redirect_with_message(request, "/destinations", message, ok)


@router.post("/destinations/{name}/echo", include_in_schema=False)
def echo_page(name: str, request: Request, p: Principal = Depends(_operator),
              ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    r = _echo(ctx, p, client_address(request), name)
    message = f"C-ECHO {name}: {'OK' if r['ok'] else 'failed'} ({r['detail']}, {r['seconds']} s)"
    if request.headers.get("hx-request"):  # htmx: only the answer, put beside the button
        return HTMLResponse(f'<span class="{"ok" if r["ok"] else "err"}" role="status">{escape(message)}</span>')
    return _back(request, message, r["ok"])


@router.post("/destinations/{name}/pause", include_in_schema=False)
def pause_page(name: str, request: Request, p: Principal = Depends(_operator),
               ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    _pause(ctx, p, client_address(request), name, True)
    return _back(request, f"Dispatch to {name} paused.")


@router.post("/destinations/{name}/resume", include_in_schema=False)
def resume_page(name: str, request: Request, p: Principal = Depends(_operator),
                ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    _pause(ctx, p, client_address(request), name, False)
    return _back(request, f"Dispatch to {name} resumed.")
