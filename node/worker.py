"""The worker pool: runs jobs, each in its own process, with a timeout that really stops it.

Shape::

    main process (receiver, scheduler)          forkserver (pipeline modules preloaded)
      WorkerPool supervisor thread                 |
        claim_job() while a slot is free  ------>  job process (one per job, own session)
        poll result pipe / exit / deadline             run_pipeline(...) -> results/.<id>.tmp-*/
        record: complete_job + dispatch rows           rename -> storage/results/<job id>/
                or fail_job (retry / no retry)         send ("ok", paths) on a pipe

* ``config.workers`` slots; each job runs in a separate process (multiprocessing
  ``forkserver`` with the pipeline preloaded, so a job starts in milliseconds and
  the receiver in the main process stays responsive while it runs).
* Timeout: after ``config.job_timeout_s`` the supervisor SIGKILLs the job
  process and its whole process group (the job process starts its own session,
  so decoder pools it spawned die with it), then records a transient failure.
* A job process kills itself (and its process group) within half a second when
  the node process is gone (:func:`_watch_node`), so a node killed with SIGKILL
  leaves no job running; the restarted node re-queues the job (``Store.requeue_running_jobs``)
  and runs it again with the same SEG SeriesInstanceUID (:func:`seg_series_uid`)
  into the same result folder: the job completes once, one SEG identity.
* Failures: :class:`~node.errors.InputError` (bad series, profile) and
  :class:`~node.errors.BackendUnavailable` -> ``failed`` at once with the reason;
  anything else (exception, crash of the job process, timeout) -> retried with
  exponential backoff (``config.job_retry``) until ``max_attempts``, then
  ``failed``.
* Success: ``complete_job`` with the result paths, older results of the same
  series and rule are marked ``superseded`` (unless the rule has
  ``supersede: false``), and one dispatch row per destination of the rule
  (kind ``dicom``; ``origin`` is resolved through ``config.origin_destination``
  of the calling AE and recorded in the job result under ``origin``; an
  unresolvable one is recorded as a failed dispatch with the reason) plus
  ``share``/``share`` when the rule has ``share: true``.  The dispatcher
  (:mod:`node.dispatcher`) consumes them.

Job states: queued -> running -> done | failed (| queued again for a retry),
superseded.  The series follows: routed -> processing -> done | failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.store import Job, Store

__all__ = [
    "WorkerPool",
    "seg_series_uid",
    "job_output_dir",
    "record_success",
    "record_failure",
    "ensure_dispatches",
    "retry_job",
    "settle_series",
]

log = logging.getLogger("node.worker")

#: what the job process reports: ("ok", result) | ("error", kind, message); kind: input|backend|transient
_INPUT, _BACKEND, _TRANSIENT = "input", "backend", "transient"


def seg_series_uid(job: Job) -> str:
    """The SEG SeriesInstanceUID of a job: derived from (series, rule, rules version, generation).

    A re-run after a crash or a retry produces the same SEG identity; a new
    generation (late instances) or a new rule file version gets a new one.
    """
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[job.series_uid, job.rule, job.rules_version, str(job.generation)]))


def job_output_dir(config: Any, job_id: int) -> Path:
    """``<storage>/results/<job id>/``."""
    return Path(config.storage) / "results" / str(int(job_id))


# ---------------------------------------------------------------------------------- job process


def _watch_node(node_pid: int, node_started: float, interval_s: float = 0.5) -> None:
    """Kill this job's process group as soon as the node process is gone (a daemon thread).

    The parent of a job process is the forkserver, which outlives a node killed
    with SIGKILL while any job process is alive (each holds its liveness pipe), so
    ``PR_SET_PDEATHSIG`` cannot be used; the job watches the node itself (pid and
    start time, so a recycled pid is not mistaken for the node).
    """
    import psutil

    def alive() -> bool:
        try:
            return abs(psutil.Process(node_pid).create_time() - node_started) < 1e-3
        except psutil.Error:
            return False

    def loop() -> None:
        while alive():
            time.sleep(interval_s)
        try:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        finally:
            os._exit(1)

    threading.Thread(target=loop, name="node-watch", daemon=True).start()


def _configure_models(models: dict[str, Any]) -> None:
    """Apply node.yaml's ``models`` section in the job process (AI backends read it)."""
    from node.pipeline import ai_common

    ai_common.configure(models_root=models.get("root"), device=models.get("device"), threads=models.get("threads"))
    if models.get("totalseg_weights"):
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(models["totalseg_weights"])
    if models.get("totalseg_home"):
        os.environ["TOTALSEG_HOME_DIR"] = str(models["totalseg_home"])


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline for one job (in the job process)."""
    from node.errors import InputError
    from node.pipeline.run import run_pipeline
    from node.profiles import load_profile

    paths = [Path(p) for p in spec["paths"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} spool file(s) of the series are missing (retention cleanup?)",
                         path=missing[0])
    profile = load_profile(spec["profile"], spec["profiles_dir"])
    _configure_models(spec.get("models") or {})
    final = Path(spec["output_dir"])
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed earlier try
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    res = run_pipeline(
        [str(p) for p in paths],
        profile,
        tmp,
        backend=spec.get("backend"),
        series_uid=spec["series_uid"],
        seg_series_uid=spec["seg_series_uid"],
        decode_workers=spec.get("decode_workers"),
    )
    # publish the folder whole: results/<id>/ only ever holds a finished run
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {
        "output_dir": str(final),
        "seg": str(final / res.seg_path.name) if res.seg_path else None,
        "meshes": [str(final / p.name) for p in res.mesh_paths],
        "report": str(final / "report.json"),
        "seg_series_uid": res.report.get("outputs", {}).get("seg_series_instance_uid"),
        "timings_s": res.report.get("timings_s", {}),
    }


def _job_process(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a job process (module level: started by forkserver)."""
    try:
        os.setsid()  # own process group: the supervisor kills the whole group on timeout
    except OSError:
        pass
    _watch_node(spec["node_pid"], spec["node_started"])
    logging.basicConfig(level=spec.get("log_level", "INFO"),
                        format=f"%(asctime)s %(levelname)s %(name)s [job {spec['job_id']}]: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    from node.errors import BackendUnavailable, InputError

    try:
        msg: tuple[Any, ...] = ("ok", _run_spec(spec))
    except InputError as exc:
        msg = ("error", _INPUT, str(exc))
    except BackendUnavailable as exc:
        msg = ("error", _BACKEND, str(exc))
    except BaseException as exc:  # noqa: BLE001 - everything else may be transient
        tb = traceback.format_exc(limit=4).strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        msg = ("error", _TRANSIENT, f"{type(exc).__name__}: {exc} ({where})")
    try:
        conn.send(msg)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------- recording


def _job_state_update(store: Store, sql: str, args: tuple[Any, ...]) -> int:
    return store.conn.execute(sql, args).rowcount


def settle_series(store: Store, series_uid: str, generation: int) -> str | None:
    """Move the series to done/failed once every job of ``generation`` has finished."""
    jobs = [j for j in store.list_jobs(series_uid=series_uid)
            if j.generation == generation and j.state != "superseded"]
    if not jobs or any(j.state in ("queued", "running") for j in jobs):
        return None
    failed = [j for j in jobs if j.state == "failed"]
    if failed:
        err = "; ".join(f"job {j.id} ({j.rule}): {j.error}" for j in failed)[:2000]
        ok = store.set_series_state(series_uid, "failed", from_states=("routed", "processing", "done", "failed"),
                                    generation=generation, error=err)
        return "failed" if ok else None
    ok = store.set_series_state(series_uid, "done", from_states=("routed", "processing", "done", "failed"),
                                generation=generation)
    return "done" if ok else None


def _dispatch_plan(config: Any, store: Store, job: Job) -> tuple[list[tuple[str, str, str | None]], dict | None]:
    """[(destination, kind, error-or-None)] for a job, and the resolved origin address."""
    from node.routing.rules import ORIGIN

    plan: list[tuple[str, str, str | None]] = []
    origin: dict | None = None
    for name in job.params.get("destinations", []) or []:
        if name == ORIGIN:
            calling = job.params.get("calling_ae")
            if not calling:
                s = store.get_series(job.series_uid)
                calling = s.calling_ae if s else None
            dest = config.origin_destination(calling) if calling else None
            if dest is None:
                plan.append((ORIGIN, "dicom", f"origin: calling AE {calling!r} has no address in known_aes"))
            else:
                origin = {"calling_ae": calling, "ae_title": dest.ae_title, "host": dest.host, "port": dest.port}
                plan.append((ORIGIN, "dicom", None))
        elif name in config.destinations:
            plan.append((name, "dicom", None))
        else:
            plan.append((name, "dicom", f"unknown destination {name!r} (not in node.yaml)"))
    if job.params.get("share"):
        plan.append(("share", "share", None))
    return plan, origin


def _add_dispatches(config: Any, store: Store, job: Job) -> int:
    plan, _ = _dispatch_plan(config, store, job)
    n = 0
    for name, kind, error in plan:
        did, created = store.add_dispatch(job.id, name, kind)
        if created:
            n += 1
            if error:
                store.mark_dispatch_failed(did, error)
                log.error("job %d: dispatch to %s cannot be made: %s", job.id, name, error)
    return n


def record_success(config: Any, store: Store, job: Job, result: dict[str, Any]) -> str:
    """running -> done, supersede older results, add dispatch rows, settle the series.

    Returns the job's final state (``done``, ``superseded``, or ``lost`` when the
    job was no longer running, e.g. re-queued meanwhile).
    """
    _, origin = _dispatch_plan(config, store, job)
    if origin is not None:
        result = dict(result, origin=origin)
    if not store.complete_job(job.id, result, seg_series_uid=result.get("seg_series_uid")):
        log.warning("job %d finished but was no longer running; result ignored", job.id)
        return "lost"
    state = "done"
    if job.params.get("supersede", True):
        with store.transaction() as c:
            newer = c.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND rule = ? AND generation > ? AND state = 'done'",
                (job.series_uid, job.rule, job.generation),
            ).fetchone()
            if newer is not None:
                c.execute("UPDATE jobs SET state = 'superseded', error = ? WHERE id = ?",
                          (f"superseded by job {newer[0]} (newer generation)", job.id))
                state = "superseded"
            else:
                c.execute(
                    "UPDATE jobs SET state = 'superseded', error = ? WHERE series_uid = ? AND rule = ?"
                    " AND generation < ? AND state = 'done'",
                    (f"superseded by job {job.id} (generation {job.generation})", job.series_uid, job.rule,
                     job.generation),
                )
    if state == "done":
        n = _add_dispatches(config, store, job)
        log.info("job %d done (series %s, rule %s, SEG %s): %d dispatch(es) queued", job.id, job.series_uid,
                 job.rule, result.get("seg_series_uid"), n)
    else:
        log.info("job %d finished but a newer generation's result exists: superseded", job.id)
    settle_series(store, job.series_uid, job.generation)
    return state


def record_failure(config: Any, store: Store, job: Job, kind: str, message: str) -> str | None:
    """Record a failed try: retry with backoff for transient errors, else failed at once."""
    if kind == _TRANSIENT:
        delay = config.job_retry.delay(job.attempts)
        state = store.fail_job(job.id, message, retry_at=time.time() + delay)
        if state == "queued":
            log.warning("job %d attempt %d/%d failed (%s); retry in %.0f s", job.id, job.attempts,
                        job.max_attempts, message, delay)
        else:
            log.error("job %d failed after %d attempt(s): %s", job.id, job.attempts, message)
    else:
        label = "bad input" if kind == _INPUT else "backend unavailable"
        state = store.fail_job(job.id, f"{label}: {message}")
        log.error("job %d failed (%s, not retried): %s", job.id, label, message)
    settle_series(store, job.series_uid, job.generation)
    return state


def ensure_dispatches(config: Any, store: Store) -> int:
    """Add the dispatch rows of done jobs that have none (a crash between completion and dispatch)."""
    n = 0
    have = {d.job_id for d in store.list_dispatches()}
    for job in store.list_jobs("done"):
        if job.id not in have:
            n += _add_dispatches(config, store, job)
    if n:
        log.info("added %d missing dispatch row(s) for finished jobs", n)
    return n


def retry_job(store: Store, job_id: int) -> str:
    """Operator retry: a failed job goes back to queued with fresh attempts; for a done job its failed
    dispatches go back to pending.  Returns what was done (one line)."""
    with store.transaction() as c:
        row = c.execute("SELECT state, series_uid, generation FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return f"no job {job_id}"
        if row["state"] == "failed":
            c.execute("UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = NULL, error = NULL,"
                      " finished_at = NULL WHERE id = ?", (job_id,))
            c.execute("UPDATE series SET state = 'routed', error = NULL, state_changed_at = ? WHERE series_uid = ?"
                      " AND generation = ? AND state = 'failed'", (time.time(), row["series_uid"], row["generation"]))
            return f"job {job_id} re-queued"
        if row["state"] == "done":
            n = c.execute("UPDATE dispatches SET state = 'pending', next_attempt_at = NULL, attempts = 0"
                          " WHERE job_id = ? AND state = 'failed'", (job_id,)).rowcount
            return f"job {job_id} is done; {n} failed dispatch(es) re-queued"
        return f"job {job_id} is {row['state']}: nothing to retry"


def _give_back(store: Store, job_id: int, why: str) -> bool:
    """running -> queued without counting the try (clean shutdown)."""
    return _job_state_update(
        store,
        "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), next_attempt_at = NULL, error = ?"
        " WHERE id = ? AND state = 'running'",
        (why, job_id),
    ) == 1


# ---------------------------------------------------------------------------------- the pool


@dataclass
class _Running:
    job: Job
    proc: Any
    conn: Any
    deadline: float
    started: float = field(default_factory=time.monotonic)


def _kill_tree(proc: Any) -> None:
    """SIGKILL a job process, its process group and every descendant."""
    pid = proc.pid
    victims = []
    try:
        import psutil

        victims = psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001
        pass
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for v in victims:
        try:
            v.kill()
        except Exception:  # noqa: BLE001
            pass
    try:
        proc.kill()
    except Exception:  # noqa: BLE001
        pass
    proc.join(10)


class WorkerPool:
    """``config.workers`` job slots served by one supervisor thread (see module docstring).

    Args:
        config: :class:`node.config.NodeConfig`.
        store: the job store (used from the supervisor thread).
        poll_s: how often the supervisor looks for due jobs when not woken.
    """

    def __init__(self, config: Any, store: Store, *, poll_s: float = 0.5) -> None:
        self.config = config
        self.store = store
        self.size = max(1, int(config.workers))
        self.poll_s = poll_s
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["node.worker", "node.pipeline.run"])
        self._running: dict[int, _Running] = {}  # slot -> running job
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self.decode_workers = max(1, (os.cpu_count() or 1) // self.size)
        import psutil

        self._node_started = psutil.Process(os.getpid()).create_time()

    # -- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="worker-pool", daemon=True)
        self._thread.start()
        log.info("worker pool: %d slot(s), job timeout %.0f s", self.size, self.config.job_timeout_s)

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

    # -- supervisor
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._fill()
            except Exception:  # noqa: BLE001 - the supervisor must survive (e.g. database busy)
                log.exception("worker pool supervisor error")
            self._wake.wait(0.2 if self._running else self.poll_s)
            self._wake.clear()
        self._shutdown()

    def _shutdown(self, grace_s: float = 5.0) -> None:
        end = time.monotonic() + grace_s
        while self._running and time.monotonic() < end:
            self._reap()
            time.sleep(0.1)
        for slot, r in list(self._running.items()):
            _kill_tree(r.proc)
            if _give_back(self.store, r.job.id, "interrupted (node shut down)"):
                log.warning("job %d interrupted by shutdown: re-queued", r.job.id)
            self._running.pop(slot, None)

    def _fill(self) -> None:
        for slot in range(self.size):
            if slot in self._running or self._stop.is_set():
                continue
            job = self.store.claim_job(worker=f"{self._name}:{slot}")
            if job is None:
                return
            self._start_job(slot, job)

    def _start_job(self, slot: int, job: Job) -> None:
        store = self.store
        try:
            store.set_series_state(job.series_uid, "processing", from_states=("routed", "processing"),
                                   generation=job.generation)
            spec = {
                "job_id": job.id,
                "series_uid": job.series_uid,
                "paths": [i.path for i in store.series_instances(job.series_uid)],
                "profile": job.profile,
                "profiles_dir": str(self.config.profiles),
                "backend": job.params.get("backend_override") or None,
                "output_dir": str(job_output_dir(self.config, job.id)),
                "seg_series_uid": seg_series_uid(job),
                "decode_workers": self.decode_workers,
                "models": self.config.models.model_dump(mode="json"),
                "log_level": self.config.log_level,
                "node_pid": os.getpid(),
                "node_started": self._node_started,
            }
            parent, child = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_job_process, args=(child, spec), name=f"job-{job.id}", daemon=False)
            proc.start()
            child.close()
        except Exception as exc:  # noqa: BLE001
            log.exception("job %d: cannot start its process", job.id)
            record_failure(self.config, store, job, _TRANSIENT, f"cannot start job process: {exc}")
            return
        log.info("job %d started (attempt %d/%d, series %s, rule %s, profile %s, pid %d)", job.id, job.attempts,
                 job.max_attempts, job.series_uid, job.rule, job.profile, proc.pid)
        self._running[slot] = _Running(job, proc, parent, time.monotonic() + float(self.config.job_timeout_s))

    def _reap(self) -> None:
        for slot, r in list(self._running.items()):
            msg = None
            try:
                if r.conn.poll():
                    msg = r.conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None and r.proc.is_alive():
                if time.monotonic() < r.deadline:
                    continue
                _kill_tree(r.proc)
                r.conn.close()
                self._running.pop(slot, None)
                record_failure(self.config, self.store, r.job, _TRANSIENT,
                               f"timeout: killed after {self.config.job_timeout_s:g} s (job_timeout_s)")
                continue
            r.proc.join(10)
            r.conn.close()
            self._running.pop(slot, None)
            if msg is None:
                record_failure(self.config, self.store, r.job, _TRANSIENT,
                               f"job process died (exit code {r.proc.exitcode})")
            elif msg[0] == "ok":
                record_success(self.config, self.store, r.job, msg[1])
            else:
                record_failure(self.config, self.store, r.job, msg[1], msg[2])
            self._wake.set()
