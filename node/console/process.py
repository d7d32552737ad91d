"""The console in a process of its own (``dicom-node serve``): the node starts it, answers it over
node/console/control.py, starts it again when it dies and stops it when the node stops; the console
process runs at a lower CPU priority, with its own store connection, and ends itself when the node
process is gone.  Why a process: the console's request handling must not take the node's GIL from
the receiver (bench/README.md, console under load).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from node.config import NodeConfig
from node.console.context import NodeHandle

__all__ = ["ConsoleProcess", "CONSOLE_NICENESS", "START_TIMEOUT_S", "STOP_TIMEOUT_S"]

log = logging.getLogger("node.console")

#: how much lower the console process runs than the node (nice increment; and the lowest best-effort
#: I/O priority, as job processes)
CONSOLE_NICENESS = 10
#: how long the console process has to listen (it imports the web stack first)
START_TIMEOUT_S = 60.0
#: how long the console process has to end at node stop before it is killed
STOP_TIMEOUT_S = 5.0
#: waits before starting a console that died again: the next one per quick death in a row, up to the last
_RESTART_WAITS_S = (0.5, 1.0, 2.0, 5.0, 15.0, 30.0)
#: a console that ran this long before it died counts as no quick death
_HEALTHY_RUN_S = 60.0


def _console_main(config: NodeConfig, secret: bytes, conn: Connection, ready: Connection,
                  node: tuple[int, float], log_level: int) -> None:
    """The console process: niced, in a process group of its own, watching the node; serves the
    console until SIGTERM (from the node) or the node is gone."""
    # its own group: the node's Ctrl-C is the node's to handle, and watch_node ends this group only
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from node.job_process import lower_priority, watch_node

    lower_priority(CONSOLE_NICENESS)  # CPU and I/O, before any thread starts: they all inherit it
    from node import logsafe
    from node.console.control import RemoteNode
    from node.console.context import ConsoleContext
    from node.console.server import ConsoleServer
    from node.store import Store

    logging.basicConfig(level=log_level, stream=sys.stderr)  # the node's log: its stderr, its level
    logsafe.install(log_phi=config.log_phi)
    watch_node(*node)
    stopping: list[int] = []  # the handler takes no lock (see NodeService.run_forever): a list
    signal.signal(signal.SIGTERM, lambda signum, _f: stopping.append(signum))
    store = Store(config.database_url)
    ctx = ConsoleContext(config=config, store=store, node=RemoteNode(conn), secret=secret)
    # this process's own errors (an unhandled request) reach the health page beside the node's
    logging.getLogger().addHandler(logsafe.RecentErrors(ctx.own_errors))
    server = ConsoleServer(ctx, lower_thread_priority=False)
    try:
        server.start(timeout_s=START_TIMEOUT_S)
    except RuntimeError as exc:
        ready.send(("failed", str(exc)))
        store.close()
        sys.exit(1)
    ready.send(("ready", server.port))
    ready.close()
    while not stopping and server.serving():
        time.sleep(0.5)
    server.stop()
    store.close()


class ConsoleProcess:
    """The node's side of the console process: :meth:`start` returns once it listens (raises
    ``RuntimeError`` when it cannot: port in use...); a thread answers its requests and starts it
    again when it dies; :meth:`stop` ends it."""

    def __init__(self, config: NodeConfig, node: NodeHandle, secret: bytes) -> None:
        self.config = config.model_copy(deep=True)  # the port is pinned to the one listened on
        self.node = node
        self.secret = secret
        self.port = int(config.http.port)
        #: set by :func:`node.console.server.start_console` when it created the first admin
        self.first_admin_password: str | None = None
        self._mp = multiprocessing.get_context("spawn")  # not fork: the node has threads
        self._proc: Any = None  # multiprocessing's SpawnProcess
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        """The console process' pid (None before it started)."""
        return None if self._proc is None else int(self._proc.pid)

    @property
    def url(self) -> str:
        host = self.config.http.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"{'https' if self.config.http.certificate is not None else 'http'}://{shown}:{self.port}/"

    def _spawn(self) -> None:
        """Start the console process and wait until it listens."""
        from node.console.control import serve_console
        from node.job_process import process_started

        here, there = self._mp.Pipe(duplex=True)
        ready_r, ready_w = self._mp.Pipe(duplex=False)
        me = os.getpid()
        proc = self._mp.Process(target=_console_main, name="dicom-node-console", daemon=True,
                                args=(self.config, self.secret, there, ready_w, (me, process_started(me)),
                                      logging.getLogger().getEffectiveLevel()))
        proc.start()
        there.close()
        ready_w.close()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready_r.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the console process did not start (exit code {proc.exitcode}; see the log)")
            try:
                what, value = ready_r.recv()
            except EOFError:
                raise RuntimeError(f"the console process ended at start (exit code {proc.exitcode};"
                                   " see the log)") from None
        except BaseException:
            proc.kill()
            proc.join(STOP_TIMEOUT_S)
            here.close()
            raise
        finally:
            ready_r.close()
        if what != "ready":
            proc.join(STOP_TIMEOUT_S)
            here.close()
            raise RuntimeError(str(value))
        if self._stop.is_set():  # the node stopped while this one started
            proc.terminate()
            proc.join(STOP_TIMEOUT_S)
            here.close()
            return
        if self._conn is not None:
            self._conn.close()  # the previous console's end of the channel
        self.port = int(value)
        self.config.http.port = self.port  # a restart listens where the first one did
        self._proc, self._conn = proc, here
        answer = threading.Thread(target=serve_console, args=(here, self.node, self._stop),
                                  name=f"console-control-{proc.pid}", daemon=True)
        answer.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [answer]

    def start(self) -> None:
        self._spawn()
        supervisor = threading.Thread(target=self._supervise, name="console-supervisor", daemon=True)
        supervisor.start()
        self._threads.append(supervisor)

    def _supervise(self) -> None:
        """Start the console process again whenever it ends while the node runs."""
        quick_deaths = 0
        while not self._stop.is_set():
            proc, started = self._proc, time.monotonic()
            while proc.is_alive() and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                return
            proc.join(1.0)
            quick_deaths = 0 if time.monotonic() - started > _HEALTHY_RUN_S else quick_deaths + 1
            wait = _RESTART_WAITS_S[min(quick_deaths, len(_RESTART_WAITS_S) - 1)]
            log.warning("console process %s ended (exit code %s); starting it again in %g s", proc.pid,
                        proc.exitcode, wait)
            while not self._stop.wait(wait):
                try:
                    self._spawn()
                except (RuntimeError, OSError) as exc:
                    quick_deaths += 1
                    wait = _RESTART_WAITS_S[min(quick_deaths, len(_RESTART_WAITS_S) - 1)]
                    log.error("console process did not start again: %s; next try in %g s", exc, wait)
                    continue
                log.info("console process %s listening on %s again", self.pid, self.url)
                break

    def stop(self) -> None:
        """End the console process: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                log.warning("console process %s did not stop in %g s: killed", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
        for t in self._threads:
            t.join(timeout=2.0)
        if self._conn is not None:
            self._conn.close()
