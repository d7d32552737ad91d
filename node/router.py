"""Routing: turns complete series into jobs (one per matched rule), and early-started series
into provisional jobs that completion confirms or drops.  See docs/architecture.md.

Idempotent across crashes: jobs are unique on (series, rule, rules version, generation), and
a series generation that already has jobs is never routed a second time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from node.backend_registry import DEFAULT_BACKEND
from node.config import NodeConfig
from node.contracts import JobParams, JobState, SeriesState
from node.errors import InputError
from node.jobs import publish_early_seg, publish_result, settle_series
from node.profiles import load_profile
from node.dicom_values import tags_from_dataset
from node.routing.facts import SeriesFacts
from node.routing.rules import RuleSetHolder
from node.store import Job, Series, Store

__all__ = ["Router", "series_facts", "RouteOutcome", "TagCache"]

log = logging.getLogger("node.router")

#: job states that count as "this rule already handled an earlier generation"
_LIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DONE)


class TagCache:
    """Rule tags of spool files already read, by path (spool files never change once written),
    so routing a series again (early start, then completion) does not parse every header twice.
    Least recently used entries go beyond ``max_files``."""

    def __init__(self, max_files: int = 4000) -> None:
        self.max_files = max_files
        self._tags: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def get(self, path: str) -> dict[str, Any] | None:
        tags = self._tags.get(path)
        if tags is not None:
            self._tags.move_to_end(path)
        return tags

    def put(self, path: str, tags: dict[str, Any]) -> None:
        self._tags[path] = tags
        self._tags.move_to_end(path)
        while len(self._tags) > self.max_files:
            self._tags.popitem(last=False)


def series_facts(store: Store, series: Series, cache: TagCache | None = None) -> SeriesFacts:
    """Facts of a stored series from its spool files' headers (stored tags as fallback)."""
    import pydicom

    instances = store.series_instances(series.series_uid)
    if not instances:
        raise InputError(f"series {series.series_uid} has no stored instances")
    items: list[dict[str, Any]] = []
    for inst in instances:
        tags: dict[str, Any] | None = cache.get(inst.path) if cache is not None else None
        if tags is None:
            try:
                tags = tags_from_dataset(pydicom.dcmread(inst.path, stop_before_pixels=True), keywords=None)
                if cache is not None:
                    cache.put(inst.path, tags)
            except Exception as exc:  # noqa: BLE001 - unreadable: use what the receiver indexed
                log.warning("series %s: cannot read %s (%s); routing on the stored tags", series.series_uid,
                            inst.path, exc)
                tags = dict(inst.tags)
        tags = dict(tags)
        tags.setdefault("SOPInstanceUID", inst.sop_instance_uid)
        tags.setdefault("SeriesInstanceUID", inst.series_uid)
        items.append(tags)
    return SeriesFacts.from_tag_dicts(items, series.calling_ae, series.called_ae,
                                      source=f"store:{series.series_uid}")


class RouteOutcome:
    """What :meth:`Router.route_series` did (for logs and tests)."""

    def __init__(self, series_uid: str, state: str, jobs: list[int] | None = None, reason: str = "") -> None:
        self.series_uid = series_uid
        self.state = state  #: routed | unrouted | failed | skipped
        self.jobs = jobs or []
        self.reason = reason

    def __repr__(self) -> str:
        return f"RouteOutcome({self.series_uid!r}, {self.state!r}, jobs={self.jobs})"


class Router:
    """Turns complete series into jobs.

    Args:
        config: :class:`node.config.NodeConfig` (profiles folder, job retry policy).
        store: the job store.
        rules: the hot-reloaded rule set.
    """

    def __init__(self, config: NodeConfig, store: Store, rules: RuleSetHolder) -> None:
        self.config = config
        self.store = store
        self.rules = rules
        self._tags = TagCache()
        #: series_uid -> (generation, instance count, rules version) last looked at by route_early
        self._early_seen: dict[str, tuple[int, int, str]] = {}

    def route_pending(self) -> list[RouteOutcome]:
        """Route every series in state ``complete`` (oldest first)."""
        out = []
        for s in self.store.list_series(SeriesState.COMPLETE):
            try:
                out.append(self.route_series(s.series_uid))
            except Exception:  # one bad series must not stop the others
                log.exception("routing series %s failed (will retry)", s.series_uid)
        return out

    def _backend_of(self, rule: Any) -> str:
        if rule.backend:
            return str(rule.backend)
        try:
            return load_profile(rule.profile, self.config.profiles).model_type
        except InputError:
            return DEFAULT_BACKEND  # the job reports the profile problem

    def _create_jobs(self, series: Series, matched: list[Any], version: str, *,
                     provisional: bool) -> tuple[list[int], list[str]]:
        """One job per matched rule (idempotent); returns (job ids, rules that ignore late instances)."""
        store, uid, gen = self.store, series.series_uid, series.generation
        earlier = [j for j in store.list_jobs(series_uid=uid, state=_LIVE_JOB_STATES) if j.generation < gen]
        job_ids: list[int] = []
        ignored: list[str] = []
        for rule in matched:
            if provisional and not rule.early_start:
                continue  # this rule's jobs wait for the quiet period
            if not rule.supersede and any(j.rule == rule.name for j in earlier):
                ignored.append(rule.name)
                log.info("series %s generation %d: rule %s has supersede: false; late instances ignored",
                         uid, gen, rule.name)
                continue
            params = JobParams(
                destinations=tuple(rule.destinations),
                share=bool(rule.share),
                backend_override=rule.backend,
                calling_ae=series.calling_ae,
                rule_line=rule.line,
                supersede=bool(rule.supersede),
                outputs=rule.outputs,
            )
            job_id, created = store.create_job(
                uid,
                rule.name,
                profile=rule.profile,
                backend=self._backend_of(rule),
                rules_version=version,
                generation=gen,
                max_attempts=self.config.job_retry.max_attempts,
                params=params,
                provisional=provisional,
            )
            job_ids.append(job_id)
            if created:
                log.info("series %s generation %d: rule %s -> %sjob %d (profile %s, destinations %s, share %s)",
                         uid, gen, rule.name, "early-start (provisional) " if provisional else "", job_id,
                         rule.profile, ",".join(rule.destinations) or "-", rule.share)
        return job_ids, ignored

    def route_early(self, early_start_s: float, *, now: float | None = None) -> list[RouteOutcome]:
        """Create provisional jobs for series still ``receiving`` but quiet for ``early_start_s``.

        A series whose generation already has jobs is left alone; a decision that matches no
        rule waits for completion (where the series becomes ``unrouted`` as usual), and so do
        the matched rules with ``early_start: false``.  Each (series, generation, instance
        count, rules version) is evaluated once.
        """
        out: list[RouteOutcome] = []
        for series in self.store.quiet_series(early_start_s, now=now):
            uid, gen = series.series_uid, series.generation
            ruleset = self.rules.ruleset
            version = ruleset.version
            key = (gen, series.instance_count, version)
            if self._early_seen.get(uid) == key:
                continue
            self._early_seen[uid] = key
            if any(j.generation == gen for j in self.store.list_jobs(series_uid=uid)):
                continue
            if self.store.refused_instances(uid):  # waits for instances refused for want of space
                self._early_seen.pop(uid, None)
                continue
            try:
                facts = series_facts(self.store, series, self._tags)
            except InputError as exc:  # completion reports it
                log.debug("series %s: no early start (%s)", uid, exc)
                continue
            decision = ruleset.route(facts)
            if decision.unrouted:
                continue
            job_ids, _ = self._create_jobs(series, decision.matched, version, provisional=True)
            if job_ids:
                out.append(RouteOutcome(uid, "early", job_ids))
        if len(self._early_seen) > 10000:  # forget the oldest entries (dicts keep insertion order)
            for uid in list(self._early_seen)[:5000]:
                del self._early_seen[uid]
        return out

    def _drop(self, provisional: list[Job], why: str) -> None:
        """Drop early-started jobs that the complete series does not confirm (``why``)."""
        for job in provisional:
            self.store.drop_job(job.id, f"early start not confirmed: {why}"[:2000])

    def _reconcile(self, series: Series, job_ids: list[int], provisional: list[Job]) -> None:
        """Confirm or drop the early-started (provisional) jobs of a series that just completed."""
        store, uid = self.store, series.series_uid
        digest = store.series_digest(uid)
        for job in provisional:
            if job.id not in job_ids:
                if store.drop_job(job.id, "early start not confirmed: its rule (rules version "
                                  f"{job.rules_version}) does not match the complete series, or the"
                                  " series was routed with other rules"):
                    log.info("series %s: early-start job %d (rule %s) dropped: the rule does not match the"
                             " complete series", uid, job.id, job.rule)
                continue
            store.confirm_job(job.id)
            fresh = store.get_job(job.id)  # after confirming: a job finishing meanwhile is seen here
            if fresh is not None and fresh.state == JobState.FAILED and fresh.instances_digest != digest:
                # it failed on part of the series (e.g. too few slices): the whole series decides
                store.requeue_job(job.id, "early start failed on another instance set; run on the complete series",
                                  counts_as_try=False, discard_result=True, from_states=(JobState.FAILED,))
                log.info("series %s: early-start job %d failed on another instance set; queued again", uid, job.id)
                continue
            if fresh is None or fresh.state != JobState.DONE:
                log.info("series %s: early-start job %d (rule %s, %s) confirmed", uid, job.id, job.rule,
                         fresh.state if fresh else "?")
                if fresh is not None and fresh.state == JobState.RUNNING:
                    publish_early_seg(self.config, store, job.id)  # its SEG may be ready already
                continue
            if fresh.instances_digest != digest:
                store.requeue_job(job.id, "early start ran on other instances than the complete series",
                                  counts_as_try=False, discard_result=True, from_states=(JobState.DONE,))
                log.info("series %s: early-start job %d ran on another instance set; queued again", uid, job.id)
                continue
            log.info("series %s: early-start job %d (rule %s) confirmed; its result is published", uid, job.id,
                     job.rule)
            publish_result(self.config, store, fresh)
        settle_series(store, uid, series.generation)  # e.g. an early start that failed on these instances

    def route_series(self, series_uid: str) -> RouteOutcome:
        """Route one ``complete`` series; see the module docstring."""
        store = self.store
        series = store.get_series(series_uid)
        if series is None or series.state != SeriesState.COMPLETE:
            return RouteOutcome(series_uid, "skipped", reason="not complete")
        gen = series.generation
        existing = [j for j in store.list_jobs(series_uid=series_uid) if j.generation == gen]
        provisional = [j for j in existing if j.provisional and j.state != JobState.SUPERSEDED]
        confirmed = [j for j in existing if not j.provisional]
        if confirmed:  # routed before a crash: never route a generation twice
            store.set_series_state(series_uid, SeriesState.ROUTED, from_states=(SeriesState.COMPLETE,),
                                   generation=gen)
            if provisional:  # a crash in the middle of a reconciliation: finish it
                versions = {j.rules_version for j in confirmed}
                self._reconcile(series, [j.id for j in provisional if j.rules_version in versions], provisional)
            return RouteOutcome(series_uid, "routed", [j.id for j in existing], "jobs existed")

        ruleset = self.rules.ruleset  # one consistent snapshot for decision and version
        version = ruleset.version
        try:
            facts = series_facts(store, series, self._tags)
        except InputError as exc:
            self._drop(provisional, f"cannot compute series facts: {exc}")
            store.set_series_state(series_uid, SeriesState.FAILED, from_states=(SeriesState.COMPLETE,), generation=gen,
                                   error=f"cannot compute series facts: {exc}")
            log.error("series %s: cannot compute series facts: %s", series_uid, exc)
            return RouteOutcome(series_uid, "failed", reason=str(exc))
        decision = ruleset.route(facts)
        if decision.unrouted:
            why = "; ".join(f"{e.rule.name}: {e.reason}" for e in decision.evaluations) or "no rules"
            self._drop(provisional, f"no rule matches the complete series: {why}")
            store.set_series_state(series_uid, SeriesState.UNROUTED, from_states=(SeriesState.COMPLETE,), generation=gen,
                                   error=f"no rule matched (rules {version}): {why}"[:2000])
            log.warning("series %s (%s, %r) is UNROUTED: no rule matched; kept in the spool", series_uid,
                        facts.modality, facts.tags.get("SeriesDescription"))
            return RouteOutcome(series_uid, "unrouted", reason=why)

        job_ids, ignored = self._create_jobs(series, decision.matched, version, provisional=False)
        if gen > 1:
            store.supersede_jobs(series_uid, below_generation=gen)
        if not job_ids:  # every matching rule ignores late instances: earlier results stand
            self._drop(provisional, "late instances ignored (supersede: false)")
            store.set_series_state(series_uid, SeriesState.DONE, from_states=(SeriesState.COMPLETE,), generation=gen,
                                   error=f"late instances ignored (supersede: false): {', '.join(ignored)}")
            return RouteOutcome(series_uid, "done", reason="supersede: false")
        store.set_series_state(series_uid, SeriesState.ROUTED, from_states=(SeriesState.COMPLETE,), generation=gen)
        if provisional:
            self._reconcile(series, job_ids, provisional)
            if any(j.state == JobState.RUNNING for j in store.list_jobs(series_uid=series_uid) if j.generation == gen):
                store.set_series_state(series_uid, SeriesState.PROCESSING, from_states=(SeriesState.ROUTED,),
                                       generation=gen)
        return RouteOutcome(series_uid, "routed", job_ids)

