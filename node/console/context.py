"""What every console route reaches through the ``get_ctx`` dependency: the configuration, the
store and a handle to the running node's parts (receiver, pool, rules, scheduler hooks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

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

    @property
    def https(self) -> bool:
        return self.config.http.certificate is not None


def get_ctx(request: Request) -> ConsoleContext:
    """FastAPI dependency: the app's :class:`ConsoleContext`."""
    ctx: ConsoleContext = request.app.state.ctx
    return ctx
