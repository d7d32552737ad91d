"""The Dask worker side of ``executor: {kind: dask}``: the task that runs one try of a job on a
worker, and the preload that readies a worker for it (``dask worker --preload node.dask_worker``,
which ``dicom-node worker`` starts).

The task runs the same child-side code as the local pool (:mod:`node.job_process`) in a process
of its own (its own process group), so a timeout or a cancelled task kills the work whole, and a
killed worker takes its tries with it (the child watches the worker process as a local job watches
the node).  Model jobs run in long-lived processes kept per GPU between tasks: the backend's model
cache stays warm as in a local GPU slot.  The worker's GPUs are the ``GPU`` resource it was started
with; the ids come from ``DICOM_NODE_GPUS`` (default ``0..N-1``).  See docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from node.contracts import FailureKind, JobSpec, ProcessInfo, Resource, SlotInfo
from node.job_process import JobDone, JobFailed, SegReady, _job_process, _slot_process, process_started

__all__ = ["TryOutcome", "run_try", "dask_setup", "dask_teardown", "GPUS_ENV", "MODEL_DEVICE_ENV", "SEG_TOPIC",
           "QUIET_DASK_CONFIG", "quiet_dask_env"]

log = logging.getLogger("node.dask_worker")

#: the worker's GPU ids, comma-separated (default: 0..N-1 for ``--resources GPU=N``)
GPUS_ENV = "DICOM_NODE_GPUS"
#: ``models.device`` for the model jobs of this worker (default ``cuda`` on a GPU worker); ``cpu``
#: lets a worker stand in for a GPU one (tests, a CPU-only trial of the cluster)
MODEL_DEVICE_ENV = "DICOM_NODE_MODEL_DEVICE"
#: the Dask event topic on which a try says its SEG is ready before its meshes (the node subscribes,
#: so the SEG goes to the PACS while the meshes are made, as with the local pool)
SEG_TOPIC = "dicom-node-seg-ready"

#: Dask's diagnostic timers, slowed down, for the scheduler, the workers and the node's client: the
#: event loop's tick monitor (20 ms by default), the workers' statistical profiler (10 ms), their memory
#: monitor (100 ms) and the system monitor (500 ms) wake every process of the cluster dozens of times a
#: second.  They feed Dask's dashboard and its "event loop unresponsive" warnings, nothing the node
#: relies on, and the CPU they take is taken from the jobs on the same hosts (bench/README.md, cluster).
QUIET_DASK_CONFIG: dict[str, Any] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


def quiet_dask_env() -> dict[str, str]:
    """:data:`QUIET_DASK_CONFIG` as the environment variables Dask reads at start
    (``distributed.admin.tick.interval`` -> ``DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL``)."""
    return {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
            for key, value in QUIET_DASK_CONFIG.items()}


@dataclass(frozen=True)
class TryOutcome:
    """What the task returns to the node: the try's outcome and where it ran."""

    message: JobDone | JobFailed
    slot: SlotInfo
    seg_ready: SegReady | None = None  #: the SEG was handed on before the meshes (the node records it)


class _WorkerState:
    """Per worker process: its GPUs (which are free), idle long-lived model processes per key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gpus: list[int] | None = None
        self.free_gpus: list[int] = []
        self.idle: dict[str, list[tuple[BaseProcess, Connection]]] = {}
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["node.job_process", "node.pipeline.run"])

    def init_gpus(self, count: int) -> None:
        with self.lock:
            if self.gpus is not None:
                return
            env = os.environ.get(GPUS_ENV, "").strip()
            self.gpus = [int(g) for g in env.split(",") if g.strip()] if env else list(range(count))
            self.free_gpus = list(self.gpus)

    def take_gpu(self) -> int:
        with self.lock:
            if not self.free_gpus:  # the GPU resource is 1 per task: Dask never runs more than the worker has
                raise RuntimeError(f"no free GPU on this worker (GPUs {self.gpus})")
            return self.free_gpus.pop(0)

    def give_gpu(self, gpu: int) -> None:
        with self.lock:
            self.free_gpus.append(gpu)

    def take_process(self, key: str) -> tuple[BaseProcess, Connection] | None:
        with self.lock:
            procs = self.idle.get(key, [])
            while procs:
                proc, conn = procs.pop()
                if proc.is_alive():
                    return proc, conn
        return None

    def give_process(self, key: str, proc: BaseProcess, conn: Connection) -> None:
        with self.lock:
            self.idle.setdefault(key, []).append((proc, conn))

    def close(self) -> None:
        from node.executor import kill_tree

        with self.lock:
            procs = [p for lst in self.idle.values() for p in lst]
            self.idle.clear()
        for proc, conn in procs:
            try:
                conn.send(None)
            except OSError:  # it has ended
                pass
            proc.join(3)
            if proc.is_alive():
                kill_tree(proc)


_STATE = _WorkerState()


def _cancelled(worker: Any, key: str | None) -> bool:
    """Whether the scheduler no longer wants this task (the node cancelled it, or lost it), or the
    worker is closing (it lost its scheduler: the node runs the try again elsewhere)."""
    if key is None or worker is None:
        return False
    if "clos" in str(getattr(worker, "status", "")):
        return True
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _worker_gpu_count(worker: Any) -> int:
    res = getattr(worker.state, "total_resources", None) or getattr(worker, "total_resources", None) or {}
    return int(res.get("GPU", 0))


def run_try(spec: JobSpec, kind: str, persistent: bool, timeout_s: float, log_level: str = "INFO",
            log_phi: bool = False, nice: int = 0) -> TryOutcome:
    """The Dask task: run one try of ``spec`` in a child process of this worker, return its outcome.

    ``kind`` is the job's resource (``gpu``: the task holds one ``GPU`` resource, and the child
    sees only that GPU).  A timeout (``timeout_s`` from the child's start) or a cancelled task
    kills the child's process group; the outcome then says so (a cancelled task's result is
    dropped by Dask anyway).  ``nice``: node.yaml's ``job_nice`` (the child lowers its priority).
    """
    import psutil
    from distributed import get_worker
    from distributed.worker import thread_state

    from node.executor import kill_tree

    worker = get_worker()
    key = getattr(thread_state, "key", None)
    gpu_count = _worker_gpu_count(worker)
    _STATE.init_gpus(gpu_count)
    gpu = _STATE.take_gpu() if kind == Resource.GPU else None
    try:
        env: dict[str, str] = {}
        if gpu is not None:
            from node.pipeline.ai.common import GPU_SLOT_ENV

            env = {"CUDA_VISIBLE_DEVICES": str(gpu), GPU_SLOT_ENV: str(gpu)}
        elif gpu_count:
            env = {"CUDA_VISIBLE_DEVICES": ""}  # CPU work on a GPU worker keeps off the GPUs
        device: str = spec.models.device
        if gpu is not None:
            device = os.environ.get(MODEL_DEVICE_ENV) or "cuda"
        nthreads = max(1, int(getattr(worker.state, "nthreads", 1) or 1))
        spec = dataclasses.replace(spec, models=spec.models.model_copy(update={"device": device}),
                                   decode_workers=max(1, (os.cpu_count() or 1) // nthreads))
        me = psutil.Process(os.getpid())
        label = f"dask-gpu{gpu}" if gpu is not None else "dask-cpu"
        info = ProcessInfo(slot=label, env=env, log_level=log_level, node_pid=me.pid, node_started=process_started(me.pid),
                           log_phi=log_phi, nice=nice)
        pkey = f"gpu{gpu}" if gpu is not None else "cpu"
        conn: Connection
        proc: BaseProcess
        if persistent:
            got = _STATE.take_process(pkey)
            if got is None:
                parent, child = _STATE.ctx.Pipe(duplex=True)
                proc = _STATE.ctx.Process(target=_slot_process, args=(child, info), name=f"slot-{pkey}", daemon=False)
                proc.start()
                child.close()
                got = (proc, parent)
            proc, conn = got
            conn.send(spec)
        else:
            conn, child = _STATE.ctx.Pipe(duplex=False)
            proc = _STATE.ctx.Process(target=_job_process, args=(child, info, spec), name=f"job-{spec.job_id}",
                                      daemon=False)
            proc.start()
            child.close()
        slot = SlotInfo(name=label, kind=Resource(kind), gpu=gpu, pid=int(proc.pid or 0),
                        process="slot" if persistent else "job", device=device,
                        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"), host=socket.gethostname(),
                        worker=str(worker.address))
        started = time.monotonic()
        msg: JobDone | JobFailed | None = None
        seg: SegReady | None = None
        while msg is None:
            try:
                if conn.poll(0.2):
                    m = conn.recv()
                    if isinstance(m, SegReady):
                        seg = m
                        _announce_seg(worker, key, spec.job_id, m)
                        continue
                    msg = m
                    break
            except (EOFError, OSError):
                msg = JobFailed(FailureKind.TRANSIENT, f"job process died (exit code {proc.exitcode})")
                break
            if not proc.is_alive() and not conn.poll(0):
                proc.join(5)
                msg = JobFailed(FailureKind.TRANSIENT, f"job process died (exit code {proc.exitcode})")
                break
            if time.monotonic() - started > timeout_s:
                kill_tree(proc)
                msg = JobFailed(FailureKind.TRANSIENT, f"timeout: killed after {timeout_s:g} s (job_timeout_s)")
                log.warning("job %d: %s on %s", spec.job_id, msg.message, worker.address)
                break
            if _cancelled(worker, key):
                kill_tree(proc)
                msg = JobFailed(FailureKind.TRANSIENT, "cancelled by the node")
                log.info("job %d: cancelled, its process (pid %s) killed", spec.job_id, proc.pid)
                break
        alive = proc.is_alive()
        if persistent:
            if alive and not (isinstance(msg, JobFailed) and msg.kind == FailureKind.TRANSIENT):
                _STATE.give_process(pkey, proc, conn)  # warm for the next model job on this GPU
            elif alive:
                kill_tree(proc)
        else:
            proc.join(10)
            conn.close()
        return TryOutcome(msg, slot, seg)
    finally:
        if gpu is not None:
            _STATE.give_gpu(gpu)


def _announce_seg(worker: Any, key: str | None, job_id: int, seg: SegReady) -> None:
    """Tell the node now that the SEG is ready (a Dask event); it also comes with the outcome."""
    try:
        worker.log_event(SEG_TOPIC, {"key": key, "job_id": job_id, "seg_early": str(seg.seg_early),
                                     "seg_series_uid": seg.seg_series_uid})
    except Exception:  # the SEG then goes with the outcome
        log.debug("cannot announce the SEG of job %d", job_id, exc_info=True)


def dask_setup(worker: Any) -> None:
    """``--preload node.dask_worker``: import the pipeline and start the forkserver now, so the
    first job does not pay for it; say what the worker offers."""
    import node.pipeline.run  # noqa: F401 - imported for its cost, before the first task

    gpus = _worker_gpu_count(worker)
    _STATE.init_gpus(gpus)
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except Exception:
        log.debug("forkserver warm-up failed", exc_info=True)
    log.info("dicom-node worker ready at %s: %d GPU(s) %s, model device %s", worker.address, gpus, _STATE.gpus,
             os.environ.get(MODEL_DEVICE_ENV) or ("cuda" if gpus else "as node.yaml says"))


def dask_teardown(worker: Any) -> None:
    """End the idle long-lived model processes with the worker."""
    _STATE.close()
