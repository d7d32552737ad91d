"""The operator's actions on jobs, series and the quarantine, for the console and the CLI alike:
retry, cancel, re-run a series with another rule or profile, route an unrouted series now with a
chosen rule, release a quarantined instance into the spool or delete it.

Each returns an :class:`Outcome` (what happened, in one line, and the particulars for the audit
log); state changes are the store's, the quarantine's files the spool's.  A running node notices
the changes itself (the pool polls the store; a cancelled running job's process is killed within
a second); ``wake`` hooks let the console make it look at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from node.backend_registry import DEFAULT_BACKEND
from node.config import NodeConfig
from node.contracts import JobParams, JobState, SeriesState
from node.errors import InputError
from node.jobs import retry_job, settle_series
from node.profiles import list_profiles, load_profile
from node.routing.rules import RuleSet, load_rules
from node.spool import Spool
from node.store import Store

__all__ = ["Outcome", "retry", "cancel", "rerun", "route_now", "release", "delete_quarantined", "current_rules"]

#: series states a series may be re-run or routed from (not while it is still being received)
_SETTLED = (SeriesState.ROUTED, SeriesState.PROCESSING, SeriesState.DONE, SeriesState.FAILED, SeriesState.UNROUTED)


@dataclass(frozen=True)
class Outcome:
    """What an action did: ``ok`` (False: refused, ``message`` says why), the job it concerns."""

    ok: bool
    message: str
    job_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def current_rules(config: NodeConfig, holder: Any = None) -> RuleSet:
    """The rules in force: the running node's (``holder``: its RuleSetHolder), else the file's."""
    if holder is not None:
        ruleset: RuleSet = holder.ruleset
        return ruleset
    return load_rules(config.rules, known_profiles=list_profiles(config.profiles),
                      known_destinations=list(config.destinations))


def retry(store: Store, job_id: int) -> Outcome:
    """A failed job queued again with fresh attempts; a done job's failed dispatches pending again."""
    before = store.get_job(job_id)
    if before is None:
        return Outcome(False, f"no job {job_id}")
    message = retry_job(store, job_id)
    ok = before.state in (JobState.FAILED, JobState.DONE)
    return Outcome(ok, message, job_id, {"state_before": str(before.state)})


def cancel(store: Store, job_id: int, *, by: str) -> Outcome:
    """A queued or running job -> failed ("cancelled by <by>"); the pool kills a running one."""
    before = store.cancel_job(job_id, f"cancelled by {by}")
    if before is None:
        job = store.get_job(job_id)
        return Outcome(False, f"no job {job_id}" if job is None else f"job {job_id} is {job.state}: nothing to cancel",
                       job_id)
    job = store.get_job(job_id)
    if job is not None:
        settle_series(store, job.series_uid, job.generation)
    return Outcome(True, f"job {job_id} cancelled (was {before})", job_id, {"state_before": str(before)})


def _backend_of(config: NodeConfig, profile: str, backend: str | None) -> str:
    if backend:
        return backend
    try:
        return load_profile(profile, config.profiles).model_type
    except InputError:
        return DEFAULT_BACKEND  # the job reports the profile problem


def _new_job(config: NodeConfig, store: Store, series_uid: str, *, rule_name: str, profile: str,
             params: JobParams, backend: str | None, rules_version: str) -> tuple[int, bool]:
    series = store.get_series(series_uid)
    assert series is not None
    job_id, created = store.create_job(
        series_uid, rule_name, profile=profile, backend=_backend_of(config, profile, backend),
        rules_version=rules_version, generation=series.generation, max_attempts=config.job_retry.max_attempts,
        params=params)
    # the series is worked on again: the pool moves it to processing, the job's end settles it
    store.set_series_state(series_uid, SeriesState.ROUTED, from_states=_SETTLED, generation=series.generation)
    return job_id, created


def rerun(config: NodeConfig, store: Store, series_uid: str, *, rule: str | None = None,
          profile: str | None = None, rules: RuleSet | None = None, by: str) -> Outcome:
    """A new job for the series' current generation: with ``rule`` (a rule of the rules in force:
    its destinations, share and outputs; ``profile`` overrides its profile) or with ``profile``
    alone (no destinations: the result stays in ``results/`` and the console).  Its rules version
    is ``manual-<ms>``, so it never collides with the routed jobs and its SEG gets its own identity."""
    series = store.get_series(series_uid)
    if series is None:
        return Outcome(False, f"no series {series_uid}")
    if series.state not in _SETTLED:
        return Outcome(False, f"series {series_uid} is {series.state}: wait until it is complete")
    if rule is None and profile is None:
        return Outcome(False, "choose a rule or a profile")
    if profile is not None and profile not in list_profiles(config.profiles):
        return Outcome(False, f"unknown profile {profile!r}")
    version = f"manual-{int(time.time() * 1000)}"
    if rule is not None:
        ruleset = rules or current_rules(config)
        r = next((x for x in ruleset.rules if x.name == rule), None)
        if r is None:
            return Outcome(False, f"no rule {rule!r} in the rules in force")
        params = JobParams(destinations=tuple(r.destinations), share=bool(r.share), backend_override=r.backend,
                           calling_ae=series.calling_ae, rule_line=r.line, supersede=bool(r.supersede),
                           outputs=r.outputs)
        job_id, _ = _new_job(config, store, series_uid, rule_name=r.name, profile=profile or r.profile, params=params,
                             backend=r.backend, rules_version=version)
    else:
        assert profile is not None
        job_id, _ = _new_job(config, store, series_uid, rule_name=f"manual:{profile}", profile=profile,
                             params=JobParams(calling_ae=series.calling_ae), backend=None, rules_version=version)
    return Outcome(True, f"job {job_id} queued for series {series_uid}", job_id,
                   {"rule": rule, "profile": profile, "rules_version": version, "by": by})


def route_now(config: NodeConfig, store: Store, series_uid: str, rule: str, *, rules: RuleSet | None = None,
              by: str) -> Outcome:
    """An unrouted series routed with ``rule`` (of the rules in force) as if the rule had matched:
    the same job the router would have made (rules version of the file in force)."""
    series = store.get_series(series_uid)
    if series is None:
        return Outcome(False, f"no series {series_uid}")
    if series.state != SeriesState.UNROUTED:
        return Outcome(False, f"series {series_uid} is {series.state}, not unrouted (re-run it instead)")
    ruleset = rules or current_rules(config)
    r = next((x for x in ruleset.rules if x.name == rule), None)
    if r is None:
        return Outcome(False, f"no rule {rule!r} in the rules in force")
    params = JobParams(destinations=tuple(r.destinations), share=bool(r.share), backend_override=r.backend,
                       calling_ae=series.calling_ae, rule_line=r.line, supersede=bool(r.supersede), outputs=r.outputs)
    job_id, created = _new_job(config, store, series_uid, rule_name=r.name, profile=r.profile, params=params,
                               backend=r.backend, rules_version=ruleset.version)
    store.conn.execute("UPDATE series SET error = NULL WHERE series_uid = ? AND state = 'routed'", (series_uid,))
    return Outcome(True, f"series {series_uid} routed with rule {r.name}: job {job_id}", job_id,
                   {"rule": r.name, "rules_version": ruleset.version, "created": created, "by": by})


def _spool(config: NodeConfig) -> Spool:
    return Spool(config.spool_dir, config.quarantine_dir)


def release(config: NodeConfig, store: Store, name: str) -> Outcome:
    """A quarantined instance back into the spool, checked and indexed as if received now."""
    try:
        entry, problem, outcome = _spool(config).release(name, store, called_ae=config.ae_title)
    except KeyError:
        return Outcome(False, f"no quarantined file {name!r}")
    detail = {"file": name, "reason": entry.reason, "sop": entry.sop}
    if problem is not None:
        return Outcome(False, f"{name} stays in the quarantine: {problem}", detail={**detail, "problem": problem})
    return Outcome(True, f"{name} released into the spool ({outcome})", detail={**detail, "outcome": outcome})


def delete_quarantined(config: NodeConfig, name: str) -> Outcome:
    """A quarantined instance deleted with its reason file."""
    try:
        entry = _spool(config).delete_quarantined(name)
    except KeyError:
        return Outcome(False, f"no quarantined file {name!r}")
    return Outcome(True, f"{name} deleted", detail={"file": name, "reason": entry.reason, "sop": entry.sop})
