"""What every console route reaches through the ``get_ctx`` dependency: the configuration, the
store and a handle to the running node's parts (receiver, pool, rules, scheduler hooks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from fastapi import Request

from node.config import NodeConfig
from node.store import Store

__all__ = ["NodeHandle", "ConsoleContext", "get_ctx"]


class NodeHandle(Protocol):
    """The parts of a running :class:`node.service.NodeService` the console uses (the console does
    not import the service: imports point down).  Attributes are None before the node started them."""

    receiver: Any  # node.scp.receiver.Receiver
    pool: Any  # node.pool.WorkerPool
    rules: Any  # node.routing.rules.RuleSetHolder
    router: Any  # node.router.Router
    scheduler: Any  # APScheduler BackgroundScheduler

    def reload_rules(self) -> None: ...

    def dispatch_now(self) -> None: ...

    def complete_and_route(self) -> None: ...


@dataclass
class ConsoleContext:
    """The console's view of the node.

    Args:
        config: the node configuration.
        store: the node's store (the only owner of state).
        node: the running node, or None when the app runs without one (tools, some tests).
        secret: the key cookies are signed with.
    """

    config: NodeConfig
    store: Store
    node: NodeHandle | None = None
    secret: bytes = b""
    started_at: float = field(default_factory=time.time)
    #: the address the console listens on once started (``https://127.0.0.1:8080``), for messages
    url: str = ""
    #: recent error lines of the node (filled by a logging handler, shown on the health page)
    last_errors: list[dict[str, Any]] = field(default_factory=list)

    #: :meth:`cached` values: key -> (time computed, value)
    _cache: dict[str, tuple[float, Any]] = field(default_factory=dict)

    @property
    def https(self) -> bool:
        return self.config.http.certificate is not None

    def cached(self, key: str, ttl_s: float, compute: Callable[[], Any]) -> Any:
        """``compute()``, reused for ``ttl_s`` seconds (figures that read a whole table, per page refresh
        or scrape)."""
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < ttl_s:
            return hit[1]
        value = compute()
        self._cache[key] = (now, value)
        return value

    def clear_cache(self) -> None:
        self._cache.clear()

    def spool_bytes(self) -> int:
        """The store's :meth:`~node.store.Store.spool_bytes` under the retention setting, cached 15 s."""
        days = self.config.spool_retention_days

        def compute() -> int:
            return self.store.spool_bytes(retention_cutoff=time.time() - days * 86400.0 if days > 0 else None)

        return int(self.cached("spool_bytes", 15.0, compute))


def get_ctx(request: Request) -> ConsoleContext:
    """FastAPI dependency: the app's :class:`ConsoleContext`."""
    ctx: ConsoleContext = request.app.state.ctx
    return ctx
