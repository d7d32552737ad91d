"""The job lifecycle after a try ends: record its success or failure, publish its result (dispatch
rows, older generations superseded), settle the series, and the operator's retry.

Used by the worker pool (:mod:`node.pool`), the router (early starts confirmed at completion),
the service (startup recovery) and ``dicom-node jobs``; see docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from node.config import Destination, NodeConfig, StowDestination
from node.contracts import DispatchKind, FailureKind, JobResult, JobState, OriginAddress, SeriesState
from node.pipeline.outputs.options import dispatch_kinds
from node.routing.rules import ORIGIN
from node.store import Job, Series, Store

__all__ = [
    "seg_series_uid",
    "job_output_dir",
    "early_seg_path",
    "resolve_origin",
    "record_success",
    "publish_result",
    "publish_early_seg",
    "record_failure",
    "settle_series",
    "ensure_dispatches",
    "retry_job",
    "Origin",
    "Recorded",
]

log = logging.getLogger("node.jobs")

#: what became of a finished try (:func:`record_success`)
Recorded = Literal["done", "superseded", "held", "restarted", "lost"]

#: series states a job's outcome may settle (the series has been routed)
_SETTLING_FROM = (SeriesState.ROUTED, SeriesState.PROCESSING, SeriesState.DONE, SeriesState.FAILED)


def seg_series_uid(job: Job) -> str:
    """The SEG SeriesInstanceUID of a job: derived from (series, rule, rules version, generation).

    A re-run after a crash or a retry produces the same SEG identity; a new
    generation (late instances) or a new rule file version gets a new one.
    """
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[job.series_uid, job.rule, job.rules_version, str(job.generation)]))


def job_output_dir(config: NodeConfig, job_id: int) -> Path:
    """``<storage>/results/<job id>/``."""
    return Path(config.results_dir) / str(int(job_id))


def early_seg_path(output_dir: Path) -> Path:
    """``results/<job id>-seg.dcm``: the job's SEG, published as soon as it is written (a hard
    link to the file inside the result folder), so it can be sent before the meshes are done."""
    return output_dir.parent / f"{output_dir.name}-seg.dcm"


@dataclass(frozen=True)
class Origin:
    """Where the ``origin`` destination of a job sends: the calling AE and its address (None: unknown)."""

    calling_ae: str | None
    destination: Destination | None


def resolve_origin(config: NodeConfig, store: Store, job: Job, *, recorded: bool = False) -> Origin:
    """The ``origin`` destination of a job: its calling AE (the one recorded at routing, else the
    series') and that AE's address in ``known_aes``.

    With ``recorded``, an AE that ``known_aes`` no longer has falls back on the address resolved
    when the job finished (``result.origin``), so a result already done is still delivered.
    """
    calling = job.params.calling_ae
    if not calling:
        series = store.get_series(job.series_uid)
        calling = series.calling_ae if series else None
    dest = config.origin_destination(calling) if calling else None
    address = job.result.origin
    if dest is None and recorded and address is not None:
        dest = Destination(ae_title=address.ae_title or calling or "", host=address.host, port=address.port)
    return Origin(calling, dest)


def settle_series(store: Store, series_uid: str, generation: int) -> SeriesState | None:
    """Move the series to done/failed once every job of ``generation`` has finished."""
    jobs = [j for j in store.list_jobs(series_uid=series_uid)
            if j.generation == generation and j.state != JobState.SUPERSEDED]
    if not jobs or any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in jobs):
        return None
    failed = [j for j in jobs if j.state == JobState.FAILED]
    if failed:
        err = "; ".join(f"job {j.id} ({j.rule}): {j.error}" for j in failed)[:2000]
        ok = store.set_series_state(series_uid, SeriesState.FAILED, from_states=_SETTLING_FROM,
                                    generation=generation, error=err)
        return SeriesState.FAILED if ok else None
    ok = store.set_series_state(series_uid, SeriesState.DONE, from_states=_SETTLING_FROM, generation=generation)
    return SeriesState.DONE if ok else None


@dataclass(frozen=True)
class _PlannedDispatch:
    destination: str
    kind: DispatchKind
    error: str | None  #: why it cannot be made (recorded as a failed dispatch)


def _dispatch_plan(config: NodeConfig, store: Store, job: Job) -> tuple[list[_PlannedDispatch], OriginAddress | None]:
    """The dispatches of a job, and the address its ``origin`` destination resolved to."""
    plan: list[_PlannedDispatch] = []
    origin: OriginAddress | None = None

    def kinds_at(stow: bool) -> list[DispatchKind]:
        """C-STORE: the SEG at once, the other result objects when the job is done; STOW-RS: all at once."""
        return [DispatchKind(k) for k in dispatch_kinds(job.params.outputs, stow=stow)]

    for name in job.params.destinations:
        if name == ORIGIN:
            o = resolve_origin(config, store, job)
            if o.destination is None or not o.calling_ae:
                plan.append(_PlannedDispatch(ORIGIN, DispatchKind.DICOM,
                                             f"origin: calling AE {o.calling_ae!r} has no address in known_aes"))
            else:
                d = o.destination
                origin = OriginAddress(calling_ae=o.calling_ae, ae_title=d.ae_title, host=d.host, port=d.port)
                plan.extend(_PlannedDispatch(ORIGIN, k, None) for k in kinds_at(stow=False))
        elif name in config.destinations:
            stow = isinstance(config.destinations[name], StowDestination)
            plan.extend(_PlannedDispatch(name, k, None) for k in kinds_at(stow=stow))
        else:
            plan.append(_PlannedDispatch(name, DispatchKind.DICOM, f"unknown destination {name!r} (not in node.yaml)"))
    if job.params.share:
        plan.append(_PlannedDispatch("share", DispatchKind.SHARE, None))
    return plan, origin


def _add_dispatches(config: NodeConfig, store: Store, job: Job,
                    kinds: tuple[DispatchKind, ...] = tuple(DispatchKind)) -> int:
    plan, _ = _dispatch_plan(config, store, job)
    n = 0
    for p in plan:
        if p.kind not in kinds:
            continue
        did, created = store.add_dispatch(job.id, p.destination, p.kind)
        if created:
            n += 1
            if p.error:
                store.mark_dispatch_failed(did, p.error)
                log.error("job %d: dispatch to %s cannot be made: %s", job.id, p.destination, p.error)
    return n


def _instances_changed(store: Store, job: Job, series: Series | None) -> bool:
    """Whether the series (same generation) no longer has the instance set this try started on."""
    return (series is not None and series.generation == job.generation and job.instances_digest is not None
            and store.series_digest(job.series_uid) != job.instances_digest)


def record_success(config: NodeConfig, store: Store, job: Job, result: JobResult) -> Recorded:
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
    if fresh.state == JobState.RUNNING and _instances_changed(store, fresh, series):
        store.requeue_job(job.id, "new instances arrived while it ran (early start)", counts_as_try=False,
                          discard_result=True)
        log.info("job %d finished on an instance set the series no longer has; queued again", job.id)
        return "restarted"
    if fresh.provisional and series is not None and series.generation != job.generation:
        store.drop_job(job.id, f"the series moved on to generation {series.generation} during the early start")
        log.info("job %d (early start) finished for an older generation of its series; dropped", job.id)
        return "superseded"
    _, origin = _dispatch_plan(config, store, job)
    if origin is not None:
        result = dataclasses.replace(result, origin=origin)
    if not store.complete_job(job.id, result, claimer=job.worker):
        log.warning("job %d finished but was no longer running; result ignored", job.id)
        return "lost"
    done = store.get_job(job.id)  # after completing: a confirmation made meanwhile is seen here
    if done is not None and done.provisional:
        log.info("job %d done early (series %s still inside its quiet period): result held until the series"
                 " completes", job.id, job.series_uid)
        return "held"
    return publish_result(config, store, done or dataclasses.replace(job, result=result))


def publish_early_seg(config: NodeConfig, store: Store, job_id: int) -> int:
    """Queue the C-STOREs of a running job's SEG that is ready before its meshes.

    Only for a confirmed job (an early start's SEG waits for its confirmation, see
    :mod:`node.router`) that still works on the series' instance set.  The dispatcher sends
    ``result.seg_early``; the share drop waits for the whole result.  The SEG identity is
    fixed by the job (:func:`seg_series_uid`, instance UID derived from it), so a retry of the
    job writes the same instance again.  Returns the number of dispatch rows added.
    """
    job = store.get_job(job_id)
    if job is None or job.provisional or job.state != JobState.RUNNING or job.result.seg_early is None:
        return 0
    if _instances_changed(store, job, store.get_series(job.series_uid)):
        return 0
    n = _add_dispatches(config, store, job, kinds=(DispatchKind.DICOM,))
    if n:
        log.info("job %d: SEG ready before the meshes; %d C-STORE dispatch(es) queued", job.id, n)
    return n


def publish_result(config: NodeConfig, store: Store, job: Job) -> Literal["done", "superseded"]:
    """Publish a done job's result: supersede older generations' results, add the dispatch rows,
    settle the series.  Idempotent (the pool and the router may both call it for an early start).

    Returns ``done``, or ``superseded`` when a newer generation's result already exists.
    """
    state: Literal["done", "superseded"] = "done"
    if job.params.supersede and store.supersede_results(job) is not None:
        state = "superseded"
    if state == "done":
        n = _add_dispatches(config, store, job)
        log.info("job %d done (series %s, rule %s, SEG %s): %d dispatch(es) queued", job.id, job.series_uid,
                 job.rule, job.result.seg_series_uid, n)
    else:
        log.info("job %d finished but a newer generation's result exists: superseded", job.id)
    settle_series(store, job.series_uid, job.generation)
    return state


def record_failure(config: NodeConfig, store: Store, job: Job, kind: FailureKind, message: str) -> JobState | None:
    """Record a failed try: retry with backoff for transient errors, else failed at once."""
    if kind == FailureKind.TRANSIENT:
        delay = config.job_retry.delay(job.attempts)
        state = store.fail_job(job.id, message, retry_at=time.time() + delay, claimer=job.worker)
        if state == JobState.QUEUED:
            log.warning("job %d attempt %d/%d failed (%s); retry in %.0f s", job.id, job.attempts,
                        job.max_attempts, message, delay)
        else:
            log.error("job %d failed after %d attempt(s): %s", job.id, job.attempts, message)
    else:
        label = "bad input" if kind == FailureKind.INPUT else "backend unavailable"
        state = store.fail_job(job.id, f"{label}: {message}", claimer=job.worker)
        log.error("job %d failed (%s, not retried%s): %s", job.id, label,
                  "; an early start: more instances or the complete series run it again" if job.provisional else "",
                  message)
    settle_series(store, job.series_uid, job.generation)
    return state


def ensure_dispatches(config: NodeConfig, store: Store) -> int:
    """Add the dispatch rows of done jobs that have none (a crash between completion and dispatch)."""
    n = 0
    have = {d.job_id for d in store.list_dispatches()}
    for job in store.list_jobs(JobState.DONE):
        if job.id not in have and not job.provisional:  # a held early result is published at completion
            n += _add_dispatches(config, store, job)
    if n:
        log.info("added %d missing dispatch row(s) for finished jobs", n)
    return n


def retry_job(store: Store, job_id: int) -> str:
    """Operator retry: a failed job goes back to queued with fresh attempts; for a done job its failed
    dispatches go back to pending.  Returns what was done (one line)."""
    state, n = store.retry_failed(job_id)
    if state is None:
        return f"no job {job_id}"
    if state == JobState.FAILED:
        return f"job {job_id} re-queued"
    if state == JobState.DONE:
        return f"job {job_id} is done; {n} failed dispatch(es) re-queued"
    return f"job {job_id} is {state}: nothing to retry"
