"""The worker pool: CPU and GPU job slots served by one supervisor thread in the node process.

It claims due jobs from the store for free slots, starts their processes (:mod:`node.job_process`),
enforces the job timeout by killing the whole process group, stops early starts that became
useless, and hands each finished try to the job lifecycle (:mod:`node.jobs`).
See docs/architecture.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from node.backend_registry import runs_model
from node.config import NodeConfig
from node.contracts import FailureKind, JobSpec, JobState, ProcessInfo, Resource, SeriesState, SlotInfo
from node.job_process import JobDone, JobFailed, SegReady, _job_process, _slot_process
from node.metrics import JOB_DURATION, JOBS_FINISHED, observe_stage_timings
from node.jobs import job_output_dir, publish_early_seg, record_failure, record_success, seg_series_uid
from node.pipeline.ai.common import GPU_SLOT_ENV
from node.store import Job, Store, instances_digest

__all__ = ["WorkerPool", "job_backend", "job_resource"]

log = logging.getLogger("node.pool")


@dataclass
class _Slot:
    """One job slot: ``cpu<N>`` (``config.workers`` of them) or ``gpu<id>`` (one per ``config.gpus``).

    ``proc``/``conn``: the slot's long-lived process for model jobs (None until the first one,
    and again after it was killed or ended).
    """

    index: int
    kind: Resource
    gpu: int | None
    env: dict[str, str]
    proc: BaseProcess | None = None
    conn: Connection | None = None

    @property
    def name(self) -> str:
        return f"gpu{self.gpu}" if self.kind == Resource.GPU else f"cpu{self.index}"


@dataclass
class _Running:
    job: Job
    proc: BaseProcess
    conn: Connection
    deadline: float
    persistent: bool = False
    started: float = field(default_factory=time.monotonic)
    provisional: bool = False  #: an early start not confirmed yet (refreshed by _check_running)


def _observe_try(r: _Running, outcome: str) -> None:
    """Count one finished try in the metrics (node/metrics.py)."""
    JOB_DURATION.labels(backend=r.job.backend, outcome=outcome).observe(time.monotonic() - r.started)
    JOBS_FINISHED.labels(backend=r.job.backend, outcome=outcome).inc()


def _kill_tree(proc: BaseProcess) -> None:
    """SIGKILL a job process, its process group and every descendant."""
    pid = proc.pid
    if pid is None:  # never started
        return
    import psutil

    victims = []
    try:
        victims = psutil.Process(pid).children(recursive=True)
    except psutil.Error:  # it has ended or is not ours to list: the group kill below still runs
        pass
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for v in victims:
        try:
            v.kill()
        except psutil.Error:  # it has ended meanwhile
            pass
    try:
        proc.kill()
    except OSError:  # it has ended meanwhile
        pass
    proc.join(10)


def job_backend(job: Job) -> str:
    """The backend a job runs: the rule's override, else the profile's model_type recorded at routing."""
    return str(job.params.backend_override or job.backend)


def job_resource(config: NodeConfig, job: Job) -> Resource:
    """The slot kind a job needs: 'gpu' for a model backend whose device is not ``cpu`` (the
    profile's ``model.device`` when it sets one, else ``models.device`` of node.yaml), else 'cpu'.

    Independent of whether this node has GPUs: without ``gpus`` every slot takes every job.
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


class WorkerPool:
    """CPU slots (``config.workers``) and GPU slots (``config.gpus``) served by one supervisor thread.

    * A job's slot kind is ``jobs.resource`` (:func:`job_resource`, set by the pool for jobs
      queued without one): model jobs (nnU-Net, TotalSegmentator, MONAI) whose device is not
      ``cpu`` are 'gpu', everything else 'cpu'.  With GPUs configured, a GPU slot only claims
      'gpu' jobs and a CPU slot only 'cpu' jobs (``Store.claim_job(kinds=...)``, one atomic
      UPDATE), so at most one model job runs per GPU and HU jobs run beside them.  Without
      GPUs every slot claims any job.
    * A GPU slot's processes get ``CUDA_VISIBLE_DEVICES=<its gpu>`` and ``models.device: cuda``
      (a profile with ``device: auto`` then uses that GPU as ``cuda:0``); when GPUs are
      configured, CPU slot processes get ``CUDA_VISIBLE_DEVICES=""`` (no GPU).
    * Model jobs run in the slot's long-lived process (:func:`_slot_process`), so the
      backend's per-process model cache stays warm across jobs; other jobs run in a process of
      their own (:func:`_job_process`).  A timeout kills the process group of whichever process
      runs the job; a killed slot process is started again for the next model job.

    Args:
        config: :class:`node.config.NodeConfig`.
        store: the job store (used from the supervisor thread).
        poll_s: how often the supervisor looks for due jobs when not woken.
        on_done: called (no arguments, from the supervisor thread) after a job succeeded
            and its dispatch rows were recorded, so the dispatcher can run at once instead
            of at its next tick; exceptions are logged, never raised.
    """

    def __init__(
        self, config: NodeConfig, store: Store, *, poll_s: float = 0.5, on_done: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.on_done = on_done
        self.size = max(1, int(config.workers))
        self.gpus = [int(g) for g in config.gpus]
        self.poll_s = poll_s
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["node.job_process", "node.pipeline.run"])
        cpu_env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""} if self.gpus else {}
        self.slots: list[_Slot] = [_Slot(i, Resource.CPU, None, dict(cpu_env)) for i in range(self.size)]
        self.slots += [_Slot(self.size + n, Resource.GPU, g, {"CUDA_VISIBLE_DEVICES": str(g), GPU_SLOT_ENV: str(g)})
                       for n, g in enumerate(self.gpus)]
        self._running: dict[int, _Running] = {}  # slot index -> running job
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = f"{socket.gethostname()}:{os.getpid()}"  # claims are f"{_name}:{slot}"
        #: job claims are leases (Store.claim_job): renewed every sixth of it while the job runs
        self._lease_s = float(config.store.job_lease_s)
        self._renewed = 0.0
        self.decode_workers = max(1, (os.cpu_count() or 1) // self.size)
        import psutil

        self._node_started: float = psutil.Process(os.getpid()).create_time()

    # -- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        # the forkserver (and its preload of the pipeline modules, see bench/README.md) starts now
        # rather than when the first job arrives; in the background, so the node is listening meanwhile
        threading.Thread(target=self._warm_forkserver, name="forkserver-warm-up", daemon=True).start()
        self._thread = threading.Thread(target=self._loop, name="worker-pool", daemon=True)
        self._thread.start()
        log.info("worker pool: %d CPU slot(s), %d GPU slot(s)%s, job timeout %.0f s", self.size, len(self.gpus),
                 f" (GPUs {', '.join(map(str, self.gpus))})" if self.gpus else "", self.config.job_timeout_s)
        if self.gpus and str(self.config.models.device) == "cpu":
            log.warning("gpus are configured but models.device is cpu: model jobs use the CPU slots")

    @staticmethod
    def _warm_forkserver() -> None:
        from multiprocessing import forkserver

        try:
            forkserver.ensure_running()
        except Exception:  # the first job starts it then
            log.debug("forkserver warm-up failed", exc_info=True)

    def wake(self) -> None:
        """Look for due jobs now (called after routing created jobs)."""
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
        long-lived model process, or None)."""
        running = dict(self._running)
        out = []
        for slot in list(self.slots):
            r = running.get(slot.index)
            out.append({"slot": slot.name, "kind": str(slot.kind), "job": r.job.id if r else None,
                        "backend": r.job.backend if r else None, "pid": r.proc.pid if r else None,
                        "seconds": round(time.monotonic() - r.started, 1) if r else None,
                        "slot_process": slot.proc.pid if slot.proc is not None and slot.proc.is_alive() else None})
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
        for idx, r in list(self._running.items()):
            _kill_tree(r.proc)
            if r.persistent:
                self._forget_slot_process(self.slots[idx])
            if self.store.requeue_job(r.job.id, "interrupted (node shut down)", counts_as_try=False):
                log.warning("job %d interrupted by shutdown: re-queued", r.job.id)
            self._running.pop(idx, None)
        for slot in self.slots:  # idle long-lived slot processes: ask them to end, then make sure
            if slot.proc is not None:
                try:
                    if slot.conn is not None:
                        slot.conn.send(None)
                except OSError:  # the process has ended: the join and kill below see to it
                    pass
                slot.proc.join(5)
                if slot.proc.is_alive():
                    _kill_tree(slot.proc)
                self._forget_slot_process(slot)

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
        for slot in self.slots:
            if self._stop.is_set():
                return
            kinds: tuple[Resource, ...] | None = (slot.kind,) if self.gpus else None
            running = self._running.get(slot.index)
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
                self._abort(slot.index, running)
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

    def _abort(self, idx: int, r: _Running) -> None:
        """Kill a running job's process (group) and forget it; the caller records what happens to the job."""
        _kill_tree(r.proc)
        if r.persistent:
            self._forget_slot_process(self.slots[idx])
        else:
            try:
                r.conn.close()
            except OSError:  # a broken pipe: nothing is left to release
                pass
        self._running.pop(idx, None)

    def _check_running(self) -> None:
        """Stop running jobs whose work became useless: dropped by the router (no longer ``running``),
        or early starts whose series received more instances (queued again) or moved on to a newer
        generation (dropped).  Refreshes each job's ``provisional`` flag."""
        for idx, r in list(self._running.items()):
            row = self.store.get_job(r.job.id)
            if row is None:
                continue
            if row.state != JobState.RUNNING:
                self._abort(idx, r)
                log.info("job %d stopped: it is %s now (%s)", row.id, row.state, row.error or "-")
                continue
            if not (row.worker or "").startswith(self._name + ":"):
                # our claim ran out (this node stalled) and another node claimed it: theirs now
                self._abort(idx, r)
                log.warning("job %d stopped: its claim ran out and %s runs it now", row.id, row.worker)
                continue
            r.provisional = row.provisional
            if not row.provisional:
                continue
            series = self.store.get_series(row.series_uid)
            if series is None:
                continue
            if series.generation != row.generation:
                self._abort(idx, r)
                self.store.drop_job(row.id, f"the series moved on to generation {series.generation}"
                                            " during the early start")
                log.info("job %d (early start) stopped: series %s has a newer generation", row.id, row.series_uid)
            elif row.started_at is not None and series.last_received_at > row.started_at:
                self._abort(idx, r)
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

    def _process_info(self, slot: _Slot) -> ProcessInfo:
        return ProcessInfo(slot=slot.name, env=dict(slot.env), log_level=self.config.log_level,
                           node_pid=os.getpid(), node_started=self._node_started, log_phi=self.config.log_phi,
                           nice=self.config.job_nice)

    def _forget_slot_process(self, slot: _Slot) -> None:
        if slot.conn is not None:
            try:
                slot.conn.close()
            except OSError:  # a broken pipe: nothing is left to release
                pass
        if slot.proc is not None and not slot.proc.is_alive():
            slot.proc.join(1)
        slot.proc = slot.conn = None

    def _slot_process_for(self, slot: _Slot) -> tuple[BaseProcess, Connection]:
        """The slot's long-lived process (started when missing or ended)."""
        if slot.proc is not None and not slot.proc.is_alive():
            log.info("slot %s: its process (pid %s) ended (exit code %s)", slot.name, slot.proc.pid,
                     slot.proc.exitcode)
            self._forget_slot_process(slot)
        if slot.proc is None:
            parent, child = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(target=_slot_process, args=(child, self._process_info(slot)),
                                     name=f"slot-{slot.name}", daemon=False)
            proc.start()
            child.close()
            slot.proc, slot.conn = proc, parent
            log.info("slot %s: started its model process (pid %d%s)", slot.name, proc.pid,
                     f", CUDA_VISIBLE_DEVICES={slot.env['CUDA_VISIBLE_DEVICES']!r}" if slot.env else "")
        assert slot.conn is not None
        return slot.proc, slot.conn

    def _start_job(self, slot: _Slot, job: Job) -> None:
        store = self.store
        persistent = runs_model(job_backend(job))
        try:
            store.set_series_state(job.series_uid, SeriesState.PROCESSING,
                                   from_states=(SeriesState.ROUTED, SeriesState.PROCESSING), generation=job.generation)
            models = self.config.models
            if slot.kind == Resource.GPU:
                models = models.model_copy(update={"device": "cuda"})
            instances = store.series_instances(job.series_uid)
            store.set_job_digest(job.id, instances_digest(i.sop_instance_uid for i in instances))
            spec = JobSpec(
                job_id=job.id,
                series_uid=job.series_uid,
                paths=tuple(i.path for i in instances),
                profile=job.profile,
                profiles_dir=self.config.profiles,
                backend=job.params.backend_override or None,
                output_dir=job_output_dir(self.config, job.id),
                seg_series_uid=seg_series_uid(job),
                decode_workers=self.decode_workers,
                models=models,
                outputs=job.params.outputs,
                file_mode=self.config.file_mode,
                dir_mode=self.config.dir_mode,
            )
            conn: Connection
            if persistent:
                proc, conn = self._slot_process_for(slot)
                conn.send(spec)
            else:
                conn, child = self._ctx.Pipe(duplex=False)
                proc = self._ctx.Process(target=_job_process, args=(child, self._process_info(slot), spec),
                                         name=f"job-{job.id}", daemon=False)
                proc.start()
                child.close()
            assert proc.pid is not None
            store.set_job_slot(job.id, SlotInfo(
                name=slot.name, kind=slot.kind, gpu=slot.gpu, pid=proc.pid, process="slot" if persistent else "job",
                device=models.device, cuda_visible_devices=slot.env.get("CUDA_VISIBLE_DEVICES")))
        except Exception as exc:
            log.exception("job %d: cannot start its process", job.id)
            if persistent and slot.proc is not None:
                _kill_tree(slot.proc)
                self._forget_slot_process(slot)
            record_failure(self.config, store, job, FailureKind.TRANSIENT, f"cannot start job process: {exc}")
            return
        log.info("job %d started%s (attempt %d/%d, series %s, rule %s, profile %s, backend %s, slot %s, %spid %d)",
                 job.id, " early (provisional: the series is not complete yet)" if job.provisional else "",
                 job.attempts, job.max_attempts, job.series_uid, job.rule, job.profile, job_backend(job),
                 slot.name, "long-lived process " if persistent else "", proc.pid)
        self._running[slot.index] = _Running(job, proc, conn, time.monotonic() + float(self.config.job_timeout_s),
                                             persistent, provisional=bool(job.provisional))

    def _reap(self) -> None:
        for idx, r in list(self._running.items()):
            slot = self.slots[idx]
            msg: JobDone | JobFailed | None = None
            try:
                while r.conn.poll():
                    m = r.conn.recv()
                    if isinstance(m, SegReady):  # the SEG is ready, meshes follow
                        self._seg_ready(r.job, m)
                        continue
                    msg = m
                    break
            except (EOFError, OSError):
                msg = None
            if msg is None and r.proc.is_alive():
                if time.monotonic() < r.deadline:
                    continue
                _kill_tree(r.proc)
                if r.persistent:
                    self._forget_slot_process(slot)  # a fresh one for the next model job
                else:
                    r.conn.close()
                self._running.pop(idx, None)
                record_failure(self.config, self.store, r.job, FailureKind.TRANSIENT,
                               f"timeout: killed after {self.config.job_timeout_s:g} s (job_timeout_s)")
                _observe_try(r, "timeout")
                continue
            if r.persistent:
                if msg is None:  # the slot process died under the job
                    r.proc.join(10)
                    self._forget_slot_process(slot)
            else:
                r.proc.join(10)
                r.conn.close()
            self._running.pop(idx, None)
            _observe_try(r, "died" if msg is None else "done" if isinstance(msg, JobDone) else "failed")
            if msg is None:
                record_failure(self.config, self.store, r.job, FailureKind.TRANSIENT,
                               f"job process died (exit code {r.proc.exitcode})")
            elif isinstance(msg, JobDone):
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
