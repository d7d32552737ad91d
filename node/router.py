"""Routing of complete series to jobs.

For every series in state ``complete`` the router

1. builds :class:`~node.routing.facts.SeriesFacts` from the series' instances:
   the headers of the spool files (read without pixel data, so rules can test
   any DICOM keyword and the geometry facts are computed), falling back to the
   rule tags stored in the job store for a file that cannot be read, plus the
   calling/called AE titles recorded with the series;
2. evaluates the active rules (:class:`~node.routing.rules.RuleSetHolder`);
3. creates one job per matched rule (:meth:`node.store.Store.create_job`) and
   moves the series to ``routed``; no match moves it to ``unrouted`` (the series
   and its files are kept and listed by ``dicom-node jobs series``).

Rules version: everywhere in the node a rule file version is the store's
:func:`node.store.rules_version` form, the first 16 hex digits of the SHA-256 of
the file bytes (:func:`short_version` turns a ``RuleSet.version`` into it).

Idempotent across crashes: jobs are unique on (series, rule, rules_version,
generation), and a series generation that already has jobs is never routed a
second time (not even under rules edited meanwhile): the router only re-marks it
``routed``.

Late instances: the store moves a processed series back to ``receiving`` with
``generation + 1`` (and supersedes its still-queued jobs); once quiet again it is
routed anew and the new jobs supersede the older results (see
:mod:`node.worker`).  A rule with ``supersede: false`` ignores late instances:
when the series already has a job of an earlier generation for that rule
(done, running or queued), no new job is created for it.
"""

from __future__ import annotations

import logging
from typing import Any

from node.errors import InputError
from node.profiles import load_profile
from node.routing.facts import SeriesFacts, dataset_to_tags
from node.routing.rules import RuleSetHolder
from node.store import Series, Store

__all__ = ["Router", "short_version", "series_facts", "RouteOutcome"]

log = logging.getLogger("node.router")

#: job states that count as "this rule already handled an earlier generation"
_LIVE_JOB_STATES = ("queued", "running", "done")


def short_version(version: str) -> str:
    """The node's rules version: 16 hex digits (what :func:`node.store.rules_version` returns)."""
    return version[:16]


def series_facts(store: Store, series: Series) -> SeriesFacts:
    """Facts of a stored series from its spool files' headers (stored tags as fallback)."""
    import pydicom

    instances = store.series_instances(series.series_uid)
    if not instances:
        raise InputError(f"series {series.series_uid} has no stored instances")
    items: list[dict[str, Any]] = []
    for inst in instances:
        tags: dict[str, Any]
        try:
            tags = dataset_to_tags(pydicom.dcmread(inst.path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - unreadable: use what the receiver indexed
            log.warning("series %s: cannot read %s (%s); routing on the stored tags", series.series_uid,
                        inst.path, exc)
            tags = dict(inst.tags)
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

    def __init__(self, config: Any, store: Store, rules: RuleSetHolder) -> None:
        self.config = config
        self.store = store
        self.rules = rules

    def route_pending(self) -> list[RouteOutcome]:
        """Route every series in state ``complete`` (oldest first)."""
        out = []
        for s in self.store.list_series("complete"):
            try:
                out.append(self.route_series(s.series_uid))
            except Exception:  # noqa: BLE001 - one bad series must not stop the others
                log.exception("routing series %s failed (will retry)", s.series_uid)
        return out

    def _backend_of(self, rule: Any) -> str:
        if rule.backend:
            return str(rule.backend)
        try:
            return load_profile(rule.profile, self.config.profiles).model_type
        except InputError:
            return "hu_based"  # the worker reports the profile problem

    def route_series(self, series_uid: str) -> RouteOutcome:
        """Route one ``complete`` series; see the module docstring."""
        store = self.store
        series = store.get_series(series_uid)
        if series is None or series.state != "complete":
            return RouteOutcome(series_uid, "skipped", reason="not complete")
        gen = series.generation
        existing = [j for j in store.list_jobs(series_uid=series_uid) if j.generation == gen]
        if existing:  # routed before a crash: never route a generation twice
            store.set_series_state(series_uid, "routed", from_states=("complete",), generation=gen)
            return RouteOutcome(series_uid, "routed", [j.id for j in existing], "jobs existed")

        ruleset = self.rules.ruleset  # one consistent snapshot for decision and version
        version = short_version(ruleset.version)
        try:
            facts = series_facts(store, series)
        except InputError as exc:
            store.set_series_state(series_uid, "failed", from_states=("complete",), generation=gen,
                                   error=f"cannot compute series facts: {exc}")
            log.error("series %s: cannot compute series facts: %s", series_uid, exc)
            return RouteOutcome(series_uid, "failed", reason=str(exc))
        decision = ruleset.route(facts)
        if decision.unrouted:
            why = "; ".join(f"{e.rule.name}: {e.reason}" for e in decision.evaluations) or "no rules"
            store.set_series_state(series_uid, "unrouted", from_states=("complete",), generation=gen,
                                   error=f"no rule matched (rules {version}): {why}"[:2000])
            log.warning("series %s (%s, %r) is UNROUTED: no rule matched; kept in the spool", series_uid,
                        facts.modality, facts.tags.get("SeriesDescription"))
            return RouteOutcome(series_uid, "unrouted", reason=why)

        earlier = [j for j in store.list_jobs(series_uid=series_uid, state=_LIVE_JOB_STATES)
                   if j.generation < gen]
        job_ids: list[int] = []
        ignored: list[str] = []
        for rule in decision.matched:
            if not rule.supersede and any(j.rule == rule.name for j in earlier):
                ignored.append(rule.name)
                log.info("series %s generation %d: rule %s has supersede: false; late instances ignored",
                         series_uid, gen, rule.name)
                continue
            params = {
                "destinations": list(rule.destinations),
                "share": bool(rule.share),
                "backend_override": rule.backend,
                "calling_ae": series.calling_ae,
                "rule_line": rule.line,
                "supersede": bool(rule.supersede),
            }
            job_id, created = store.create_job(
                series_uid,
                rule.name,
                profile=rule.profile,
                backend=self._backend_of(rule),
                rules_version=version,
                generation=gen,
                max_attempts=self.config.job_retry.max_attempts,
                params=params,
            )
            job_ids.append(job_id)
            if created:
                log.info("series %s generation %d: rule %s -> job %d (profile %s, destinations %s, share %s)",
                         series_uid, gen, rule.name, job_id, rule.profile,
                         ",".join(rule.destinations) or "-", rule.share)
        if gen > 1:
            store.supersede_jobs(series_uid, below_generation=gen)
        if not job_ids:  # every matching rule ignores late instances: earlier results stand
            store.set_series_state(series_uid, "done", from_states=("complete",), generation=gen,
                                   error=f"late instances ignored (supersede: false): {', '.join(ignored)}")
            return RouteOutcome(series_uid, "done", reason="supersede: false")
        store.set_series_state(series_uid, "routed", from_states=("complete",), generation=gen)
        return RouteOutcome(series_uid, "routed", job_ids)

