"""The running node: one job store, the receiver, the periodic work (completion sweep and routing,
rules reload, dispatch, spool retention on an APScheduler scheduler), the worker pool and the
operations console (node/console/, when ``http.enabled``: a process of its own, answered through
:class:`NodeService`'s status and action methods), with startup recovery and a clean stop.  See
docs/architecture.md.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from prometheus_client import generate_latest

from node import logsafe
from node.completion import sweep
from node.config import NodeConfig
from node.contracts import NodeStatus, RulesInForce
from node.durable import makedirs_durable, set_modes
from node.jobs import ensure_dispatches
from node.metrics import REGISTRY
from node.pool import WorkerPool
from node.profiles import list_profiles
from node.router import Router
from node.routing.rules import RuleSetHolder
from node.scp.receiver import Receiver
from node.scp.tls import expiry_warning
from node.spool import Spool
from node.store import Store

__all__ = ["NodeService"]

log = logging.getLogger("node.service")


def _skip_overlap_notice(record: logging.LogRecord) -> bool:
    """Drop APScheduler's warning that a tick was skipped because the previous run of the same job
    still runs: routing a large series takes longer than the 0.5 s tick, and skipping is intended
    (``max_instances: 1``, ``coalesce``)."""
    return "maximum number of running instances reached" not in record.getMessage()


class NodeService:
    """The node (see the module docstring); for its console, a
    :class:`node.console.context.NodeHandle` (status, rules in force, metrics, actions).

    Args:
        config: a loaded :class:`node.config.NodeConfig`.
        console_in_process: run the console in a thread of this process rather than in a process of
            its own (tests that reach into the console's app; ``dicom-node serve`` never does).

    After :meth:`start`, :attr:`port` is the port actually listened on.
    """

    #: the lease on spool retention (run hourly by its holder)
    RETENTION_LEASE_S = 7200.0

    def __init__(self, config: NodeConfig, *, console_in_process: bool = False) -> None:
        self.config = config
        self.console_in_process = console_in_process
        self.started_at = time.time()
        #: the last ERROR log records (while the console runs), shown on its health page
        self.last_errors: list[dict[str, Any]] = []
        self._last_errors_handler: logging.Handler | None = None
        #: this node process, as its store leases and job claims name it
        self.node_id = f"{socket.gethostname()}:{os.getpid()}"
        self._leases: set[str] = set()
        self.store: Store | None = None
        self.receiver: Receiver | None = None
        self.rules: RuleSetHolder | None = None
        self.router: Router | None = None
        self.pool: WorkerPool | None = None
        self.scheduler: Any = None
        self._stopped = threading.Event()
        self._route_lock = threading.Lock()
        self._dispatcher: Any = None
        self._dispatcher_missing_logged = False
        self.console: Any = None  # node.console ConsoleProcess (ConsoleServer in-process) when http.enabled

    @property
    def port(self) -> int:
        return self.receiver.port if self.receiver is not None else int(self.config.port)

    # -- periodic jobs
    def complete_and_route(self) -> None:
        """Completion sweep, then route every complete series; wakes the pool when jobs were created."""
        assert self.store is not None and self.router is not None
        requeued = self.store.requeue_expired_jobs()
        if requeued:
            log.warning("job(s) %s: their claim ran out (the node running them is gone); queued again",
                        ", ".join(map(str, requeued)))
            if self.pool is not None:
                self.pool.wake()
        if not self._holds("series", float(self.config.store.work_lease_s)):
            return  # another node process completes and routes the series of the shared store
        with self._route_lock:
            sweep(self.store, self.config.quiet_period_s, refused_wait_s=self.config.incomplete_series_wait_s)
            outcomes = self.router.route_pending()
            if self.config.early_start_enabled:
                outcomes += self.router.route_early(self.config.early_start_s)
        if any(o.jobs for o in outcomes) and self.pool is not None:
            self.pool.wake()

    def _holds(self, name: str, lease_s: float) -> bool:
        """Whether this node process does the store-wide work ``name`` now: always on SQLite (one
        node); on a shared store whoever holds its lease, renewed at each run (docs/scaling.md)."""
        assert self.store is not None
        if not self.store.shared:
            return True
        held = self.store.take_node_lease(name, self.node_id, lease_s)
        if held and name not in self._leases:
            log.info("this node (%s) does the %s work of the shared store now", self.node_id, name)
        elif not held and name in self._leases:
            log.warning("this node (%s) no longer holds the %s lease", self.node_id, name)
        if held:
            self._leases.add(name)
        else:
            self._leases.discard(name)
        return held

    def reload_rules(self) -> None:
        assert self.rules is not None
        self.rules.reload_if_changed()

    # -- what the console asks (node.console.context.NodeHandle)
    def status(self) -> NodeStatus:
        """The live parts' status, one snapshot."""
        r, pool = self.receiver, self.pool
        return NodeStatus(
            pid=os.getpid(), started_at=self.started_at,
            receiver_up=bool(r is not None and getattr(r, "_servers", None)),
            port=self.port, tls_port=r.tls_port if r is not None else None,
            associations_now=r.policy.active() if r is not None else 0,
            receiver_stats=dict(r.stats) if r is not None else {},
            slots=tuple(pool.snapshot()) if pool is not None else (),
            executor=pool.executor.describe() if pool is not None else self.config.executor.kind,
            last_errors=tuple(self.last_errors),
        )

    def rules_in_force(self) -> RulesInForce | None:
        holder = self.rules
        return None if holder is None else RulesInForce(holder.ruleset, holder.last_error)

    def metrics_text(self) -> bytes:
        """This process's counters and histograms (node/metrics.py) in the Prometheus text format."""
        return bytes(generate_latest(REGISTRY))

    def wake_pool(self) -> None:
        if self.pool is not None:
            self.pool.wake()

    def run_dispatch(self) -> None:
        """``node.dispatcher.Dispatcher(config, store).run_due()`` when the module exists."""
        if self._dispatcher is None:
            try:
                mod = importlib.import_module("node.dispatcher")
            except ModuleNotFoundError as exc:
                if exc.name != "node.dispatcher":
                    raise
                if not self._dispatcher_missing_logged:
                    log.warning("node.dispatcher is not installed: results are kept, nothing is sent")
                    self._dispatcher_missing_logged = True
                return
            self._dispatcher = mod.Dispatcher(self.config, self.store)
        self._dispatcher.run_due()

    def dispatch_now(self) -> None:
        """Run the dispatcher now (a job just finished) rather than at its next 2 s tick.

        The scheduler runs it (one instance at a time, as every tick); before the
        scheduler is up, the first tick comes soon anyway.
        """
        sched = self.scheduler
        if sched is None or self._stopped.is_set():
            return
        try:
            sched.modify_job("dispatch", next_run_time=datetime.now(timezone.utc))
        except JobLookupError:  # not scheduled yet, or shutting down
            pass

    def checkpoint_store(self) -> None:
        """The store's write-ahead log into its database file, off the receive path (Store.defer_checkpoints)."""
        if self.store is not None:
            self.store.checkpoint()

    def clean_spool(self) -> None:
        """Spool retention (:meth:`node.spool.Spool.clean`)."""
        assert self.store is not None
        if not self._holds("retention", self.RETENTION_LEASE_S):
            return
        Spool(self.config.spool_dir, self.config.quarantine_dir).clean(self.store, self.config.spool_retention_days)

    def check_certificate(self) -> None:
        """Warn when the TLS certificate expires soon (``tls.expiry_warning_days``)."""
        if self.config.tls is not None:
            warning = expiry_warning(self.config.tls)
            if warning:
                log.warning("%s", warning)

    # -- lifecycle
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        cfg = self.config
        self.started_at = time.time()
        # patient data: the configured modes for what the node writes itself (node/durable.py), and
        # a umask to match for everything else (the SQLite files, job processes' libraries)
        set_modes(cfg.file_mode, cfg.dir_mode)
        os.umask(0o777 & ~(cfg.file_mode | cfg.dir_mode))
        makedirs_durable(cfg.storage)
        if cfg.http.enabled:
            self._last_errors_handler = logsafe.RecentErrors(self.last_errors)
            logging.getLogger().addHandler(self._last_errors_handler)
        self.store = store = Store(cfg.database_url)
        store.defer_checkpoints()  # the scheduler's "store-checkpoint" job does them, off the receive path
        if store.shared:
            log.info("job store %s, shared with the other node processes", store.url)
        self.rules = RuleSetHolder(
            cfg.rules,
            known_profiles=lambda: list_profiles(cfg.profiles),
            known_destinations=lambda: list(cfg.destinations),
        )
        log.info("routing rules %s: %d rule(s), version %s", cfg.rules, len(self.rules.ruleset),
                 self.rules.ruleset.version)
        self.router = Router(cfg, store, self.rules)
        # a crash cut these tries short: the try counts, so a job that crashes the node every time ends
        # failed (on a shared store only the jobs no live node process holds)
        requeued = len(store.requeue_orphaned_jobs())
        if requeued:
            log.warning("re-queued %d job(s) left running by a previous run", requeued)
        ensure_dispatches(cfg, store)
        self.receiver = Receiver(cfg, store)
        self.receiver.start()  # rescans the spool first
        self.complete_and_route()  # complete-but-unrouted series from before the restart
        self.pool = WorkerPool(cfg, store, on_done=self.dispatch_now)
        self.pool.start()
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # before add_job: it logs there
        logging.getLogger("apscheduler.scheduler").addFilter(_skip_overlap_notice)
        self.scheduler = sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                                   "misfire_grace_time": 30})
        sched.add_job(self.complete_and_route, "interval", seconds=0.5, id="complete-and-route")
        sched.add_job(self.reload_rules, "interval", seconds=2, id="rules-reload")
        sched.add_job(self.run_dispatch, "interval", seconds=2, id="dispatch")
        sched.add_job(self.clean_spool, "interval", hours=1, id="spool-retention")
        sched.add_job(self.checkpoint_store, "interval", seconds=1, id="store-checkpoint")
        if cfg.tls is not None:
            sched.add_job(self.check_certificate, "interval", hours=24, id="tls-certificate")
        sched.start()
        self.clean_spool()
        self.check_certificate()
        if cfg.http.enabled:
            from node.console.server import start_console  # the web stack loads only when the console runs

            try:
                self.console = start_console(cfg, store, self, in_process=self.console_in_process)
            except (RuntimeError, OSError) as exc:
                # the DICOM path matters more than the console: the node goes on without it
                log.error("console not started: %s", exc)

    def stop(self) -> None:
        """Stop everything (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("node stopping")
        if self.console is not None:
            self.console.stop()
        if self._last_errors_handler is not None:
            logging.getLogger().removeHandler(self._last_errors_handler)
        if self.receiver is not None:
            self.receiver.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.pool is not None:
            self.pool.stop()
        if self.store is not None:
            for name in sorted(self._leases):  # another node takes the work over at once
                self.store.release_node_lease(name, self.node_id)
            self.store.close()
        log.info("node stopped")

    def run_forever(self, on_ready: Any = None) -> None:
        """Start, call ``on_ready(self)``, serve until SIGTERM/SIGINT, then stop cleanly."""
        # The handler only appends to a list: a handler that took a lock (Event.set, logging) ran
        # again, in the same thread, when a second signal came while the first held it (Ctrl-C
        # twice, `timeout` and a kill) and waited for itself for ever: the node never stopped.
        received: list[int] = []

        def _signal(signum: int, _frame: Any) -> None:
            received.append(signum)

        old = {s: signal.signal(s, _signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if on_ready is not None:
                on_ready(self)
            while not received:
                time.sleep(0.2)
            log.info("received %s", ", ".join(signal.Signals(s).name for s in received))
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
