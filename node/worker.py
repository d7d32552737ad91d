"""The worker pool: runs jobs in separate processes (CPU and GPU slots), with a timeout that really stops them.

Shape::

    main process (receiver, scheduler)          forkserver (pipeline modules preloaded)
      WorkerPool supervisor thread                 |
        claim_job(kinds) while a slot is free -->  HU job: job process (one per job, own session)
                                                   model job: the slot's long-lived process
                                                     (own session, runs job specs from a pipe)
        poll result pipe / exit / deadline             run_pipeline(...) -> results/.<id>.tmp-*/
        record: complete_job + dispatch rows           rename -> storage/results/<job id>/
                or fail_job (retry / no retry)         send ("ok", paths) on a pipe

* Slots: ``config.workers`` CPU slots plus one GPU slot per id in ``config.gpus``.
  A job's slot kind (``jobs.resource``, see :func:`job_resource`) is 'gpu' for a model
  backend (nnU-Net, TotalSegmentator, MONAI) whose device is not ``cpu``, else 'cpu'.
  With GPUs configured a GPU slot claims only 'gpu' jobs (one model job per GPU at a
  time, its processes see ``CUDA_VISIBLE_DEVICES=<gpu>`` and ``models.device: cuda``)
  and CPU slots only 'cpu' jobs (``CUDA_VISIBLE_DEVICES=""``); without GPUs every slot
  takes any job.
* Processes (multiprocessing ``forkserver`` with the pipeline preloaded, so a job
  starts in milliseconds and the receiver in the main process stays responsive):
  an HU job runs in a process of its own; a model job runs in its slot's long-lived
  process (:func:`_slot_process`, fed job specs over a pipe), so the backend's
  per-process model cache (nnU-Net predictors) stays warm across jobs; the job's
  ``report.json`` says ``backend.model_cache: hit|miss``.  A killed or ended slot
  process is started again for the slot's next model job.
* Timeout: after ``config.job_timeout_s`` the supervisor SIGKILLs the job (or slot)
  process and its whole process group (the job process starts its own session,
  so decoder pools it spawned die with it), then records a transient failure.
* A job or slot process kills itself (and its process group) within half a second when
  the node process is gone (:func:`_watch_node`), and checks again right before it
  publishes its early SEG or its result folder (:func:`_stop_if_node_gone`), so a node
  killed with SIGKILL leaves no job running and nothing published that it did not record;
  the restarted node re-queues the job (``Store.requeue_running_jobs``) and runs it again
  with the same SEG SeriesInstanceUID (:func:`seg_series_uid`) into the same result
  folder: the job completes once, one SEG identity.
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

Early start (:mod:`node.router`): a *provisional* job runs while its series is still inside
its quiet period.  The pool claims one only while the series is quiet for
``early_start_s`` (confirmed jobs first), stops it when more instances arrive (queued
again, the try not counted) or the router drops it, and gives its slot to a confirmed
job that waits.  Its result is recorded ``done`` but held (no dispatch rows) until the
router confirms it; :func:`record_success` also re-checks the instance set
(:meth:`Store.series_digest` against the digest recorded at start).
"""

from __future__ import annotations

import json
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
from typing import Any, Callable

from node.pipeline.ai_common import GPU_SLOT_ENV
from node.store import MODEL_BACKENDS, Job, Store, instances_digest

__all__ = [
    "WorkerPool",
    "seg_series_uid",
    "job_output_dir",
    "record_success",
    "publish_result",
    "publish_early_seg",
    "early_seg_path",
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


def _node_alive(node_pid: int, node_started: float) -> bool:
    """Whether the node process (pid *and* start time, so a recycled pid is not mistaken
    for it) is still running."""
    import psutil

    try:
        return abs(psutil.Process(node_pid).create_time() - node_started) < 1e-3
    except psutil.Error:
        return False


def _end_process_group() -> None:
    """SIGKILL this process's group (the job or slot process and the decoder pools it
    started); ``os._exit`` if that returns."""
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_node(node_pid: int, node_started: float, interval_s: float = 0.5) -> None:
    """Kill this job's process group as soon as the node process is gone (a daemon thread).

    The parent of a job process is the forkserver, which outlives a node killed
    with SIGKILL while any job process is alive (each holds its liveness pipe), so
    ``PR_SET_PDEATHSIG`` cannot be used; the job watches the node itself.  Between two
    looks the job may reach a publish step: :func:`_stop_if_node_gone` checks again there.
    """
    _PROC["node"] = (node_pid, node_started)

    def loop() -> None:
        while _node_alive(node_pid, node_started):
            time.sleep(interval_s)
        _end_process_group()

    threading.Thread(target=loop, name="node-watch", daemon=True).start()


def _stop_if_node_gone(what: str) -> None:
    """Called right before a job publishes ``what``: when its node is gone, end the process
    group instead, so nothing of a job whose node died appears in ``results/``.

    The store still says ``running``; the restarted node re-queues the job and runs it
    again, and the try that was cut short leaves only its ``.tmp-*`` folder, which the
    next try removes.  Without this, a job finishing within the watch interval after a
    SIGKILL of the node published a result the node never recorded.
    """
    node = _PROC.get("node")
    if node is not None and not _node_alive(*node):
        log.warning("the node (pid %d) is gone: %s is not published; the restarted node runs the job again",
                    node[0], what)
        _end_process_group()


def _configure_models(models: dict[str, Any]) -> None:
    """Apply node.yaml's ``models`` section in the job process (AI backends read it)."""
    from node.pipeline import ai_common

    ai_common.configure(models_root=models.get("root"), device=models.get("device"), threads=models.get("threads"))
    if models.get("totalseg_weights"):
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(models["totalseg_weights"])
    if models.get("totalseg_home"):
        os.environ["TOTALSEG_HOME_DIR"] = str(models["totalseg_home"])


#: what this (job or slot) process is: slot name, long-lived or not, jobs run so far
_PROC: dict[str, Any] = {"slot": None, "persistent": False, "jobs": 0, "job_id": None, "notify": None,
                         "node": None}  # node: (pid, start time) of the node that started this process


def _apply_env(env: dict[str, str] | None) -> None:
    """Set the slot's environment (``CUDA_VISIBLE_DEVICES``) before anything imports torch."""
    for key, value in (env or {}).items():
        os.environ[key] = str(value)


def _backend_info(spec: dict[str, Any], model_type: str) -> dict[str, Any]:
    """``report["backend"]``: which backend ran, in which process, and its model cache."""
    import sys

    info: dict[str, Any] = {
        "name": model_type,
        "process": {
            "pid": os.getpid(),
            "slot": _PROC["slot"],
            "persistent": _PROC["persistent"],
            "jobs_in_process": _PROC["jobs"],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
    }
    if model_type == "nnunet":
        mod = sys.modules.get("node.pipeline.backend_nnunet")
        if mod is not None and hasattr(mod, "last_run_info"):
            info.update(mod.last_run_info())
    return info


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline for one job (in the job process, or in a long-lived slot process)."""
    import sys

    from node.durable import atomic_write, fsync_dir
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
    nnunet = sys.modules.get("node.pipeline.backend_nnunet")
    if nnunet is not None and hasattr(nnunet, "_last_run"):
        nnunet._last_run.clear()  # a long-lived process: no stale cache info from the last job
    early = early_seg_path(final)

    def on_seg(path: Path, uid: str) -> None:
        """The SEG is complete while meshes are still being made: hand it on now."""
        notify = _PROC.get("notify")
        if notify is None:
            return
        _stop_if_node_gone("the early SEG")
        try:
            link = final.parent / f".{early.name}.tmp-{os.getpid()}"
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)  # same folder tree: no copy
            except OSError:
                shutil.copyfile(path, link)
            os.replace(link, early)
            fsync_dir(final.parent)
            notify(("seg", {"seg_early": str(early), "seg_series_uid": uid}))
        except Exception as exc:  # noqa: BLE001 - then it goes with the rest of the results
            log.warning("cannot hand the SEG on before the meshes (%s); it is sent when the job is done", exc)

    res = run_pipeline(
        [str(p) for p in paths],
        profile,
        tmp,
        backend=spec.get("backend"),
        series_uid=spec["series_uid"],
        seg_series_uid=spec["seg_series_uid"],
        decode_workers=spec.get("decode_workers"),
        on_seg=on_seg,
        seg_first=True,  # the SEG goes to the PACS: it comes before the meshes for the share
    )
    backend_info = _backend_info(spec, str(res.report.get("profile", {}).get("model_type") or spec.get("backend")))
    res.report["backend"] = backend_info
    atomic_write(tmp / "report.json", (json.dumps(res.report, indent=2) + "\n").encode("utf-8"))
    # publish the folder whole: results/<id>/ only ever holds a finished run
    _stop_if_node_gone(f"the result folder {final}")
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
        "backend": backend_info,
        **({"seg_early": str(early)} if early.is_file() else {}),
        # a result that fails a sanity check (node.pipeline.quality) is delivered, with warnings
        **({"warnings": res.report["quality"]["warnings"]} if res.report.get("quality", {}).get("warnings") else {}),
    }


def early_seg_path(output_dir: Path) -> Path:
    """``results/<job id>-seg.dcm``: the job's SEG, published as soon as it is written (a hard
    link to the file inside the result folder), so it can be sent before the meshes are done."""
    return output_dir.parent / f"{output_dir.name}-seg.dcm"


def _execute(spec: dict[str, Any]) -> tuple[Any, ...]:
    """Run one job; ``("ok", result)`` or ``("error", kind, message)``."""
    from node.errors import BackendUnavailable, InputError

    try:
        return ("ok", _run_spec(spec))
    except InputError as exc:
        return ("error", _INPUT, str(exc))
    except BackendUnavailable as exc:
        return ("error", _BACKEND, str(exc))
    except BaseException as exc:  # noqa: BLE001 - everything else may be transient
        tb = traceback.format_exc(limit=4).strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        return ("error", _TRANSIENT, f"{type(exc).__name__}: {exc} ({where})")


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = _PROC["job_id"]
        return True


def _setup_process(info: dict[str, Any], slot_label: str) -> None:
    """Common start of a job/slot process: own session, slot env, node watch, logging."""
    try:
        os.setsid()  # own process group: the supervisor kills the whole group on timeout
    except OSError:
        pass
    _apply_env(info.get("env"))
    _watch_node(info["node_pid"], info["node_started"])
    logging.basicConfig(level=info.get("log_level", "INFO"),
                        format=f"%(asctime)s %(levelname)s %(name)s [{slot_label}job %(job)s]: %(message)s")
    for h in logging.getLogger().handlers:
        h.addFilter(_JobIdFilter())
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def _job_process(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a one-job process (module level: started by forkserver)."""
    _PROC.update(slot=spec.get("slot"), persistent=False, jobs=1, job_id=spec["job_id"], notify=conn.send)
    _setup_process(spec, "")
    msg = _execute(spec)
    try:
        conn.send(msg)
    finally:
        conn.close()


def _slot_process(conn: Any, info: dict[str, Any]) -> None:
    """Entry point of a long-lived slot process: runs the job specs it receives, one at a time.

    Model backends keep their per-process caches (nnU-Net predictors) between jobs here.
    ``None`` (or a closed pipe) ends it.  After a transient error the process ends too, so the
    next job gets a fresh one (a broken CUDA context or a leaking library does not live on).
    """
    _PROC.update(slot=info.get("slot"), persistent=True, jobs=0, job_id=None, notify=conn.send)
    _setup_process(info, f"slot {info.get('slot')} ")
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            break
        if spec is None:
            break
        _PROC["jobs"] += 1
        _PROC["job_id"] = spec["job_id"]
        msg = _execute(spec)
        _PROC["job_id"] = None
        try:
            conn.send(msg)
        except (OSError, ValueError):
            break
        if msg[0] == "error" and msg[1] == _TRANSIENT:
            break
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


def _add_dispatches(config: Any, store: Store, job: Job, kinds: tuple[str, ...] = ("dicom", "share")) -> int:
    plan, _ = _dispatch_plan(config, store, job)
    n = 0
    for name, kind, error in plan:
        if kind not in kinds:
            continue
        did, created = store.add_dispatch(job.id, name, kind)
        if created:
            n += 1
            if error:
                store.mark_dispatch_failed(did, error)
                log.error("job %d: dispatch to %s cannot be made: %s", job.id, name, error)
    return n


def _instances_changed(store: Store, job: Job, series: Any) -> bool:
    """Whether the series (same generation) no longer has the instance set this try started on."""
    return (series is not None and series.generation == job.generation and job.instances_digest is not None
            and store.series_digest(job.series_uid) != job.instances_digest)


def record_success(config: Any, store: Store, job: Job, result: dict[str, Any]) -> str:
    """running -> done, then publish the result (:func:`publish_result`) unless it is held.

    An early-started (provisional) job is checked against the series first: if instances
    arrived while it ran, it goes back to the queue (``restarted``); if the series moved on
    to a newer generation, it is dropped (``superseded``).  Otherwise it is ``done`` but held
    (``held``) until the router confirms it at completion; a job confirmed while it ran is
    published here.

    Returns ``done``, ``superseded``, ``held``, ``restarted``, or ``lost`` when the job was
    no longer running (e.g. re-queued or dropped meanwhile).
    """
    fresh = store.get_job(job.id) or job
    series = store.get_series(job.series_uid)
    if fresh.state == "running" and _instances_changed(store, fresh, series):
        store.restart_job(job.id, "new instances arrived while it ran (early start)", from_states=("running",))
        log.info("job %d finished on an instance set the series no longer has; queued again", job.id)
        return "restarted"
    if fresh.provisional and series is not None and series.generation != job.generation:
        store.drop_job(job.id, f"the series moved on to generation {series.generation} during the early start")
        log.info("job %d (early start) finished for an older generation of its series; dropped", job.id)
        return "superseded"
    _, origin = _dispatch_plan(config, store, job)
    if origin is not None:
        result = dict(result, origin=origin)
    if not store.complete_job(job.id, result, seg_series_uid=result.get("seg_series_uid")):
        log.warning("job %d finished but was no longer running; result ignored", job.id)
        return "lost"
    fresh = store.get_job(job.id)  # after completing: a confirmation made meanwhile is seen here
    if fresh is not None and fresh.provisional:
        log.info("job %d done early (series %s still inside its quiet period): result held until the series"
                 " completes", job.id, job.series_uid)
        return "held"
    return publish_result(config, store, fresh or job, result)


def publish_early_seg(config: Any, store: Store, job_id: int) -> int:
    """Queue the C-STOREs of a running job's SEG that is ready before its meshes.

    Only for a confirmed job (an early start's SEG waits for its confirmation, see
    :mod:`node.router`) that still works on the series' instance set.  The dispatcher sends
    ``result.seg_early``; the share drop waits for the whole result.  The SEG identity is
    fixed by the job (:func:`seg_series_uid`, instance UID derived from it), so a retry of the
    job writes the same instance again.  Returns the number of dispatch rows added.
    """
    job = store.get_job(job_id)
    if job is None or job.provisional or job.state != "running" or not (job.result or {}).get("seg_early"):
        return 0
    if _instances_changed(store, job, store.get_series(job.series_uid)):
        return 0
    n = _add_dispatches(config, store, job, kinds=("dicom",))
    if n:
        log.info("job %d: SEG ready before the meshes; %d C-STORE dispatch(es) queued", job.id, n)
    return n


def publish_result(config: Any, store: Store, job: Job, result: dict[str, Any]) -> str:
    """Publish a done job's result: supersede older generations' results, add the dispatch rows,
    settle the series.  Idempotent (the worker and the router may both call it for an early start).

    Returns ``done``, or ``superseded`` when a newer generation's result already exists.
    """
    state = "done"
    if job.params.get("supersede", True):
        with store.transaction() as c:
            newer = c.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND rule = ? AND generation > ? AND state = 'done'"
                " AND provisional = 0",
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
        log.error("job %d failed (%s, not retried%s): %s", job.id, label,
                  "; an early start: more instances or the complete series run it again" if job.provisional else "",
                  message)
    settle_series(store, job.series_uid, job.generation)
    return state


def ensure_dispatches(config: Any, store: Store) -> int:
    """Add the dispatch rows of done jobs that have none (a crash between completion and dispatch)."""
    n = 0
    have = {d.job_id for d in store.list_dispatches()}
    for job in store.list_jobs("done"):
        if job.id not in have and not job.provisional:  # a held early result is published at completion
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
class _Slot:
    """One job slot: ``cpu<N>`` (``config.workers`` of them) or ``gpu<id>`` (one per ``config.gpus``).

    ``proc``/``conn``: the slot's long-lived process for model jobs (None until the first one,
    and again after it was killed or ended).
    """

    index: int
    kind: str  # 'cpu' | 'gpu'
    gpu: int | None
    env: dict[str, str]
    proc: Any = None
    conn: Any = None

    @property
    def name(self) -> str:
        return f"gpu{self.gpu}" if self.kind == "gpu" else f"cpu{self.index}"


@dataclass
class _Running:
    job: Job
    proc: Any
    conn: Any
    deadline: float
    persistent: bool = False
    started: float = field(default_factory=time.monotonic)
    provisional: bool = False  #: an early start not confirmed yet (refreshed by _check_running)


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


def job_backend(job: Job) -> str:
    """The backend a job runs: the rule's override, else the profile's model_type recorded at routing."""
    return str(job.params.get("backend_override") or job.backend)


def job_resource(config: Any, job: Job) -> str:
    """The slot kind a job needs: 'gpu' for a model backend whose device is not ``cpu`` (the
    profile's ``model.device`` when it sets one, else ``models.device`` of node.yaml), else 'cpu'.

    Independent of whether this node has GPUs: without ``gpus`` every slot takes every job.
    """
    if job_backend(job) not in MODEL_BACKENDS:
        return "cpu"
    device = None
    try:
        from node.profiles import load_profile

        device = (load_profile(job.profile, config.profiles).model or {}).get("device")
    except Exception:  # noqa: BLE001 - the job itself reports a broken profile
        pass
    device = str(device or config.models.device or "auto").lower()
    return "cpu" if device == "cpu" else "gpu"


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
        self, config: Any, store: Store, *, poll_s: float = 0.5, on_done: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.on_done = on_done
        self.size = max(1, int(config.workers))
        self.gpus = [int(g) for g in (getattr(config, "gpus", None) or [])]
        self.poll_s = poll_s
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["node.worker", "node.pipeline.run"])
        cpu_env = {"CUDA_VISIBLE_DEVICES": ""} if self.gpus else {}
        self.slots: list[_Slot] = [_Slot(i, "cpu", None, dict(cpu_env)) for i in range(self.size)]
        self.slots += [_Slot(self.size + n, "gpu", g, {"CUDA_VISIBLE_DEVICES": str(g), GPU_SLOT_ENV: str(g)})
                       for n, g in enumerate(self.gpus)]
        self._running: dict[int, _Running] = {}  # slot index -> running job
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
        # the forkserver (and its preload of the pipeline modules, ~1 s) starts now rather than
        # when the first job arrives; in the background, so the node is listening meanwhile
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
        except Exception:  # noqa: BLE001 - the first job starts it then
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

    # -- supervisor
    def _loop(self) -> None:
        checked = 0.0
        while not self._stop.is_set():
            try:
                self._reap()
                if self._running and time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    self._check_running()
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
        for idx, r in list(self._running.items()):
            _kill_tree(r.proc)
            if r.persistent:
                self._forget_slot_process(self.slots[idx])
            if _give_back(self.store, r.job.id, "interrupted (node shut down)"):
                log.warning("job %d interrupted by shutdown: re-queued", r.job.id)
            self._running.pop(idx, None)
        for slot in self.slots:  # idle long-lived slot processes: ask them to end, then make sure
            if slot.proc is not None:
                try:
                    slot.conn.send(None)
                except Exception:  # noqa: BLE001
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
        enabled = getattr(self.config, "early_start_enabled", False)
        return float(self.config.early_start_s) if enabled else None

    def _fill(self) -> None:
        if self._stop.is_set():
            return
        self._classify()
        empty: set[Any] = set()  # claim kinds that found nothing in this pass
        early = self._early_quiet_s()
        for slot in self.slots:
            if self._stop.is_set():
                return
            kinds = (slot.kind,) if self.gpus else None
            running = self._running.get(slot.index)
            if running is not None:
                # speculative work gives way: a confirmed job waiting for this slot kind takes
                # the slot of an early start (which runs again once a slot is free)
                if not running.provisional or ("confirmed", kinds) in empty:
                    continue
                job = self.store.claim_job(worker=f"{self._name}:{slot.name}", kinds=kinds, confirmed_only=True)
                if job is None:
                    empty.add(("confirmed", kinds))
                    continue
                self._abort(slot.index, running)
                if self.store.restart_job(running.job.id, "early start paused: its slot went to a confirmed job",
                                          from_states=("running",)):
                    log.info("job %d (early start) stopped to free slot %s for job %d; queued again",
                             running.job.id, slot.name, job.id)
                self._start_job(slot, job)
                continue
            if kinds in empty:
                continue
            job = self.store.claim_job(worker=f"{self._name}:{slot.name}", kinds=kinds, early_quiet_s=early)
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
            except Exception:  # noqa: BLE001
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
            if row.state != "running":
                self._abort(idx, r)
                log.info("job %d stopped: it is %s now (%s)", row.id, row.state, row.error or "-")
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
                if self.store.restart_job(row.id, "new instances arrived during the early start",
                                          from_states=("running",)):
                    log.info("job %d (early start) stopped: series %s received more instances; it starts again"
                             " once the series is quiet", row.id, row.series_uid)

    def _seg_ready(self, job: Job, info: dict[str, Any]) -> None:
        """A running job wrote its SEG (``results/<id>-seg.dcm``): record it, queue its C-STOREs."""
        try:
            self.store.merge_job_result(job.id, info)
            if publish_early_seg(self.config, self.store, job.id) and self.on_done is not None:
                self.on_done()
        except Exception:  # noqa: BLE001 - the SEG is then sent with the whole result
            log.exception("job %d: cannot queue the early SEG", job.id)

    def _slot_info(self, slot: _Slot) -> dict[str, Any]:
        return {"slot": slot.name, "env": dict(slot.env), "log_level": self.config.log_level,
                "node_pid": os.getpid(), "node_started": self._node_started}

    def _forget_slot_process(self, slot: _Slot) -> None:
        if slot.conn is not None:
            try:
                slot.conn.close()
            except Exception:  # noqa: BLE001
                pass
        if slot.proc is not None and not slot.proc.is_alive():
            slot.proc.join(1)
        slot.proc = slot.conn = None

    def _slot_process_for(self, slot: _Slot) -> tuple[Any, Any]:
        """The slot's long-lived process (started when missing or ended)."""
        if slot.proc is not None and not slot.proc.is_alive():
            log.info("slot %s: its process (pid %s) ended (exit code %s)", slot.name, slot.proc.pid,
                     slot.proc.exitcode)
            self._forget_slot_process(slot)
        if slot.proc is None:
            parent, child = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(target=_slot_process, args=(child, self._slot_info(slot)),
                                     name=f"slot-{slot.name}", daemon=False)
            proc.start()
            child.close()
            slot.proc, slot.conn = proc, parent
            log.info("slot %s: started its model process (pid %d%s)", slot.name, proc.pid,
                     f", CUDA_VISIBLE_DEVICES={slot.env['CUDA_VISIBLE_DEVICES']!r}" if slot.env else "")
        return slot.proc, slot.conn

    def _start_job(self, slot: _Slot, job: Job) -> None:
        store = self.store
        persistent = job_backend(job) in MODEL_BACKENDS
        try:
            store.set_series_state(job.series_uid, "processing", from_states=("routed", "processing"),
                                   generation=job.generation)
            models = self.config.models.model_dump(mode="json")
            if slot.kind == "gpu":
                models["device"] = "cuda"
            instances = store.series_instances(job.series_uid)
            store.set_job_digest(job.id, instances_digest(i.sop_instance_uid for i in instances))
            spec = {
                "job_id": job.id,
                "series_uid": job.series_uid,
                "paths": [i.path for i in instances],
                "profile": job.profile,
                "profiles_dir": str(self.config.profiles),
                "backend": job.params.get("backend_override") or None,
                "output_dir": str(job_output_dir(self.config, job.id)),
                "seg_series_uid": seg_series_uid(job),
                "decode_workers": self.decode_workers,
                "models": models,
                **self._slot_info(slot),
            }
            if persistent:
                proc, conn = self._slot_process_for(slot)
                conn.send(spec)
            else:
                conn, child = self._ctx.Pipe(duplex=False)
                proc = self._ctx.Process(target=_job_process, args=(child, spec), name=f"job-{job.id}",
                                         daemon=False)
                proc.start()
                child.close()
            store.merge_job_params(job.id, {"slot": {
                "name": slot.name, "kind": slot.kind, "gpu": slot.gpu, "pid": proc.pid,
                "process": "slot" if persistent else "job", "device": models.get("device"),
                "cuda_visible_devices": slot.env.get("CUDA_VISIBLE_DEVICES")}})
        except Exception as exc:  # noqa: BLE001
            log.exception("job %d: cannot start its process", job.id)
            if persistent and slot.proc is not None:
                _kill_tree(slot.proc)
                self._forget_slot_process(slot)
            record_failure(self.config, store, job, _TRANSIENT, f"cannot start job process: {exc}")
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
            msg = None
            try:
                while r.conn.poll():
                    m = r.conn.recv()
                    if isinstance(m, tuple) and m and m[0] == "seg":  # the SEG is ready, meshes follow
                        self._seg_ready(r.job, m[1])
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
                record_failure(self.config, self.store, r.job, _TRANSIENT,
                               f"timeout: killed after {self.config.job_timeout_s:g} s (job_timeout_s)")
                continue
            if r.persistent:
                if msg is None:  # the slot process died under the job
                    r.proc.join(10)
                    self._forget_slot_process(slot)
            else:
                r.proc.join(10)
                r.conn.close()
            self._running.pop(idx, None)
            if msg is None:
                record_failure(self.config, self.store, r.job, _TRANSIENT,
                               f"job process died (exit code {r.proc.exitcode})")
            elif msg[0] == "ok":
                state = record_success(self.config, self.store, r.job, msg[1])
                if state == "done" and self.on_done is not None:
                    try:
                        self.on_done()
                    except Exception:  # noqa: BLE001 - a hook must not stop the supervisor
                        log.exception("on_done hook failed")
            else:
                record_failure(self.config, self.store, r.job, msg[1], msg[2])
            self._wake.set()
