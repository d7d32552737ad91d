"""``executor: {kind: dask}``: the worker pool's tries run on a Dask distributed cluster.

The node keeps claiming jobs from its store (:mod:`node.pool`); each try is one Dask task
(:func:`node.dask_worker.run_try`) submitted with ``resources={'GPU': 1}`` for model jobs, none for
the others, so Dask runs HU jobs on any worker and model jobs only on GPU workers, one per GPU.
The executor's slots mirror the cluster (its worker threads and GPUs, read from the scheduler
every few seconds), so the node claims no more than the cluster can start.  The outcome comes back
as the task's result and the node records it through :mod:`node.jobs`, as for a local try.

A try the cluster loses (scheduler restarted, connection lost) goes back to the queue without
counting a try; Dask itself re-runs a task whose worker died.  Either way a second run of a try
writes the same result folder and SEG identity, and the store records one completion
(docs/scaling.md, Idempotency).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.config import NodeConfig
from node.contracts import FailureKind, JobSpec, Resource, SlotInfo
from node.executor import Executor, Slot, TryHandle
from node.job_process import JobFailed, Message, SegReady

__all__ = ["DaskExecutor"]

log = logging.getLogger("node.dask_executor")

#: how often the executor reads the cluster's workers (slots) and where tasks run
_REFRESH_S = 2.0


def _host_of(address: str) -> str:
    """``tcp://10.0.0.5:40123`` -> ``10.0.0.5``."""
    try:
        return urlsplit(address).hostname or address
    except ValueError:
        return address


class _DaskTry(TryHandle):
    def __init__(self, executor: DaskExecutor, future: Any, slot_info: SlotInfo) -> None:
        self.executor = executor
        self.future = future
        self.slot_info = slot_info
        self._ended = False
        self._killed = False
        self._lost: str | None = None
        self._error: str | None = None
        self._reported: SlotInfo | None = None
        self._final: SlotInfo | None = None

    def poll(self) -> list[Message]:
        early: list[Message] = list(self.executor.seg_events(str(self.future.key)))
        if self._ended or not self.future.done():
            return early
        self._ended = True
        status = self.future.status
        if status == "finished":
            try:
                outcome = self.future.result(timeout=30)
            except Exception as exc:  # noqa: BLE001 - the result could not be fetched: the cluster lost it
                self._lost = f"the Dask cluster lost the try's result ({type(exc).__name__}: {exc})"
                return early
            self._final = outcome.slot
            out: list[Message] = early
            if outcome.seg_ready is not None:
                out.append(outcome.seg_ready)
            out.append(outcome.message)
            return out
        if status == "error":
            error = self.future.exception(timeout=30)
            name = type(error).__name__
            if name == "KilledWorker":  # Dask re-ran it on other workers; each of them died under it
                return [JobFailed(FailureKind.TRANSIENT, f"the Dask workers running it died ({error})")]
            return [JobFailed(FailureKind.TRANSIENT, f"Dask task failed: {name}: {error}")]
        # cancelled or lost without us asking: the scheduler went away or restarted
        self._lost = f"the Dask cluster lost the try (task {status}: scheduler restarted or connection lost)"
        return []

    def alive(self) -> bool:
        return not self._ended

    def kill(self) -> None:
        """Cancel the task: the worker sees it cancelled and kills the try's process group."""
        self._killed = True
        self._ended = True
        self.executor.seg_events(str(self.future.key))  # a SEG announced meanwhile is not wanted
        try:
            self.future.cancel()
        except Exception:
            log.debug("cancel failed", exc_info=True)

    def died(self) -> str:
        return self._error or "the Dask task ended without an outcome"

    def lost(self) -> str | None:
        return self._lost

    def place(self) -> SlotInfo | None:
        if self._final is not None:
            final, self._final = self._final, None
            return final
        where = self.executor.where(self.future.key)
        if where is None or (self._reported is not None and self._reported.worker == where):
            return None
        import dataclasses

        self._reported = dataclasses.replace(self.slot_info, worker=where, host=_host_of(where))
        return self._reported


class DaskExecutor(Executor):
    """Slots mirroring a Dask cluster; tries submitted as tasks (see the module docstring)."""

    partitioned = True  # model jobs only ever go to GPU slots (GPU workers), HU jobs to the others

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        assert config.executor.scheduler is not None
        self.address: str = config.executor.scheduler
        # the worker enforces job_timeout_s from the try's start and reports it; the node's own
        # deadline (counted from the submission) is the safety net for a worker that hangs
        self.timeout_grace_s = max(30.0, 0.25 * float(config.job_timeout_s))
        self._client: Any = None
        self._lock = threading.Lock()
        self._slots: list[Slot] = []
        self._slots_at = 0.0
        self._processing: dict[str, str] = {}  # task key -> worker address
        self._processing_at = 0.0
        self._connecting = False
        self._segs: dict[str, list[SegReady]] = {}  # task key -> SEGs announced by its try (SEG_TOPIC)

    def describe(self) -> str:
        return f"Dask cluster at {self.address}"

    # -- connection
    def start(self) -> None:
        self._connect_in_background()

    def _connect_in_background(self) -> None:
        with self._lock:
            if self._connecting:
                return
            self._connecting = True
        threading.Thread(target=self._connect, name="dask-connect", daemon=True).start()

    def _connect(self) -> None:
        import dask
        from distributed import Client

        from node.dask_worker import QUIET_DASK_CONFIG

        dask.config.set(QUIET_DASK_CONFIG)  # the node's own Dask client (this process uses Dask for nothing else)
        try:
            while True:
                try:
                    client = Client(self.address, timeout=self.config.executor.connect_timeout_s,
                                    set_as_default=False, name=f"dicom-node-{uuid.uuid4().hex[:8]}")
                    break
                except Exception as exc:  # noqa: BLE001 - the scheduler is not up yet: the node keeps receiving
                    log.warning("Dask scheduler %s not reachable (%s); trying again", self.address, exc)
                    time.sleep(2)
            from node.dask_worker import SEG_TOPIC

            client.subscribe_topic(SEG_TOPIC, self._on_seg_event)
            self._client = client
            self._slots_at = 0.0
            log.info("connected to the Dask scheduler %s", self.address)
        finally:
            self._connecting = False

    def _usable_client(self) -> Any:
        client = self._client
        if client is None:
            return None
        status = getattr(client, "status", "")
        if status == "running":
            return client
        if status in ("closed", "closing", "failed"):  # gave up reconnecting: a fresh client
            self._client = None
            try:
                client.close(timeout=5)
            except Exception:  # noqa: BLE001 - it is closed already
                pass
            self._connect_in_background()
        return None

    # -- capacity
    def slots(self) -> list[Slot]:
        client = self._usable_client()
        if client is None:
            return []
        if time.monotonic() - self._slots_at < _REFRESH_S:
            return self._slots
        self._slots_at = time.monotonic()
        try:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
        except Exception as exc:  # noqa: BLE001 - the scheduler went away: no slots until it is back
            log.warning("cannot read the Dask cluster's workers: %s", exc)
            self._slots = []
            return []
        gpus = sum(int((w.get("resources") or {}).get("GPU", 0)) for w in workers.values())
        threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        cpu = max(0, threads - gpus) if workers else 0
        if workers and cpu == 0:
            cpu = 1
        names = [f"dask-cpu{i}" for i in range(cpu)] + [f"dask-gpu{i}" for i in range(gpus)]
        old = {s.name: s for s in self._slots}
        self._slots = [old.get(n) or Slot(i, Resource.GPU if n.startswith("dask-gpu") else Resource.CPU, None,
                                          label=n) for i, n in enumerate(names)]
        return self._slots

    def _on_seg_event(self, event: Any) -> None:
        """A try announced its SEG (on the client's event loop): kept for its handle's next poll."""
        try:
            _, msg = event
            seg = SegReady(Path(str(msg["seg_early"])), str(msg["seg_series_uid"]))
            with self._lock:
                self._segs.setdefault(str(msg["key"]), []).append(seg)
        except Exception:  # a malformed event: the SEG comes with the outcome
            log.debug("ignored SEG event %r", event, exc_info=True)
            return
        if self.waker is not None:
            self.waker()  # the SEG goes on now, not at the pool's next round

    def seg_events(self, key: str) -> list[SegReady]:
        with self._lock:
            return self._segs.pop(key, [])

    def where(self, key: str) -> str | None:
        """The worker address a task is processing on (None: not started or not known)."""
        client = self._usable_client()
        if client is None:
            return None
        if time.monotonic() - self._processing_at >= 1.0:
            self._processing_at = time.monotonic()
            try:
                processing = client.processing()
            except Exception:  # noqa: BLE001 - the scheduler went away: known on its return
                return None
            self._processing = {str(k): w for w, keys in processing.items() for k in keys}
        return self._processing.get(key)

    # -- tries
    def start_try(self, slot: Slot, spec: JobSpec, *, persistent: bool, timeout_s: float) -> TryHandle:
        from node.dask_worker import run_try

        client = self._usable_client()
        if client is None:
            raise RuntimeError(f"not connected to the Dask scheduler {self.address}")
        key = f"dicom-node-job-{spec.job_id}-{uuid.uuid4().hex[:12]}"
        resources = {"GPU": 1} if slot.kind == Resource.GPU else None
        future = client.submit(run_try, spec, str(slot.kind), persistent, timeout_s, self.config.log_level,
                               self.config.log_phi, self.config.job_nice, key=key, pure=False, resources=resources,
                               retries=0)
        waker = self.waker
        if waker is not None:  # the outcome is taken at once, not at the pool's next round
            future.add_done_callback(lambda _f: waker())
        info = SlotInfo(name=slot.name, kind=slot.kind, gpu=None, pid=0, process="slot" if persistent else "job",
                        device=spec.models.device, cuda_visible_devices=None, host=None, worker=None)
        return _DaskTry(self, future, info)

    def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close(timeout=10)
            except Exception:
                log.debug("closing the Dask client failed", exc_info=True)
