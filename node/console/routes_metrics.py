"""``GET /metrics``: the node's Prometheus metrics (node/metrics.py, counted in the node process and
fetched from it over node/console/control.py) in the text exposition format, with the store's gauges
read at the scrape.  Needs a viewer login or API token (Prometheus:
``authorization: {credentials: <token>}``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node.console.auth import Principal, Role, require
from node.console.context import ConsoleContext, NodeUnreachable, get_ctx
from node.metrics import REGISTRY, StoreCollector

router = APIRouter()


@router.get("/metrics", tags=["metrics"], response_class=Response)
def metrics(_p: Principal = Depends(require(Role.VIEWER)), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    """Prometheus text format: counters and histograms of the node process, gauges of the store."""
    gauges = CollectorRegistry(auto_describe=False)
    gauges.register(StoreCollector(ctx.store, ctx.spool_bytes))
    try:  # the console runs in a process of its own: the node's counters are counted in the node's
        counted = ctx.node.metrics_text() if ctx.node is not None else generate_latest(REGISTRY)
    except NodeUnreachable as exc:
        raise HTTPException(503, f"the node does not answer: {exc}") from exc
    body = counted + generate_latest(gauges)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
