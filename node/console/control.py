"""The control channel between the node and its console process: the node answers the console's
questions about its live parts (status, rules in force, metrics) and does the actions the console
asks for (wake the pool, reload rules, dispatch now), over a pipe the console process inherits.

The console sends only a request number and a name (bytes, never a pickle: the node does not
unpickle what the console sends); the node answers ``(number, ok, value)``.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from node.console.context import NodeHandle, NodeUnreachable
from node.contracts import NodeStatus, RulesInForce

__all__ = ["serve_console", "RemoteNode", "REQUESTS"]

log = logging.getLogger("node.console")

#: what the console may ask for: name -> the NodeHandle method answering it
REQUESTS = ("status", "rules_in_force", "metrics_text", "wake_pool", "reload_rules", "dispatch_now",
            "complete_and_route")
#: the longest request line accepted (a number and a name)
_MAX_REQUEST = 128


def serve_console(conn: Connection, node: NodeHandle, stop: threading.Event) -> None:
    """Answer the console's requests on ``conn`` until it closes or ``stop`` is set (node side;
    run in a thread of the node)."""
    handlers: dict[str, Callable[[], Any]] = {name: getattr(node, name) for name in REQUESTS}
    while not stop.is_set():
        try:
            if not conn.poll(0.5):
                continue
            raw = conn.recv_bytes(_MAX_REQUEST)
        except (EOFError, OSError):  # the console process ended (or sent more than a request line)
            return
        number, _, name = raw.decode("ascii", "replace").partition(" ")
        handler = handlers.get(name)
        try:
            if handler is None:
                raise ValueError(f"unknown request {name[:40]!r}")
            reply: tuple[str, bool, Any] = (number, True, handler())
        except Exception as exc:  # noqa: BLE001 - the console shows why; the node goes on
            log.warning("console request %s failed: %s: %s", name[:40], type(exc).__name__, exc)
            reply = (number, False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except OSError:
            return
        except Exception as exc:  # noqa: BLE001 - an answer that cannot be pickled: say so, go on
            log.warning("console request %s: cannot send the answer: %s: %s", name[:40], type(exc).__name__, exc)
            try:
                conn.send((number, False, f"cannot send the answer: {type(exc).__name__}"))
            except OSError:
                return


class RemoteNode:
    """A :class:`~node.console.context.NodeHandle` on the node, asked over ``conn`` (console side).

    Routes run on several threads: one request at a time on the pipe.  A late answer (after a
    timeout) is recognised by its number and dropped.
    """

    def __init__(self, conn: Connection, timeout_s: float = 10.0) -> None:
        self._conn = conn
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._number = 0

    def _ask(self, name: str) -> Any:
        with self._lock:
            self._number += 1
            number = str(self._number)
            deadline = time.monotonic() + self._timeout_s
            try:
                self._conn.send_bytes(f"{number} {name}".encode("ascii"))
                while True:
                    if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                        raise NodeUnreachable(f"the node did not answer {name} in {self._timeout_s:g} s")
                    got, ok, value = self._conn.recv()
                    if got == number:
                        break
            except (EOFError, OSError) as exc:
                raise NodeUnreachable(f"the node is gone ({type(exc).__name__})") from exc
        if not ok:
            raise NodeUnreachable(f"the node could not answer {name}: {value}")
        return value

    def status(self) -> NodeStatus:
        status: NodeStatus = self._ask("status")
        return status

    def rules_in_force(self) -> RulesInForce | None:
        held: RulesInForce | None = self._ask("rules_in_force")
        return held

    def metrics_text(self) -> bytes:
        return bytes(self._ask("metrics_text"))

    def wake_pool(self) -> None:
        self._ask("wake_pool")

    def reload_rules(self) -> None:
        self._ask("reload_rules")

    def dispatch_now(self) -> None:
        self._ask("dispatch_now")

    def complete_and_route(self) -> None:
        self._ask("complete_and_route")
