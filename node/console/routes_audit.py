"""The audit log (admin only): ``/audit`` (filter by action and user, newest first, paged),
``GET /api/v1/audit`` and ``GET /api/v1/audit/export`` (JSON lines, oldest first)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from node.console.auth import Principal, Role, require
from node.console.context import ConsoleContext, get_ctx
from node.console.web import render

router = APIRouter()
_admin = require(Role.ADMIN)
PAGE = 100


def _entries(ctx: ConsoleContext, action: str | None, user: str | None, before: int | None,
             limit: int) -> list[dict[str, Any]]:
    return ctx.store.list_audit(limit=max(1, min(limit, 1000)), before_id=before, action=action or None,
                                username=user or None)


@router.get("/api/v1/audit", tags=["audit"])
def audit_api(action: str | None = None, user: str | None = None, before: int | None = None, limit: int = PAGE,
              _p: Principal = Depends(_admin), ctx: ConsoleContext = Depends(get_ctx)) -> list[dict[str, Any]]:
    """Audit entries newest first (``before``: an entry id, for the next page)."""
    return _entries(ctx, action, user, before, limit)


@router.get("/api/v1/audit/export", tags=["audit"], response_class=StreamingResponse)
def audit_export(since: float | None = None, _p: Principal = Depends(_admin),
                 ctx: ConsoleContext = Depends(get_ctx)) -> StreamingResponse:
    """The whole audit log (or from ``since``, a Unix time) as JSON lines, oldest first, with ISO times."""
    store = ctx.store

    def lines() -> Iterator[bytes]:
        after = 0
        while True:  # oldest first, a page of 1000 at a time: never the whole log in memory
            page = store.list_audit(limit=1000, after_id=after, since=since)
            if not page:
                break
            for e in page:
                e["time"] = dt.datetime.fromtimestamp(e["at"], dt.timezone.utc).isoformat()
                yield (json.dumps(e, sort_keys=True, default=str) + "\n").encode()
            after = page[-1]["id"]

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.jsonl"'})


@router.get("/audit", include_in_schema=False)
def audit_page(request: Request, action: str | None = None, user: str | None = None, before: int | None = None,
               _p: Principal = Depends(_admin), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    entries = _entries(ctx, action, user, before, PAGE)
    return render(request, "audit.html", {"entries": entries, "action": action or "", "user": user or "",
                                          "next_before": entries[-1]["id"] if len(entries) == PAGE else None,
                                          "title": "Audit log"})
