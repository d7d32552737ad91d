"""What every console route reaches through the ``get_ctx`` dependency: the configuration, the
console's own store connection and a :class:`NodeHandle` on the running node (its status, rules in
force, metrics, and the actions: wake the pool, reload rules, dispatch now).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from fastapi import Request

from node.config import NodeConfig
from node.contracts import NodeStatus, RulesInForce
from node.store import Store

__all__ = ["NodeHandle", "NodeUnreachable", "ConsoleContext", "get_ctx"]


class NodeUnreachable(ConnectionError):
    """The node did not answer its console (it is gone or stuck)."""


class NodeHandle(Protocol):
    """What the console asks of the running node (the console does not import the service: imports
    point down).  :class:`node.service.NodeService` is one, in its own process (tests, tools); the
    console process reaches it through :class:`node.console.control.RemoteNode`.  Each call may raise
    :class:`NodeUnreachable`."""

    def status(self) -> NodeStatus: ...

    def rules_in_force(self) -> RulesInForce | None: ...

    def metrics_text(self) -> bytes:
        """The node process's counters and histograms in the Prometheus text format."""
        ...

    def wake_pool(self) -> None: ...

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
    #: the console process's own last ERROR records (node.logsafe.RecentErrors; the node's come in its
    #: status); empty when the console runs in the node's process, whose records the node keeps
    own_errors: list[dict[str, Any]] = field(default_factory=list)

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
