"""Node health: ``GET /healthz`` (liveness), ``GET /readyz`` (store and spool usable), the health
page ``/`` and ``GET /api/v1/health``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from node.logsafe import RECENT_ERRORS_KEPT
from node.console.auth import Principal, Role, require
from node.console.context import ConsoleContext, NodeUnreachable, get_ctx
from node.console.web import render
from node.contracts import JobState, NodeStatus

router = APIRouter()
_viewer = require(Role.VIEWER)


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """Liveness: the console answers (no login: for probes)."""
    return {"status": "ok"}


def _node_status(ctx: ConsoleContext) -> NodeStatus | str | None:
    """The node's status; the reason as text when it does not answer; None without a node."""
    if ctx.node is None:
        return None
    try:
        return ctx.node.status()
    except NodeUnreachable as exc:
        return str(exc) or "the node does not answer"


def _ready_checks(ctx: ConsoleContext, status: NodeStatus | str | None) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        ctx.store.schema_version()
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the reason is shown
        checks["store"] = f"{type(exc).__name__}: {exc}"
    spool = ctx.config.spool_dir
    try:
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".readyz-"):
            pass
        checks["spool"] = "ok"
    except OSError as exc:
        checks["spool"] = f"not writable: {exc.strerror or exc}"
    if isinstance(status, str):
        checks["node"] = status
    elif status is not None:
        checks["receiver"] = "ok" if status.receiver_up else "down"
    return checks


@router.get("/readyz", tags=["health"])
def readyz(ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    """Readiness: the store answers and the spool is writable (and the receiver listens, inside the node).
    503 with the failing checks otherwise (no login: for probes; says nothing about patients)."""
    checks = _ready_checks(ctx, _node_status(ctx))
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


def health_report(ctx: ConsoleContext) -> dict[str, Any]:
    """What the health page shows (see ``GET /api/v1/health``)."""
    cfg = ctx.config
    got = _node_status(ctx)
    st = got if isinstance(got, NodeStatus) else None
    disk: dict[str, int | None]
    try:
        usage = shutil.disk_usage(cfg.storage)
        disk = {"free_bytes": usage.free, "total_bytes": usage.total}
    except OSError:
        disk = {"free_bytes": None, "total_bytes": None}
    gauges = ctx.store.gauges()
    by_state = {s.value: 0 for s in JobState}
    for state, _backend, n in gauges["jobs"]:
        by_state[state] = by_state.get(state, 0) + n
    slots = list(st.slots) if st is not None else []
    queued = dict(gauges["queued"])
    return {
        "ae_title": cfg.ae_title,
        "uptime_s": round(time.time() - (st.started_at if st is not None else ctx.started_at), 1),
        "receiver": {
            "up": bool(st is not None and st.receiver_up),
            "port": st.port if st is not None else cfg.port,
            "tls_port": st.tls_port if st is not None else None,
            "associations_now": st.associations_now if st is not None else 0,
            "max_associations": cfg.max_associations,
            "stats": dict(st.receiver_stats) if st is not None else {},
        },
        "spool": {"path": str(cfg.spool_dir), "bytes": ctx.spool_bytes(), **disk,
                  "reserve_bytes": cfg.disk.reserve_free_mib * 1024 * 1024},
        "jobs_by_state": by_state,
        "queue": {"by_resource": queued, "slots": slots},
        "workers": {"cpu_slots": cfg.workers, "gpus": list(cfg.gpus),
                    "processes": [s for s in slots if s["pid"] or s["slot_process"]],
                    # where tries run: the local slots or the Dask cluster (each job's host/worker/GPU: params.slot)
                    "executor": st.executor if st is not None else cfg.executor.kind},
        "pid": st.pid if st is not None else None,  # the node's
        "console_pid": os.getpid(),  # the console runs in a process of its own (docs/console.md)
        "checks": _ready_checks(ctx, got),
        # the node's and the console process's own, in time order
        "last_errors": sorted([*(st.last_errors if st is not None else ()), *ctx.own_errors],
                              key=lambda e: float(e["at"]))[-RECENT_ERRORS_KEPT:],
    }


@router.get("/api/v1/health", tags=["health"])
def health_api(_p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Receiver, spool disk, queue, workers and the last errors."""
    return health_report(ctx)


@router.get("/", include_in_schema=False)
def health_page(request: Request, _p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return render(request, "health.html", {"h": health_report(ctx), "title": "Health"})
