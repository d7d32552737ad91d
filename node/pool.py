"""The worker pool: one supervisor thread in the node process that serves the job slots of an
executor (:mod:`node.executor`: processes on this host, or a Dask cluster).

It claims due jobs from the store for free slots, starts their tries through the executor,
enforces the job timeout, stops early starts that became useless, and hands each finished try to
the job lifecycle (:mod:`node.jobs`).  See docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from node.backend_registry import runs_model
from node.config import NodeConfig
from node.contracts import FailureKind, JobSpec, JobState, Resource, SeriesState
from node.executor import Executor, LocalExecutor, Slot, TryHandle
from node.job_process import JobDone, JobFailed, SegReady
from node.metrics import JOB_DURATION, JOBS_FINISHED, observe_stage_timings
from node.jobs import job_output_dir, publish_early_seg, record_failure, record_success, seg_series_uid
from node.store import Job, Store, instances_digest

__all__ = ["WorkerPool", "job_backend", "job_resource", "make_executor"]

log = logging.getLogger("node.pool")


@dataclass
class _Running:
    job: Job
    slot: Slot
    handle: TryHandle
    deadline: float
    persistent: bool = False
    started: float = field(default_factory=time.monotonic)
    provisional: bool = False  #: an early start not confirmed yet (refreshed by _check_running)


def _observe_try(r: _Running, outcome: str) -> None:
    """Count one finished try in the metrics (node/metrics.py)."""
    JOB_DURATION.labels(backend=r.job.backend, outcome=outcome).observe(time.monotonic() - r.started)
    JOBS_FINISHED.labels(backend=r.job.backend, outcome=outcome).inc()


def job_backend(job: Job) -> str:
    """The backend a job runs: the rule's override, else the profile's model_type recorded at routing."""
    return str(job.params.backend_override or job.backend)


def job_resource(config: NodeConfig, job: Job) -> Resource:
    """The slot kind a job needs: 'gpu' for a model backend whose device is not ``cpu`` (the
    profile's ``model.device`` when it sets one, else ``models.device`` of node.yaml), else 'cpu'.

    Independent of whether this node has GPUs: without ``gpus`` every local slot takes every job.
    """
    if not runs_model(job_backend(job)):
        return Resource.CPU
    device = None
    try:
        from node.profiles import load_profile

        device = (load_profile(job.profile, config.profiles).model or {}).get("device")
    except Exception:  # noqa: BLE001 - the job itself reports a broken profile
        pass
    device = str(device or config.models.device or "auto").lower()
    return Resource.CPU if device == "cpu" else Resource.GPU


def make_executor(config: NodeConfig) -> Executor:
    """The executor ``executor.kind`` of node.yaml names (``local``, the default, or ``dask``)."""
    if config.executor.kind == "dask":
        from node.dask_executor import DaskExecutor

        return DaskExecutor(config)
    return LocalExecutor(config)


class WorkerPool:
    """The executor's slots served by one supervisor thread.

    * A job's slot kind is ``jobs.resource`` (:func:`job_resource`, set by the pool for jobs
      queued without one): model jobs (nnU-Net, TotalSegmentator, MONAI) whose device is not
      ``cpu`` are 'gpu', everything else 'cpu'.  When the executor's slots are partitioned (GPUs
      configured, or a Dask cluster), a GPU slot only claims 'gpu' jobs and a CPU slot only 'cpu'
      jobs (``Store.claim_job(kinds=...)``, one atomic UPDATE), so at most one model job runs per
      GPU and HU jobs run beside them.  Otherwise every slot claims any job.
    * Model jobs run where the backend's per-process model cache stays warm across jobs (a local
      slot's long-lived process; a Dask worker's); a timeout kills whatever runs the try.

    Args:
        config: :class:`node.config.NodeConfig`.
        store: the job store (used from the supervisor thread).
        poll_s: how often the supervisor looks for due jobs when not woken.
        on_done: called (no arguments, from the supervisor thread) after a job succeeded
            and its dispatch rows were recorded, so the dispatcher can run at once instead
            of at its next tick; exceptions are logged, never raised.
        executor: where tries run (default: :func:`make_executor` of ``config``).
    """

    def __init__(
        self, config: NodeConfig, store: Store, *, poll_s: float = 0.5, on_done: Callable[[], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_done = on_done
        self.executor = executor or make_executor(config)
        self.poll_s = poll_s
        self._running: dict[str, _Running] = {}  # slot name -> running job
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = f"{socket.gethostname()}:{os.getpid()}"  # claims are f"{_name}:{slot}"
        #: job claims are leases (Store.claim_job): renewed every sixth of it while the job runs
        self._lease_s = float(config.store.job_lease_s)
        self._renewed = 0.0
        self.decode_workers = max(1, (os.cpu_count() or 1) // max(1, int(config.workers)))

    @property
    def slots(self) -> list[Slot]:
        return self.executor.slots()

    # -- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.executor.set_waker(self.wake)  # a try's news is taken at once, not at the next round
        self.executor.start()
        self._thread = threading.Thread(target=self._loop, name="worker-pool", daemon=True)
        self._thread.start()
        log.info("worker pool: %s, job timeout %.0f s", self.executor.describe(), self.config.job_timeout_s)

    def wake(self) -> None:
        """Look now: for due jobs (called after routing created jobs), or at a try's news (the executor)."""
        self._wake.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking jobs; wait up to ``grace_s`` for running ones, then kill and re-queue them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(grace_s + 15)
            self._thread = None

    @property
    def running_jobs(self) -> list[int]:
        return [r.job.id for r in list(self._running.values())]

    def snapshot(self) -> list[dict[str, Any]]:
        """Per slot (the console's health page): ``slot``, ``kind``, ``job`` (running job id or None),
        ``pid`` of the process running it, ``seconds`` it has run, ``slot_process`` (pid of the slot's
        long-lived model process, or None); on Dask also ``worker`` (the Dask worker running it)."""
        running = dict(self._running)
        out = []
        for slot in list(self.slots):
            r = running.get(slot.name)
            info = r.handle.slot_info if r else None
            row: dict[str, Any] = {
                "slot": slot.name, "kind": str(slot.kind), "job": r.job.id if r else None,
                "backend": r.job.backend if r else None, "pid": (info.pid or None) if info else None,
                "seconds": round(time.monotonic() - r.started, 1) if r else None,
                "slot_process": slot.proc.pid if slot.proc is not None and slot.proc.is_alive() else None}
            if info is not None and info.worker:
                row["worker"] = info.worker
            out.append(row)
        return out

    # -- supervisor
    def _loop(self) -> None:
        checked = 0.0
        while not self._stop.is_set():
            try:
                self._reap()
                self._renew_leases()
                if self._running and time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    self._check_running()
                self._fill()
            except Exception:  # the supervisor must survive (e.g. database busy)
                log.exception("worker pool supervisor error")
            self._wake.wait(0.2 if self._running else self.poll_s)
            self._wake.clear()
        self._shutdown()

    def _renew_leases(self) -> None:
        """Keep this node's job claims (a job whose claim is not renewed is no longer ours:
        :meth:`_check_running` stops it)."""
        if not self._running or time.monotonic() - self._renewed < self._lease_s / 6:
            return
        self._renewed = time.monotonic()
        ids = [r.job.id for r in self._running.values()]
        lost = set(ids) - self.store.renew_job_leases(self._name, ids, lease_s=self._lease_s)
        if lost:
            log.warning("job(s) %s: claim not renewed (no longer running here)", ", ".join(map(str, sorted(lost))))

    def _shutdown(self, grace_s: float = 5.0) -> None:
        end = time.monotonic() + grace_s
        while self._running and time.monotonic() < end:
            self._reap()
            time.sleep(0.1)
        for name, r in list(self._running.items()):
            r.handle.kill()
            if self.store.requeue_job(r.job.id, "interrupted (node shut down)", counts_as_try=False):
                log.warning("job %d interrupted by shutdown: re-queued", r.job.id)
            self._running.pop(name, None)
        self.executor.shutdown()

    def _classify(self) -> None:
        """Give queued jobs without a slot kind theirs (rows from the router or an older schema)."""
        for job in self.store.unclassified_jobs():
            self.store.set_job_resource(job.id, job_resource(self.config, job))

    def _early_quiet_s(self) -> float | None:
        """``early_start_s`` when early start is in effect (provisional jobs may be claimed), else None."""
        return float(self.config.early_start_s) if self.config.early_start_enabled else None

    def _fill(self) -> None:
        if self._stop.is_set():
            return
        self._classify()
        # claim kinds that found nothing in this pass (("confirmed", kinds): confirmed jobs only)
        empty: set[tuple[Resource, ...] | None | tuple[str, tuple[Resource, ...] | None]] = set()
        early = self._early_quiet_s()
        for slot in self.executor.slots():
            if self._stop.is_set():
                return
            kinds: tuple[Resource, ...] | None = (slot.kind,) if self.executor.partitioned else None
            running = self._running.get(slot.name)
            if running is not None:
                # speculative work gives way: a confirmed job waiting for this slot kind takes
                # the slot of an early start (which runs again once a slot is free)
                if not running.provisional or ("confirmed", kinds) in empty:
                    continue
                job = self.store.claim_job(worker=f"{self._name}:{slot.name}", kinds=kinds, confirmed_only=True,
                                           lease_s=self._lease_s)
                if job is None:
                    empty.add(("confirmed", kinds))
                    continue
                self._abort(slot.name, running)
                if self.store.requeue_job(running.job.id, "early start paused: its slot went to a confirmed job",
                                          counts_as_try=False, discard_result=True):
                    log.info("job %d (early start) stopped to free slot %s for job %d; queued again",
                             running.job.id, slot.name, job.id)
                self._start_job(slot, job)
                continue
            if kinds in empty:
                continue
            job = self.store.claim_job(worker=f"{self._name}:{slot.name}", kinds=kinds, early_quiet_s=early,
                                       lease_s=self._lease_s)
            if job is None:
                empty.add(kinds)
                continue
            self._start_job(slot, job)

    def _abort(self, name: str, r: _Running) -> None:
        """Kill a running try and forget it; the caller records what happens to the job."""
        r.handle.kill()
        self._running.pop(name, None)

    def _check_running(self) -> None:
        """Stop running jobs whose work became useless: dropped by the router (no longer ``running``),
        or early starts whose series received more instances (queued again) or moved on to a newer
        generation (dropped).  Refreshes each job's ``provisional`` flag and where it runs."""
        for name, r in list(self._running.items()):
            row = self.store.get_job(r.job.id)
            if row is None:
                continue
            if row.state != JobState.RUNNING:
                self._abort(name, r)
                log.info("job %d stopped: it is %s now (%s)", row.id, row.state, row.error or "-")
                continue
            if not (row.worker or "").startswith(self._name + ":"):
                # our claim ran out (this node stalled) and another node claimed it: theirs now
                self._abort(name, r)
                log.warning("job %d stopped: its claim ran out and %s runs it now", row.id, row.worker)
                continue
            place = r.handle.place()
            if place is not None:
                self.store.set_job_slot(row.id, place)
            r.provisional = row.provisional
            if not row.provisional:
                continue
            series = self.store.get_series(row.series_uid)
            if series is None:
                continue
            if series.generation != row.generation:
                self._abort(name, r)
                self.store.drop_job(row.id, f"the series moved on to generation {series.generation}"
                                            " during the early start")
                log.info("job %d (early start) stopped: series %s has a newer generation", row.id, row.series_uid)
            elif row.started_at is not None and series.last_received_at > row.started_at:
                self._abort(name, r)
                if self.store.requeue_job(row.id, "new instances arrived during the early start",
                                          counts_as_try=False, discard_result=True):
                    log.info("job %d (early start) stopped: series %s received more instances; it starts again"
                             " once the series is quiet", row.id, row.series_uid)

    def _seg_ready(self, job: Job, seg: SegReady) -> None:
        """A running job wrote its SEG (``results/<id>-seg.dcm``): record it, queue its C-STOREs."""
        try:
            self.store.set_job_early_seg(job.id, seg.seg_early, seg.seg_series_uid)
            if publish_early_seg(self.config, self.store, job.id) and self.on_done is not None:
                self.on_done()
        except Exception:  # the SEG is then sent with the whole result
            log.exception("job %d: cannot queue the early SEG", job.id)

    def job_spec(self, job: Job) -> JobSpec:
        """The spec of a try of ``job`` that starts now (records the instance set it runs on)."""
        instances = self.store.series_instances(job.series_uid)
        self.store.set_job_digest(job.id, instances_digest(i.sop_instance_uid for i in instances))
        return JobSpec(
            job_id=job.id,
            series_uid=job.series_uid,
            paths=tuple(i.path for i in instances),
            profile=job.profile,
            profiles_dir=self.config.profiles,
            backend=job.params.backend_override or None,
            output_dir=job_output_dir(self.config, job.id),
            seg_series_uid=seg_series_uid(job),
            decode_workers=self.decode_workers,
            models=self.config.models,
            outputs=job.params.outputs,
            file_mode=self.config.file_mode,
            dir_mode=self.config.dir_mode,
        )

    def _start_job(self, slot: Slot, job: Job) -> None:
        store = self.store
        persistent = runs_model(job_backend(job))
        timeout = float(self.config.job_timeout_s)
        try:
            store.set_series_state(job.series_uid, SeriesState.PROCESSING,
                                   from_states=(SeriesState.ROUTED, SeriesState.PROCESSING), generation=job.generation)
            handle = self.executor.start_try(slot, self.job_spec(job), persistent=persistent, timeout_s=timeout)
            store.set_job_slot(job.id, handle.slot_info)
        except Exception as exc:
            log.exception("job %d: cannot start its process", job.id)
            record_failure(self.config, store, job, FailureKind.TRANSIENT, f"cannot start job process: {exc}")
            return
        info = handle.slot_info
        log.info("job %d started%s (attempt %d/%d, series %s, rule %s, profile %s, backend %s, slot %s, %s%s)",
                 job.id, " early (provisional: the series is not complete yet)" if job.provisional else "",
                 job.attempts, job.max_attempts, job.series_uid, job.rule, job.profile, job_backend(job),
                 slot.name, "long-lived process " if persistent and info.pid else "",
                 f"pid {info.pid}" if info.pid else f"on {info.worker or 'the cluster'}")
        self._running[slot.name] = _Running(job, slot, handle,
                                            time.monotonic() + timeout + self.executor.timeout_grace_s,
                                            persistent, provisional=bool(job.provisional))

    def _reap(self) -> None:
        for name, r in list(self._running.items()):
            msg: JobDone | JobFailed | None = None
            for m in r.handle.poll():
                if isinstance(m, SegReady):  # the SEG is ready, meshes follow
                    self._seg_ready(r.job, m)
                    continue
                msg = m
                break
            if msg is None and r.handle.alive():
                if time.monotonic() < r.deadline:
                    continue
                r.handle.kill()
                self._running.pop(name, None)
                record_failure(self.config, self.store, r.job, FailureKind.TRANSIENT,
                               f"timeout: killed after {self.config.job_timeout_s:g} s (job_timeout_s)")
                _observe_try(r, "timeout")
                continue
            self._running.pop(name, None)
            place = r.handle.place()
            if place is not None:
                self.store.set_job_slot(r.job.id, place)
            if msg is None:
                lost = r.handle.lost()
                _observe_try(r, "lost" if lost is not None else "died")
                if lost is not None:
                    if self.store.requeue_job(r.job.id, lost, counts_as_try=False):
                        log.warning("job %d: %s; queued again", r.job.id, lost)
                    continue
                record_failure(self.config, self.store, r.job, FailureKind.TRANSIENT, r.handle.died())
            else:
                r.handle.finish()
                _observe_try(r, "done" if isinstance(msg, JobDone) else "failed")
                if isinstance(msg, JobDone):
                    observe_stage_timings(msg.result.timings_s)
                    state = record_success(self.config, self.store, r.job, msg.result)
                    if state == "done" and self.on_done is not None:
                        try:
                            self.on_done()
                        except Exception:  # a hook must not stop the supervisor
                            log.exception("on_done hook failed")
                else:
                    record_failure(self.config, self.store, r.job, msg.kind, msg.message)
            self._wake.set()
