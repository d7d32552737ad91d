"""Series: the list with filters and keyset pagination (``GET /api/v1/series``, page ``/series``),
one series with its jobs (``GET /api/v1/series/{uid}``, page ``/series/{uid}``), re-run it with
another rule or profile (``POST /api/v1/series/{uid}/rerun``) and route an unrouted one now with a
chosen rule (``POST /api/v1/series/{uid}/route``); operator and up, every change audited.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from node.console.auth import Principal, Role, client_address, require
from node.console.context import ConsoleContext, get_ctx
from node.console.routes_jobs import _epoch, _limit, _states, _wake, job_summary
from node.console.web import list_filters, redirect_with_message, render
from node.contracts import SeriesState
from node.operations import Outcome, current_rules, rerun, route_now
from node.profiles import list_profiles
from node.store import Series, SeriesQuery

router = APIRouter()
_viewer = require(Role.VIEWER)
_operator = require(Role.OPERATOR)


def series_summary(s: Series) -> dict[str, Any]:
    t = s.tags
    return {
        "series_uid": s.series_uid, "study_uid": s.study_uid, "state": str(s.state), "generation": s.generation,
        "instances": s.instance_count, "calling_ae": s.calling_ae, "first_received_at": s.first_received_at,
        "last_received_at": s.last_received_at, "error": s.error, "incomplete": s.incomplete,
        "conflicts": s.conflicts, "patient_name": t.get("PatientName"), "patient_id": t.get("PatientID"),
        "accession": t.get("AccessionNumber"), "modality": t.get("Modality"),
        "series_description": t.get("SeriesDescription"), "study_date": t.get("StudyDate"),
    }


def series_list(ctx: ConsoleContext, request: Request) -> dict[str, Any]:
    q = request.query_params
    query = SeriesQuery(state=_states(q.get("state"), SeriesState), calling_ae=q.get("calling_ae") or None,
                        since=_epoch(q.get("since")), until=_epoch(q.get("until"), end=True), search=q.get("q") or None)
    page = ctx.store.series_page(query, limit=_limit(request), after=q.get("after"))
    jobs = ctx.store.jobs_of_series([s.series_uid for s in page.items])
    items = []
    for s in page.items:
        row = series_summary(s)
        row["jobs"] = [{"id": j.id, "state": str(j.state), "rule": j.rule, "profile": j.profile}
                       for j in jobs.get(s.series_uid, [])]
        items.append(row)
    return {"items": items, "next": page.next}


def _rule_names(ctx: ConsoleContext) -> list[str]:
    try:
        return [r.name for r in current_rules(ctx.config, ctx.node.rules_in_force() if ctx.node is not None else None).rules]
    except Exception:  # noqa: BLE001 - a broken rule file: no rule to choose (the rules page says why)
        return []


def series_detail(ctx: ConsoleContext, uid: str) -> dict[str, Any]:
    s = ctx.store.get_series(uid)
    if s is None:
        raise HTTPException(404, f"no series {uid}")
    return {**series_summary(s), "tags": s.tags,
            "jobs": [job_summary(j, s.tags) for j in ctx.store.list_jobs(series_uid=uid)],
            "rules": _rule_names(ctx), "profiles": list_profiles(ctx.config.profiles)}


async def _body(request: Request) -> dict[str, Any]:
    """A JSON object or a form, whichever the caller sent (API clients and the page's forms)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            raise HTTPException(422, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "expected a JSON object")
        return data
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _act(ctx: ConsoleContext, request: Request, p: Principal, uid: str, what: str, body: dict[str, Any]) -> Outcome:
    if ctx.store.get_series(uid) is None:
        raise HTTPException(404, f"no series {uid}")
    rules = current_rules(ctx.config, ctx.node.rules_in_force() if ctx.node is not None else None)
    rule = str(body.get("rule") or "").strip() or None
    profile = str(body.get("profile") or "").strip() or None
    if what == "rerun":
        out = rerun(ctx.config, ctx.store, uid, rule=rule, profile=profile, rules=rules, by=p.username)
    elif rule is None:
        out = Outcome(False, "choose a rule")
    else:
        out = route_now(ctx.config, ctx.store, uid, rule, rules=rules, by=p.username)
    ctx.store.add_audit(f"series.{what}", username=p.username, client=client_address(request), target=f"series {uid}",
                        detail={"ok": out.ok, "message": out.message, "job_id": out.job_id, **out.detail})
    if out.ok:
        _wake(ctx)
    return out


# ---------------------------------------------------------------------------- API


@router.get("/api/v1/series", tags=["series"])
def api_series(request: Request, _p: Principal = Depends(_viewer),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Series, most recently received first, with their jobs: filters ``state`` (comma-separated),
    ``calling_ae``, ``since``/``until`` (YYYY-MM-DD or epoch s), ``q`` (patient name, ID or accession);
    ``limit`` (default 50) and ``after`` (the previous page's ``next``)."""
    return series_list(ctx, request)


@router.get("/api/v1/series/{uid}", tags=["series"])
def api_series_one(uid: str, _p: Principal = Depends(_viewer),
                   ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """One series: its state, tags, jobs, and the rules and profiles it can be re-run with."""
    return series_detail(ctx, uid)


@router.post("/api/v1/series/{uid}/rerun", tags=["series"])
async def api_rerun(uid: str, request: Request, p: Principal = Depends(_operator),
                    ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """A new job for the series with ``{"rule": name}`` and/or ``{"profile": name}``."""
    out = _act(ctx, request, p, uid, "rerun", await _body(request))
    if not out.ok:
        raise HTTPException(409, out.message)
    return {"ok": True, "message": out.message, "job_id": out.job_id}


@router.post("/api/v1/series/{uid}/route", tags=["series"])
async def api_route(uid: str, request: Request, p: Principal = Depends(_operator),
                    ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """An unrouted series routed now with ``{"rule": name}``."""
    out = _act(ctx, request, p, uid, "route", await _body(request))
    if not out.ok:
        raise HTTPException(409, out.message)
    return {"ok": True, "message": out.message, "job_id": out.job_id}


# ---------------------------------------------------------------------------- pages


@router.get("/series")
def series_page(request: Request, _p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    data = series_list(ctx, request)
    args, nxt = list_filters(request, "/series", data["next"])
    return render(request, "series.html", {"title": "Series", "series": data["items"], "next_url": nxt, "f": args,
                                           "states": [s.value for s in SeriesState]})


@router.get("/series/{uid}")
def series_one_page(uid: str, request: Request, _p: Principal = Depends(_viewer),
                    ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return render(request, "series_one.html", {"title": "Series", "s": series_detail(ctx, uid)})


async def _form_action(uid: str, request: Request, p: Principal, ctx: ConsoleContext, what: str) -> Response:
    out = _act(ctx, request, p, uid, what, await _body(request))
    if out.ok and out.job_id is not None:
        return redirect_with_message(request, f"/jobs/{out.job_id}", out.message, True)
    return redirect_with_message(request, f"/series/{quote(uid)}", out.message, out.ok)


@router.post("/series/{uid}/rerun")
async def series_rerun_form(uid: str, request: Request, p: Principal = Depends(_operator),
                            ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return await _form_action(uid, request, p, ctx, "rerun")


@router.post("/series/{uid}/route")
async def series_route_form(uid: str, request: Request, p: Principal = Depends(_operator),
                            ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return await _form_action(uid, request, p, ctx, "route")
