"""Where a job's try runs: the executor interface the worker pool (:mod:`node.pool`) drives, and its
local implementation (processes on this host, one slot each).

The pool claims due jobs from the store for the executor's free slots, starts each try with
:meth:`Executor.start_try`, polls the :class:`TryHandle` for the child's messages
(:mod:`node.job_process`), kills it on timeout or when its work became useless, and hands the outcome
to :mod:`node.jobs`.  :class:`LocalExecutor` runs tries in processes of this host (CPU and GPU slots);
:class:`node.dask_executor.DaskExecutor` submits them to a Dask distributed cluster.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Callable

from node.config import NodeConfig
from node.contracts import JobSpec, ProcessInfo, Resource, SlotInfo
from node.job_process import Message, _job_process, _slot_process, process_started
from node.pipeline.ai.common import GPU_SLOT_ENV

__all__ = ["Slot", "TryHandle", "Executor", "LocalExecutor", "kill_tree"]

log = logging.getLogger("node.executor")


@dataclass
class Slot:
    """One place a try can run: ``cpu<N>`` or ``gpu<id>`` (local), or a share of the Dask cluster.

    ``env``: what the try's process gets (``CUDA_VISIBLE_DEVICES``); ``proc``/``conn``: a local
    slot's long-lived process for model jobs (None until the first one, and after it ended).
    """

    index: int
    kind: Resource
    gpu: int | None
    env: dict[str, str] = field(default_factory=dict)
    proc: BaseProcess | None = None
    conn: Connection | None = None
    label: str | None = None  #: the name when it is not ``cpu<N>``/``gpu<id>``

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return f"gpu{self.gpu}" if self.kind == Resource.GPU else f"cpu{self.index}"


class TryHandle(ABC):
    """One running try, as the pool sees it."""

    #: where it runs, recorded in ``params.slot`` when it starts (:meth:`place` may refine it)
    slot_info: SlotInfo

    @abstractmethod
    def poll(self) -> list[Message]:
        """The messages the try sent since the last call (``SegReady``, then ``JobDone``/``JobFailed``).
        Never blocks."""

    @abstractmethod
    def alive(self) -> bool:
        """Whether the try may still send its outcome (False: it ended without one)."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the try now and make whatever runs it drop the work."""

    @abstractmethod
    def died(self) -> str:
        """Why the try ended without an outcome (one line, recorded as a transient failure)."""

    def place(self) -> SlotInfo | None:
        """Where the try runs, when that became known or changed since the last call (else None)."""
        return None

    def finish(self) -> None:
        """The outcome was received: release what the handle holds."""
        return None

    def lost(self) -> str | None:
        """Why the executor lost the try through no fault of the job (the pool queues it again without
        counting a try), else None."""
        return None


class Executor(ABC):
    """Runs tries of jobs; the pool decides which job runs when (claims, timeouts, early-start rules)."""

    #: whether each slot only claims jobs of its own kind (else every slot takes every job)
    partitioned: bool = False
    #: seconds the pool adds to ``job_timeout_s`` before it kills a try itself (a remote executor
    #: enforces the timeout where the try runs and reports it; this is the safety net)
    timeout_grace_s: float = 0.0
    #: called (from any thread) as soon as a try has news, a message or its end: the pool looks at
    #: once instead of at its next round (set by the pool, :meth:`set_waker`)
    waker: Callable[[], None] | None = None

    def set_waker(self, waker: Callable[[], None]) -> None:
        self.waker = waker

    @abstractmethod
    def slots(self) -> list[Slot]:
        """The slots now (a remote cluster's may change as workers come and go)."""

    @abstractmethod
    def start_try(self, slot: Slot, spec: JobSpec, *, persistent: bool, timeout_s: float) -> TryHandle:
        """Start one try of ``spec`` in ``slot``; ``persistent``: a model job (warm model cache)."""

    def start(self) -> None:
        """Get ready (called when the pool starts)."""
        return None

    def forget(self, slot: Slot) -> None:
        """The try in ``slot`` was killed or died: drop what the slot keeps for the next one."""
        return None

    def shutdown(self) -> None:
        """Release everything (idle long-lived processes, connections)."""
        return None

    def describe(self) -> str:
        return type(self).__name__


def kill_tree(proc: BaseProcess) -> None:
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


class _LocalTry(TryHandle):
    def __init__(self, executor: LocalExecutor, slot: Slot, proc: BaseProcess, conn: Connection, persistent: bool,
                 slot_info: SlotInfo) -> None:
        self.executor, self.slot, self.proc, self.conn = executor, slot, proc, conn
        self.persistent = persistent
        self.slot_info = slot_info
        self._eof = False
        self._over = threading.Event()  # the pool is done with this try
        self._taken = threading.Event()  # the pool's poll() ran since the watch last woke it
        if executor.waker is not None:
            threading.Thread(target=self._watch, args=(executor.waker,), name=f"watch-{slot.name}",
                             daemon=True).start()

    def _watch(self, waker: Callable[[], None]) -> None:
        """Wake the pool as soon as the try sends a message (the SEG, the outcome) or its process
        ends, instead of at the pool's next round: the SEG goes on and the slot takes its next job
        that much sooner."""
        from multiprocessing.connection import wait

        while not self._over.is_set():
            try:
                ready = wait([self.conn, self.proc.sentinel], timeout=1.0)
            except (OSError, ValueError):  # the pool closed the pipe meanwhile
                return
            if ready and not self._over.is_set():
                self._taken.clear()
                waker()
                # until the pool has taken the news (else this loop would spin on a pipe still readable)
                self._taken.wait(1.0)

    def poll(self) -> list[Message]:
        out: list[Message] = []
        try:
            while not self._eof and self.conn.poll():
                out.append(self.conn.recv())
        except (EOFError, OSError):
            self._eof = True
        self._taken.set()
        return out

    def alive(self) -> bool:
        return not self._eof and self.proc.is_alive()

    def kill(self) -> None:
        self._over.set()
        kill_tree(self.proc)
        if self.persistent:
            self.executor.forget(self.slot)  # a fresh one for the next model job
        else:
            self._close()

    def died(self) -> str:
        self._over.set()
        self.proc.join(10)
        if self.persistent:
            self.executor.forget(self.slot)
        else:
            self._close()
        return f"job process died (exit code {self.proc.exitcode})"

    def finish(self) -> None:
        self._over.set()
        if not self.persistent:
            self.proc.join(10)
            self._close()

    def _close(self) -> None:
        try:
            self.conn.close()
        except OSError:  # a broken pipe: nothing is left to release
            pass


class LocalExecutor(Executor):
    """CPU slots (``config.workers``) and GPU slots (``config.gpus``) on this host.

    A GPU slot's processes get ``CUDA_VISIBLE_DEVICES=<its gpu>`` and ``models.device: cuda``; when
    GPUs are configured, CPU slot processes get ``CUDA_VISIBLE_DEVICES=""``.  Model jobs run in the
    slot's long-lived process (:func:`node.job_process._slot_process`, warm model cache), other jobs
    in a process of their own; each runs in its own process group, which a kill ends whole.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.size = max(1, int(config.workers))
        self.gpus = [int(g) for g in config.gpus]
        self.partitioned = bool(self.gpus)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["node.job_process", "node.pipeline.run"])
        cpu_env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""} if self.gpus else {}
        self._slots: list[Slot] = [Slot(i, Resource.CPU, None, dict(cpu_env)) for i in range(self.size)]
        self._slots += [Slot(self.size + n, Resource.GPU, g, {"CUDA_VISIBLE_DEVICES": str(g), GPU_SLOT_ENV: str(g)})
                        for n, g in enumerate(self.gpus)]
        self._node_started: float = process_started(os.getpid())

    def describe(self) -> str:
        return (f"local: {self.size} CPU slot(s), {len(self.gpus)} GPU slot(s)"
                + (f" (GPUs {', '.join(map(str, self.gpus))})" if self.gpus else ""))

    def slots(self) -> list[Slot]:
        return self._slots

    def start(self) -> None:
        # the forkserver (and its preload of the pipeline modules, see bench/README.md) starts now
        # rather than when the first job arrives; in the background, so the node is listening meanwhile
        import threading

        threading.Thread(target=self._warm_forkserver, name="forkserver-warm-up", daemon=True).start()
        if self.gpus and str(self.config.models.device) == "cpu":
            log.warning("gpus are configured but models.device is cpu: model jobs use the CPU slots")

    @staticmethod
    def _warm_forkserver() -> None:
        from multiprocessing import forkserver

        try:
            forkserver.ensure_running()
        except Exception:
            log.debug("forkserver warm-up failed", exc_info=True)

    def _process_info(self, slot: Slot) -> ProcessInfo:
        return ProcessInfo(slot=slot.name, env=dict(slot.env), log_level=self.config.log_level,
                           node_pid=os.getpid(), node_started=self._node_started, log_phi=self.config.log_phi,
                           nice=self.config.job_nice)

    def forget(self, slot: Slot) -> None:
        if slot.conn is not None:
            try:
                slot.conn.close()
            except OSError:  # a broken pipe: nothing is left to release
                pass
        if slot.proc is not None and not slot.proc.is_alive():
            slot.proc.join(1)
        slot.proc = slot.conn = None

    def _slot_process_for(self, slot: Slot) -> tuple[BaseProcess, Connection]:
        """The slot's long-lived process (started when missing or ended)."""
        if slot.proc is not None and not slot.proc.is_alive():
            log.info("slot %s: its process (pid %s) ended (exit code %s)", slot.name, slot.proc.pid,
                     slot.proc.exitcode)
            self.forget(slot)
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

    def start_try(self, slot: Slot, spec: JobSpec, *, persistent: bool, timeout_s: float) -> TryHandle:
        if slot.kind == Resource.GPU:
            spec = _with_device(spec, "cuda")
        conn: Connection
        try:
            if persistent:
                proc, conn = self._slot_process_for(slot)
                conn.send(spec)
            else:
                conn, child = self._ctx.Pipe(duplex=False)
                proc = self._ctx.Process(target=_job_process, args=(child, self._process_info(slot), spec),
                                         name=f"job-{spec.job_id}", daemon=False)
                proc.start()
                child.close()
        except BaseException:
            if persistent and slot.proc is not None:
                kill_tree(slot.proc)
                self.forget(slot)
            raise
        assert proc.pid is not None
        info = SlotInfo(name=slot.name, kind=slot.kind, gpu=slot.gpu, pid=proc.pid,
                        process="slot" if persistent else "job", device=spec.models.device,
                        cuda_visible_devices=slot.env.get("CUDA_VISIBLE_DEVICES"))
        return _LocalTry(self, slot, proc, conn, persistent, info)

    def shutdown(self) -> None:
        for slot in self._slots:  # idle long-lived slot processes: ask them to end, then make sure
            if slot.proc is not None:
                try:
                    if slot.conn is not None:
                        slot.conn.send(None)
                except OSError:  # the process has ended: the join and kill below see to it
                    pass
                slot.proc.join(5)
                if slot.proc.is_alive():
                    kill_tree(slot.proc)
                self.forget(slot)


def _with_device(spec: JobSpec, device: str) -> JobSpec:
    """``spec`` with ``models.device`` set (a GPU slot runs its model jobs on ``cuda``)."""
    import dataclasses

    return dataclasses.replace(spec, models=spec.models.model_copy(update={"device": device}))
