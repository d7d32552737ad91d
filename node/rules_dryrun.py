"""Dry runs of routing rules: what a draft rule file would do with stored series, the series
received last, or a folder of DICOM files (headers only), per rule and per condition (the
series' actual value against each condition) and which jobs it would create (rule, profile,
backend, destinations), beside what the live rules would create.  Reads only: nothing in the
store, the spool or the rule file changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from node.backend_registry import DEFAULT_BACKEND
from node.config import NodeConfig, StowDestination
from node.errors import InputError, NodeError
from node.profiles import load_profile
from node.router import series_facts
from node.routing.conditions import MISSING, AllOf, AnyOf, Condition, FieldCondition, Not, _fmt
from node.routing.facts import SeriesFacts, facts_from_paths
from node.routing.rules import ORIGIN, Rule, RuleSet
from node.store import Store

__all__ = ["ConditionCheck", "WouldCreateJob", "RuleCheck", "SeriesDryRun", "DryRun", "check_conditions",
           "dry_run", "facts_for_series", "facts_for_recent", "facts_for_folder"]


@dataclass(frozen=True)
class ConditionCheck:
    """One node of a rule's condition tree, evaluated (every node, no short cut)."""

    depth: int
    kind: str  #: field | all | any | not
    field: str | None
    condition: str  #: the operator in words (``regex '(?i)body'``), or the combinator
    actual: str | None  #: the series' value as the rule sees it (``<missing>`` when absent)
    matched: bool
    line: int | None
    column: int | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class WouldCreateJob:
    """A job a rule would create for the series."""

    rule: str
    profile: str
    backend: str
    destinations: tuple[str, ...]
    targets: tuple[str, ...]  #: where each destination sends (AE@host:port, STOW URL, or why nothing)
    share: bool
    outputs: tuple[str, ...]
    early_start: bool

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class RuleCheck:
    """What one rule did with the series."""

    rule: str
    line: int | None
    status: str  #: matched | not_matched | disabled | skipped (see RuleEvaluation)
    would_match: bool
    reason: str
    conditions: tuple[ConditionCheck, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "line": self.line, "status": self.status, "would_match": self.would_match,
                "reason": self.reason, "conditions": [c.to_json() for c in self.conditions]}


@dataclass(frozen=True)
class SeriesDryRun:
    """The draft against one series."""

    series_uid: str
    source: str
    facts: dict[str, Any]
    rules: tuple[RuleCheck, ...]
    jobs: tuple[WouldCreateJob, ...]
    live_jobs: tuple[WouldCreateJob, ...] | None  #: what the live rules would create (None: not compared)
    note: str = ""

    @property
    def unrouted(self) -> bool:
        return not self.jobs

    @property
    def differs(self) -> bool:
        """True when the draft creates other jobs than the live rules."""
        return self.live_jobs is not None and self.jobs != self.live_jobs

    def to_json(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "source": self.source, "facts": self.facts,
                "rules": [r.to_json() for r in self.rules], "jobs": [j.to_json() for j in self.jobs],
                "live_jobs": None if self.live_jobs is None else [j.to_json() for j in self.live_jobs],
                "unrouted": self.unrouted, "differs": self.differs, "note": self.note}


@dataclass(frozen=True)
class DryRun:
    """A draft against several series."""

    version: str
    live_version: str | None
    series: tuple[SeriesDryRun, ...]
    errors: tuple[str, ...] = ()  #: series that could not be read (uid or path: why)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "live_version": self.live_version,
                "series": [s.to_json() for s in self.series], "errors": list(self.errors)}


def check_conditions(cond: Condition, facts: SeriesFacts, depth: int = 0) -> list[ConditionCheck]:
    """Every node of a condition tree with its outcome (the rule's own evaluation stops at the first
    failing condition; this shows all of them)."""
    out: list[ConditionCheck] = []
    col = getattr(cond.line, "col", None)
    line = int(cond.line) if cond.line is not None else None
    if isinstance(cond, FieldCondition):
        value = facts.get(cond.field)
        out.append(ConditionCheck(depth, "field", cond.field, cond.op.describe(),
                                  _fmt(value) if value is not MISSING else "<missing>",
                                  cond.evaluate(facts).matched, line, col))
        return out
    if isinstance(cond, (AllOf, AnyOf)):
        kind = "all" if isinstance(cond, AllOf) else "any"
        if depth == 0 and kind == "all":  # the rule's match block itself: its children are the rows
            for child in cond.children:
                out += check_conditions(child, facts, 0)
            return out
        out.append(ConditionCheck(depth, kind, None, f"{kind} of {len(cond.children)}", None,
                                  cond.evaluate(facts).matched, line, col))
        for child in cond.children:
            out += check_conditions(child, facts, depth + 1)
        return out
    if isinstance(cond, Not):
        out.append(ConditionCheck(depth, "not", None, "not", None, cond.evaluate(facts).matched, line, col))
        out += check_conditions(cond.child, facts, depth + 1)
        return out
    out.append(ConditionCheck(depth, type(cond).__name__, None, cond.describe(), None,
                              cond.evaluate(facts).matched, line, col))
    return out


def _backend(rule: Rule, config: NodeConfig) -> str:
    """The backend a job of ``rule`` gets: the rule's, else its profile's (as node/router.py decides)."""
    if rule.backend:
        return rule.backend
    try:
        return load_profile(rule.profile, config.profiles).model_type
    except InputError:
        return DEFAULT_BACKEND


def _target(name: str, config: NodeConfig, calling_ae: str | None) -> str:
    if name == ORIGIN:
        dest = config.origin_destination(calling_ae) if calling_ae else None
        if dest is None:
            return f"origin: calling AE {calling_ae or '(none)'} has no known_aes entry: nothing is sent"
        return f"origin: {dest.ae_title}@{dest.host}:{dest.port}"
    d = config.destinations.get(name)
    if d is None:
        return f"{name}: not in node.yaml"
    if isinstance(d, StowDestination):
        return f"{name}: STOW-RS {d.stow}"
    return f"{name}: {d.ae_title}@{d.host}:{d.port}" + (" (TLS)" if d.tls else "")


def _jobs(ruleset: RuleSet, facts: SeriesFacts, config: NodeConfig) -> tuple[WouldCreateJob, ...]:
    return tuple(
        WouldCreateJob(r.name, r.profile, _backend(r, config), tuple(r.destinations),
                       tuple(_target(d, config, facts.calling_ae) for d in r.destinations), r.share,
                       tuple(r.outputs.kinds), r.early_start)
        for r in ruleset.route(facts).matched
    )


def _one(ruleset: RuleSet, facts: SeriesFacts, config: NodeConfig, live: RuleSet | None,
         note: str = "") -> SeriesDryRun:
    decision = ruleset.route(facts)
    rules = tuple(
        RuleCheck(e.rule.name, e.rule.line, e.status, e.would_match, e.reason,
                  tuple(check_conditions(e.rule.match, facts)))
        for e in decision.evaluations
    )
    summary = {k: v for k, v in facts.summary().items()}
    return SeriesDryRun(facts.series_instance_uid, facts.source, summary, rules, _jobs(ruleset, facts, config),
                        _jobs(live, facts, config) if live is not None else None, note)


def facts_for_series(store: Store, uids: Iterable[str]) -> tuple[list[tuple[SeriesFacts, str]], list[str]]:
    """Facts of stored series (from their spool files' headers, the stored tags where a file is
    unreadable), each with a note on what the node did with it; and the errors."""
    out: list[tuple[SeriesFacts, str]] = []
    errors: list[str] = []
    for uid in uids:
        series = store.get_series(uid)
        if series is None:
            errors.append(f"{uid}: not in the node's store")
            continue
        try:
            facts = series_facts(store, series)
        except NodeError as exc:
            errors.append(f"{uid}: {exc}")
            continue
        jobs = [j for j in store.list_jobs(series_uid=uid) if j.generation == series.generation]
        if jobs:
            note = (f"stored series, {series.state}; generation {series.generation} already has job(s) of rule(s) "
                    + ", ".join(sorted({j.rule for j in jobs}))
                    + ": a change applies to its next generation and to new series")
        else:
            note = f"stored series, {series.state}"
        out.append((facts, note))
    return out, errors


def facts_for_recent(store: Store, n: int) -> tuple[list[tuple[SeriesFacts, str]], list[str]]:
    """Facts of the ``n`` series received last (newest first)."""
    if n < 1:
        raise InputError(f"the number of recent series must be at least 1 (got {n})")
    return facts_for_series(store, [s.series_uid for s in store.recent_series(n)])


def facts_for_folder(folder: str | Path, calling_ae: str | None = None,
                     called_ae: str | None = None) -> list[tuple[SeriesFacts, str]]:
    """Facts of every series in a folder of DICOM files (headers only; other files skipped)."""
    return [(f, "files") for f in facts_from_paths(folder, calling_ae, called_ae)]


def dry_run(ruleset: RuleSet, targets: list[tuple[SeriesFacts, str]], config: NodeConfig, *,
            live: RuleSet | None = None, errors: Iterable[str] = ()) -> DryRun:
    """The draft ``ruleset`` against each target (and the ``live`` rules for comparison)."""
    return DryRun(ruleset.version, live.version if live is not None else None,
                  tuple(_one(ruleset, f, config, live, note) for f, note in targets), tuple(errors))


def explain(result: DryRun) -> list[str]:
    """The dry run as text lines (the CLI)."""
    lines = [f"draft version {result.version[:12]}" + (f", live version {result.live_version[:12]}"
                                                        if result.live_version else "")]
    for s in result.series:
        f = s.facts
        lines += ["", f"series {s.series_uid or '<no SeriesInstanceUID>'} ({s.note or s.source})",
                  f"  Modality={f['modality']} SeriesDescription={f['series_description']!r} "
                  f"instances={f['instance_count']} slice_thickness={f['slice_thickness']} "
                  f"slice_spacing={f['slice_spacing']} orientation={f['orientation']} calling_ae={f['calling_ae']}"]
        for r in s.rules:
            lines.append(f"  [{r.status.upper().replace('_', ' ')}] {r.rule} (line {r.line})")
            for c in r.conditions:
                mark = "yes" if c.matched else "NO "
                value = f"  actual {c.actual}" if c.kind == "field" else ""
                lines.append(f"      {mark} {'  ' * c.depth}{(c.field + ' ') if c.field else ''}{c.condition}"
                             f"{value}  (line {c.line})")
        if not s.jobs:
            lines.append("  jobs: none (UNROUTED)")
        for j in s.jobs:
            lines.append(f"  job: rule {j.rule} -> profile {j.profile}, backend {j.backend}, destinations "
                         f"[{'; '.join(j.targets) or '-'}], share {str(j.share).lower()}, outputs {','.join(j.outputs)}")
        if s.live_jobs is not None:
            lines.append("  live rules: " + ("same jobs" if not s.differs else
                                             "jobs " + (", ".join(f"{j.rule}->{j.profile}" for j in s.live_jobs)
                                                        or "none (UNROUTED)")))
    for e in result.errors:
        lines.append(f"ERROR {e}")
    return lines
