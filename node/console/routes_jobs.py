"""Jobs: the list with filters and keyset pagination (``GET /api/v1/jobs``, page ``/jobs``), a job
with its stages, timings, attempts, dispatches, errors, ``report.json`` figures and QC pictures
(``GET /api/v1/jobs/{id}``, page ``/jobs/{id}``, pictures ``/api/v1/jobs/{id}/qc/{name}``), and the
operator's retry and cancel (``POST /api/v1/jobs/{id}/retry|cancel``, forms on the page).  Every
change goes to the audit log.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response

from node.console.auth import Principal, Role, client_address, require
from node.console.context import ConsoleContext, get_ctx
from node.console.web import list_filters, redirect_with_message, render
from node.contracts import JobState
from node.operations import Outcome, cancel, retry
from node.store import Job, JobQuery

router = APIRouter()
_viewer = require(Role.VIEWER)
_operator = require(Role.OPERATOR)
PAGE_SIZE = 50


def _epoch(value: str | None, *, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (local time; ``end``: the day after, so the day is included) or epoch seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        day = _dt.datetime.strptime(value.strip(), "%Y-%m-%d")
    except ValueError:
        raise HTTPException(422, f"date {value!r}: expected YYYY-MM-DD or epoch seconds") from None
    return (day + _dt.timedelta(days=1 if end else 0)).timestamp()


def _states(value: str | None, enum: Any) -> list[Any] | None:
    if not value:
        return None
    try:
        return [enum(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise HTTPException(422, f"state must be among {', '.join(enum)} (got {value!r})") from None


def job_query(request: Request) -> JobQuery:
    q = request.query_params
    return JobQuery(state=_states(q.get("state"), JobState), rule=q.get("rule") or None,
                    profile=q.get("profile") or None, calling_ae=q.get("calling_ae") or None,
                    since=_epoch(q.get("since")), until=_epoch(q.get("until"), end=True), search=q.get("q") or None,
                    series_uid=q.get("series") or None)


def _limit(request: Request) -> int:
    try:
        return max(1, min(500, int(request.query_params.get("limit") or PAGE_SIZE)))
    except ValueError:
        raise HTTPException(422, "limit must be a number") from None


def job_summary(job: Job, series_tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the job list."""
    tags = series_tags or {}
    return {
        "id": job.id, "state": str(job.state), "provisional": job.provisional, "series_uid": job.series_uid,
        "rule": job.rule, "profile": job.profile, "backend": job.backend, "generation": job.generation,
        "attempts": job.attempts, "max_attempts": job.max_attempts, "error": job.error,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "calling_ae": job.calling_ae or job.params.calling_ae,
        "patient_name": tags.get("PatientName"), "patient_id": tags.get("PatientID"),
        "accession": tags.get("AccessionNumber"), "series_description": tags.get("SeriesDescription"),
    }


def _tags_of(ctx: ConsoleContext, uids: list[str]) -> dict[str, dict[str, Any]]:
    if not uids:
        return {}
    rows = ctx.store.conn.execute(f"SELECT series_uid, tags FROM series WHERE series_uid IN ({','.join('?' * len(uids))})",
                                  uids).fetchall()
    return {r[0]: json.loads(r[1] or "{}") for r in rows}


def jobs_list(ctx: ConsoleContext, request: Request) -> dict[str, Any]:
    page = ctx.store.jobs_page(job_query(request), limit=_limit(request), after=request.query_params.get("after"))
    tags = _tags_of(ctx, sorted({j.series_uid for j in page.items}))
    return {"items": [job_summary(j, tags.get(j.series_uid)) for j in page.items], "next": page.next}


def _report(job: Job) -> dict[str, Any]:
    path = job.result.report or (job.result.output_dir / "report.json" if job.result.output_dir else None)
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def job_detail(ctx: ConsoleContext, job_id: int) -> dict[str, Any]:
    job = ctx.store.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    series = ctx.store.get_series(job.series_uid)
    report = _report(job)
    qc = [p for p in (report.get("qc") or {}).get("pictures") or [] if isinstance(p, dict)]
    attempts = ctx.store.dispatch_attempts(job_id=job_id)
    return {
        **job_summary(job, series.tags if series else None),
        "rules_version": job.rules_version, "worker": job.worker, "seg_series_uid": job.seg_series_uid,
        "params": job.params.to_json(), "result": job.result.to_json(),
        "series_state": str(series.state) if series else None,
        "dispatches": [{"id": d.id, "destination": d.destination, "kind": str(d.kind), "state": str(d.state),
                        "attempts": d.attempts, "last_error": d.last_error, "created_at": d.created_at,
                        "sent_at": d.sent_at} for d in ctx.store.list_dispatches(job_id=job_id)],
        "dispatch_attempts": attempts,
        "report": {
            "timings_s": report.get("timings_s") or dict(job.result.timings_s),
            "peak_rss_mb": report.get("peak_rss_mb"),
            "tissues": report.get("tissues") or {},
            "quality": report.get("quality"),
            "input": {k: v for k, v in (report.get("input") or {}).items() if k != "warnings"},
            "warnings": list(job.result.warnings) + list((report.get("input") or {}).get("warnings") or []),
            "qc_error": (report.get("qc") or {}).get("error"),
        },
        "qc": [{"name": Path(str(p.get("file"))).name, "kind": p.get("kind"), "tissue": p.get("tissue"),
                "plane": p.get("plane"), "width": p.get("width"), "height": p.get("height"),
                "url": f"/api/v1/jobs/{job_id}/qc/{Path(str(p.get('file'))).name}"} for p in qc],
        "can_retry": job.state in (JobState.FAILED, JobState.DONE),
        "can_cancel": job.state in (JobState.QUEUED, JobState.RUNNING),
    }


def _audit(ctx: ConsoleContext, request: Request, p: Principal, action: str, out: Outcome, target: str) -> None:
    ctx.store.add_audit(action, username=p.username, client=client_address(request), target=target,
                        detail={"ok": out.ok, "message": out.message, **out.detail})


def _wake(ctx: ConsoleContext) -> None:
    """Let the running node's pool look at the queue now."""
    if ctx.node is not None:
        ctx.node.wake_pool()


def _act(ctx: ConsoleContext, request: Request, p: Principal, job_id: int, what: str) -> Outcome:
    if ctx.store.get_job(job_id) is None:
        raise HTTPException(404, f"no job {job_id}")
    out = retry(ctx.store, job_id) if what == "retry" else cancel(ctx.store, job_id, by=p.username)
    _audit(ctx, request, p, f"job.{what}", out, f"job {job_id}")
    if out.ok:
        _wake(ctx)
        if what == "retry" and ctx.node is not None:
            ctx.node.dispatch_now()  # a done job's failed dispatches
    return out


# ---------------------------------------------------------------------------- API


@router.get("/api/v1/jobs", tags=["jobs"])
def api_jobs(request: Request, _p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Jobs, newest first: filters ``state`` (comma-separated), ``rule``, ``profile``, ``calling_ae``,
    ``since``/``until`` (YYYY-MM-DD or epoch s), ``q`` (patient name, ID or accession), ``series``;
    ``limit`` (default 50) and ``after`` (the previous page's ``next``)."""
    return jobs_list(ctx, request)


@router.get("/api/v1/jobs/{job_id}", tags=["jobs"])
def api_job(job_id: int, _p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """One job: stages and timings, attempts, dispatches and their attempts, errors, report figures, QC pictures."""
    return job_detail(ctx, job_id)


@router.get("/api/v1/jobs/{job_id}/qc/{name}", tags=["jobs"])
def api_job_qc(job_id: int, name: str, _p: Principal = Depends(_viewer),
               ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    """A QC picture of the job (PNG), by the name its report lists."""
    detail = job_detail(ctx, job_id)
    if name not in {q["name"] for q in detail["qc"]}:
        raise HTTPException(404, f"job {job_id} has no QC picture {name!r}")
    folder = Path(detail["result"].get("output_dir") or "")
    path = folder / "qc" / name
    if not path.is_file():
        raise HTTPException(404, f"QC picture {name} of job {job_id} is missing on disk")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.post("/api/v1/jobs/{job_id}/retry", tags=["jobs"])
def api_retry(job_id: int, request: Request, p: Principal = Depends(_operator),
              ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """A failed job queued again with fresh attempts; a done job's failed dispatches sent again."""
    out = _act(ctx, request, p, job_id, "retry")
    if not out.ok:
        raise HTTPException(409, out.message)
    return {"ok": True, "message": out.message}


@router.post("/api/v1/jobs/{job_id}/cancel", tags=["jobs"])
def api_cancel(job_id: int, request: Request, p: Principal = Depends(_operator),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """A queued or running job failed as "cancelled by <user>" (a running job's process is killed)."""
    out = _act(ctx, request, p, job_id, "cancel")
    if not out.ok:
        raise HTTPException(409, out.message)
    return {"ok": True, "message": out.message}


# ---------------------------------------------------------------------------- pages


@router.get("/jobs")
def jobs_page(request: Request, _p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    data = jobs_list(ctx, request)
    args, nxt = list_filters(request, "/jobs", data["next"])
    return render(request, "jobs.html", {"title": "Jobs", "jobs": data["items"], "next_url": nxt, "f": args,
                                         "states": [s.value for s in JobState]})


@router.get("/jobs/{job_id}")
def job_page(job_id: int, request: Request, _p: Principal = Depends(_viewer),
             ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return render(request, "job.html", {"title": f"Job {job_id}", "job": job_detail(ctx, job_id)})


@router.post("/jobs/{job_id}/retry")
def job_retry_form(job_id: int, request: Request, p: Principal = Depends(_operator),
                   ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    out = _act(ctx, request, p, job_id, "retry")
    return redirect_with_message(request, f"/jobs/{job_id}", out.message, out.ok)


@router.post("/jobs/{job_id}/cancel")
def job_cancel_form(job_id: int, request: Request, p: Principal = Depends(_operator),
                    ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    out = _act(ctx, request, p, job_id, "cancel")
    return redirect_with_message(request, f"/jobs/{job_id}", out.message, out.ok)
