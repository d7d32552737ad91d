"""Runs the console app with uvicorn on ``http.host``/``http.port``, with HTTPS when
``http.certificate``/``http.key`` are set: :func:`start_console` starts it for ``dicom-node serve`` in
a process of its own (node/console/process.py), or in a thread of the caller's process
(``in_process=True``: tests and tools that want the app beside them).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from node.config import NodeConfig
from node.console.app import create_app
from node.console.auth import ensure_first_admin
from node.console.context import ConsoleContext, NodeHandle
from node.console.process import CONSOLE_NICENESS, ConsoleProcess
from node.store import Store

__all__ = ["ConsoleServer", "start_console", "HEADER_TIMEOUT_S", "MAX_CONNECTIONS", "CONSOLE_NICENESS"]

log = logging.getLogger("node.console")


#: a connection that has not sent a whole request head this long after it opened is closed (uvicorn
#: has no such limit: idle or trickling sockets were held for ever)
HEADER_TIMEOUT_S = 10.0
#: connections the console keeps open at most; more are closed as soon as they are accepted (its
#: sockets must not use up the file descriptors of the process it runs in: the node's, in-process).
MAX_CONNECTIONS = 256


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with :data:`HEADER_TIMEOUT_S` and :data:`MAX_CONNECTIONS`."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.close()
            return
        self.loop.call_later(HEADER_TIMEOUT_S, self._head_due)

    def _head_due(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


class ConsoleServer:
    """The console's HTTP server in a thread.  :meth:`start` returns once it listens; :attr:`port` is the
    real port.  ``lower_thread_priority``: nice its threads (in the node's process; a console process
    is niced as a whole)."""

    def __init__(self, ctx: ConsoleContext, *, lower_thread_priority: bool = True) -> None:
        self.ctx = ctx
        self.lower_thread_priority = lower_thread_priority
        self.app = create_app(ctx)
        http = ctx.config.http
        self._config = uvicorn.Config(
            self.app, host=http.host, port=http.port, log_level="warning", access_log=False,
            ssl_certfile=str(http.certificate) if http.certificate else None,
            ssl_keyfile=str(http.key) if http.key else None,
            lifespan="off", server_header=False, timeout_graceful_shutdown=5, http=_GuardedH11,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.port = http.port
        #: set by :func:`start_console` when it created the first admin (for the start-up message)
        self.first_admin_password: str | None = None

    @property
    def url(self) -> str:
        host = self.ctx.config.http.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"{'https' if self.ctx.https else 'http'}://{shown}:{self.port}/"

    def _run(self) -> None:
        # The console must not slow the receiver: its thread, and the worker threads it starts (they
        # inherit it), run at a lower CPU priority than the node's own threads (Linux: per thread).
        if self.lower_thread_priority:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CONSOLE_NICENESS)
            except (OSError, AttributeError):  # not Linux, or not permitted: run at the node's priority
                log.debug("console: cannot lower its thread priority", exc_info=True)
        self._server.run()

    def serving(self) -> bool:
        """Whether the server thread still runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 15.0) -> None:
        """Start serving in a daemon thread; raises ``RuntimeError`` when it does not listen in time."""
        self._thread = threading.Thread(target=self._run, name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the console did not start on {self.ctx.config.http.host}:{self.ctx.config.http.port}"
                                   " (port in use? see the log)")
            time.sleep(0.02)
        for server in self._server.servers:
            for sock in server.sockets:
                self.port = int(sock.getsockname()[1])
                break
        self.ctx.url = self.url

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def start_console(config: NodeConfig, store: Store, node: NodeHandle, *,
                  in_process: bool = False) -> ConsoleServer | ConsoleProcess:
    """Start the console of a running node: the cookie key (made once, kept in the store), the first
    admin when there is no user (its one-time password logged once), then the console process (or,
    ``in_process``, the server thread).  Raises ``RuntimeError`` when it does not listen."""
    secret = bytes.fromhex(store.setdefault_setting("cookie_secret", secrets.token_hex(32)))
    password = ensure_first_admin(store)
    if password is not None:  # logged at once: even if the server fails to start, it is not lost
        log.warning("console: created user 'admin' with the one-time password %s (it must be changed at first"
                    " login; `dicom-node users passwd admin` sets another)", password)
    server: ConsoleServer | ConsoleProcess
    if in_process:
        server = ConsoleServer(ConsoleContext(config=config, store=store, node=node, secret=secret))
    else:
        server = ConsoleProcess(config, node, secret)
    server.first_admin_password = password
    server.start()
    log.info("console listening on %s%s", server.url,
             f" (process {server.pid})" if isinstance(server, ConsoleProcess) else "")
    https = config.http.certificate is not None
    if not https and config.http.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("console: listening on %s without HTTPS: passwords, tokens and patient data cross the network in"
                    " clear (set http.certificate and http.key)", config.http.host)
    return server
