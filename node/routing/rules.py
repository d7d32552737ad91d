"""Routing rule files: schema, loader with line-accurate validation, rule sets and hot reload.

Every problem is a :class:`RuleIssue` naming the file, the YAML line and the rule; all problems
of a file are raised together as :class:`RulesError`.  The file format is on :class:`Rule` (and
in the header of the shipped ``routing_rules.yaml``), the operators in :mod:`node.routing.conditions`.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from node.backend_registry import BACKEND_NAMES
from node.dicom_values import rule_visible
from node.errors import InputError
from node.pipeline.outputs.options import (
    DEFAULT_OUTPUTS,
    OUTPUT_KINDS,
    OVERLAY_MODES,
    OutputOptions,
    OverlayStyle,
)
from node.routing.conditions import (
    AllOf,
    AnyOf,
    Condition,
    Equals,
    Exists,
    FieldCondition,
    Glob,
    Not,
    NotEmpty,
    OneOf,
    Operator,
    Range,
    Regex,
)
from node.routing.facts import ASSOCIATION_FIELDS, FACT_FIELDS, SeriesFacts

log = logging.getLogger(__name__)

#: destination name meaning "send back to the calling AE's configured address"
ORIGIN = "origin"
RULE_KEYS = (
    "name", "match", "profile", "backend", "destinations",
    "share", "stop", "enabled", "supersede", "early_start", "description",
    "outputs", "overlay",
)
OVERLAY_KEYS = ("style", "opacity", "window", "jpeg", "series_description")
REQUIRED_KEYS = ("name", "match", "profile")
OPERATORS = ("equals", "one_of", "regex", "glob", "range", "min", "max", "exists", "not_empty")
OPTION_KEYS = ("ignore_case",)
COMBINATORS = ("all", "any", "not")
ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
_CASE_OPS = ("equals", "one_of", "regex", "glob")


# ------------------------------------------------------------------ YAML with lines


class _Pos(int):
    """A 1-based line number that also knows its 1-based column (``col``): every line the loader
    records is one, so an issue reported at a line carries the column where the text is."""

    col: int | None = None


def _pos(mark: Any) -> _Pos:
    p = _Pos(mark.line + 1)
    p.col = mark.column + 1
    return p


class _LDict(dict):
    """A mapping that remembers its own line and the line of each key and value (1-based, with
    columns: :class:`_Pos`)."""

    line: int = 0
    key_lines: dict[Any, int]
    value_lines: dict[Any, int]


class _LList(list):
    """A sequence that remembers its own line and each item's line (1-based)."""

    line: int = 0
    item_lines: list[int]


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _LineLoader(yaml.SafeLoader):
    pass


class _TooComplex(yaml.MarkedYAMLError):
    pass


#: a rule file nested deeper than this, or whose aliases expand to more nodes, is refused before it is
#: built: PyYAML builds recursively (a file of 5000 ``[`` raised RecursionError: a 500 in the console)
#: and every walk over the result follows aliases (a "billion laughs" file of 9 aliases per level)
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 200_000


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with :class:`_LineLoader` after a pass over the parser's events (not recursive)
    that refuses too deep nesting and alias bombs (:class:`_TooComplex`, a ``MarkedYAMLError``)."""
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for, aliases expanded
    open_: list[list[Any]] = []  # [anchor, nodes inside] per collection being read
    total = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, inside = open_.pop()
            if anchor:
                sizes[anchor] = inside + 1
            continue
        if not isinstance(ev, yaml.NodeEvent):
            continue
        mark: Any = ev.start_mark  # the C parser's Mark type is not yaml.Mark for the stubs
        n = sizes.get(ev.anchor or "", 1) if isinstance(ev, yaml.AliasEvent) else 1
        total += n
        for frame in open_:
            frame[1] += n
        if total > MAX_YAML_NODES:
            raise _TooComplex(None, None, f"more than {MAX_YAML_NODES} values once its aliases are expanded", mark)
        if isinstance(ev, yaml.ScalarEvent) and ev.anchor:
            sizes[ev.anchor] = 1
        elif isinstance(ev, yaml.CollectionStartEvent):
            open_.append([ev.anchor, 0])
            if len(open_) > MAX_YAML_DEPTH:
                raise _TooComplex(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
    return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader subclass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _LDict:
    loader.flatten_mapping(node)
    d = _LDict()
    d.line = _pos(node.start_mark)
    d.key_lines = {}
    d.value_lines = {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        if isinstance(key, (list, dict)):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", k_node.start_mark
            )
        if key in d:
            raise _DuplicateKey(None, None, f"duplicate key {key!r}", k_node.start_mark)
        d[key] = loader.construct_object(v_node, deep=True)
        d.key_lines[key] = _pos(k_node.start_mark)
        d.value_lines[key] = _pos(v_node.start_mark)
    return d


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _LList:
    lst = _LList(loader.construct_object(n, deep=True) for n in node.value)
    lst.line = _pos(node.start_mark)
    lst.item_lines = [_pos(n.start_mark) for n in node.value]
    return lst


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


# ------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class RuleIssue:
    """One validation problem: file, 1-based line (and column where known), rule label and message.

    ``severity`` is ``error`` (the file cannot go live) or ``warning`` (it can, but something
    will not work as written on this node: see :mod:`node.rules_admin`)."""

    message: str
    line: int | None = None
    rule: str | None = None
    """``name`` of the rule, or ``#3`` (1-based position) when it has no usable name."""
    path: str | None = None
    column: int | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = self.path or "<rules>"
        if self.line:
            where += f":{self.line}"
        who = f" rule {self.rule!r}:" if self.rule and not self.rule.startswith("#") else (
            f" rule {self.rule}:" if self.rule else ""
        )
        return f"{where}:{who} {self.message}"


class RulesError(InputError):
    """A routing rule file is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[RuleIssue], path: str | Path | None = None) -> None:
        self.issues = list(issues)
        first = str(self.issues[0]) if self.issues else "invalid routing rules"
        more = f" (and {len(self.issues) - 1} more error(s))" if len(self.issues) > 1 else ""
        super().__init__(first + more)
        self.path = str(path) if path is not None else None


# -------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Rule:
    """One routing rule as loaded.

    File format (``routing_rules.yaml``)::

        rules:                      # ordered; a bare top-level list is accepted too
          - name: body-ct-bones     # required, unique
            match:                  # required; a mapping is an implicit ``all``
              Modality: CT
              SeriesDescription: {regex: "(?i)body|bone"}
            profile: bones          # required: organ profile name
            backend: null           # optional: a backend of node.backend_registry (hu_based, nnunet, ...)
            destinations: [pacs]    # optional (default []): names from node.yaml or ``origin``
            share: true             # optional (default true)
            stop: true              # optional (default true): first match wins
            enabled: true           # optional (default true)
            supersede: true         # optional (default true): late instances start a new job
            early_start: true       # optional (default true): may start before the quiet period ends
                                    #   (node.yaml early_start_s); false for senders that trickle
            description: "..."      # optional free text
            outputs: [seg, sr, overlay, stl]   # optional (default [seg]): the result objects
            overlay:                # optional, with ``overlay`` in outputs
              style: fill           #   fill (translucent, default) | outline
              opacity: 0.4          #   of the fill, 0.1..1
              window: [40, 400]     #   [centre, width] HU (default: the source's, else 40/400)
              jpeg: true            #   JPEG baseline where the destination takes it (default)
              series_description: "OVERLAY {profile} {SeriesDescription}"   # template
    """

    name: str
    match: Condition
    profile: str
    backend: str | None = None
    destinations: tuple[str, ...] = ()
    share: bool = True
    stop: bool = True
    enabled: bool = True
    supersede: bool = True
    early_start: bool = True
    description: str = ""
    outputs: OutputOptions = field(default_factory=OutputOptions)
    line: int | None = None
    index: int = 0
    """0-based position in the file."""
    where: dict[str, tuple[int, int | None]] = field(default_factory=dict, compare=False, repr=False)
    """(line, column) of each key's value in the file, for messages about them."""


@dataclass(frozen=True)
class RuleEvaluation:
    """What happened to one rule while routing a series.

    ``status`` is ``matched``, ``not_matched``, ``disabled`` (rule has
    ``enabled: false``) or ``skipped`` (an earlier rule matched with ``stop``).
    Disabled and skipped rules are still evaluated so that ``would_match`` and
    ``reason`` show what they would have done.
    """

    rule: Rule
    status: str
    would_match: bool
    reason: str


@dataclass
class RoutingDecision:
    """The outcome of :meth:`RuleSet.route` for one series."""

    series_instance_uid: str
    rules_version: str
    evaluations: list[RuleEvaluation] = field(default_factory=list)

    @property
    def matched(self) -> list[Rule]:
        """Rules that apply, in file order (each is one job: profile/backend/destinations)."""
        return [e.rule for e in self.evaluations if e.status == "matched"]

    @property
    def unrouted(self) -> bool:
        """True when no rule matched: keep the series and mark it unrouted."""
        return not self.matched

    def explain(self) -> list[str]:
        """One line per rule plus the decision, as printed by ``dicom-node rules test``."""
        lines = []
        labels = {
            "matched": "MATCHED",
            "not_matched": "not matched",
            "disabled": "disabled",
            "skipped": "skipped",
        }
        for e in self.evaluations:
            lines.append(f"  [{labels[e.status]}] {e.rule.name} (line {e.rule.line}): {e.reason}")
        if self.unrouted:
            lines.append("  decision: UNROUTED (no rule matched)")
        else:
            for r in self.matched:
                lines.append(
                    f"  decision: rule {r.name!r} -> profile={r.profile} "
                    f"backend={r.backend or 'default'} "
                    f"destinations=[{', '.join(r.destinations)}] share={str(r.share).lower()} "
                    f"supersede={str(r.supersede).lower()} early_start={str(r.early_start).lower()}"
                    + (f" outputs=[{', '.join(r.outputs.kinds)}]" if r.outputs != OutputOptions() else "")
                )
        return lines


@dataclass(frozen=True)
class RuleSet:
    """An ordered, validated list of rules loaded from one file."""

    rules: tuple[Rule, ...]
    version: str
    """The file's :func:`rules_version`."""
    path: str | None = None
    mtime_ns: int | None = None

    def __len__(self) -> int:
        return len(self.rules)

    def keywords(self) -> set[str]:
        """DICOM keywords the rules test (what the store must keep per instance)."""
        out: set[str] = set()

        def walk(c: Condition) -> None:
            if isinstance(c, FieldCondition):
                if c.field not in FACT_FIELDS and c.field not in ASSOCIATION_FIELDS:
                    out.add(c.field)
            elif isinstance(c, (AllOf, AnyOf)):
                for ch in c.children:
                    walk(ch)
            elif isinstance(c, Not):
                walk(c.child)

        for r in self.rules:
            walk(r.match)
        return out

    def route(self, series: SeriesFacts) -> RoutingDecision:
        """Evaluate every rule in order and decide which apply.

        A disabled rule never applies.  Once a rule applies and has ``stop: true``,
        every later rule is ``skipped``.  No applying rule means ``unrouted``.
        """
        decision = RoutingDecision(series.series_instance_uid, self.version)
        stopped_by: Rule | None = None
        for rule in self.rules:
            out = rule.match.evaluate(series)
            if stopped_by is not None:
                hint = " (would have matched)" if out.matched else ""
                decision.evaluations.append(RuleEvaluation(
                    rule, "skipped", out.matched,
                    f"rule {stopped_by.name!r} matched with stop: true{hint}; {out.reason}",
                ))
                continue
            if not rule.enabled:
                hint = "would have matched" if out.matched else "would not match"
                decision.evaluations.append(
                    RuleEvaluation(rule, "disabled", out.matched, f"enabled: false ({hint}: {out.reason})")
                )
                continue
            status = "matched" if out.matched else "not_matched"
            decision.evaluations.append(RuleEvaluation(rule, status, out.matched, out.reason))
            if out.matched and rule.stop:
                stopped_by = rule
        return decision


# ------------------------------------------------------------------------- parser


class _AnyField(dict[str, str]):
    """format_map() argument that accepts every field (checks a template's syntax only)."""

    def __missing__(self, key: str) -> str:
        return ""


def _suggest(word: str, candidates: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.75)
    if not close:
        close = difflib.get_close_matches(word.lower(), [c.lower() for c in candidates], n=1, cutoff=0.9)
        if close:
            close = [c for c in candidates if c.lower() == close[0]][:1]
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


_dicom_keywords: list[str] | None = None


def _all_keywords() -> list[str]:
    global _dicom_keywords
    if _dicom_keywords is None:
        from pydicom.datadict import keyword_dict

        _dicom_keywords = sorted(k for k in keyword_dict if k)
    return _dicom_keywords


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) and v is not None


class _Parser:
    def __init__(self, path: str | None, known_profiles: set[str] | None,
                 known_destinations: set[str] | None) -> None:
        self.path = path
        self.known_profiles = set(known_profiles) if known_profiles is not None else None
        self.known_destinations = set(known_destinations) if known_destinations is not None else None
        self.issues: list[RuleIssue] = []
        self.rule_label: str | None = None

    def err(self, message: str, line: int | None) -> None:
        col = getattr(line, "col", None)
        self.issues.append(RuleIssue(message, None if line is None else int(line), self.rule_label, self.path, col))

    # -- file ---------------------------------------------------------------

    def parse_file(self, data: Any) -> list[Rule]:
        if data is None:
            self.err("the file is empty; expected a 'rules:' list", 1)
            return []
        if isinstance(data, _LDict):
            unknown = [k for k in data if k != "rules"]
            for k in unknown:
                self.err(f"unknown top-level key {k!r} (allowed: rules)", data.key_lines.get(k))
            if "rules" not in data:
                self.err("missing top-level 'rules:' list", data.line)
                return []
            rules_node = data["rules"]
            if rules_node is None:
                rules_node = _LList()
                rules_node.line = data.key_lines["rules"]
                rules_node.item_lines = []
            if not isinstance(rules_node, _LList):
                self.err("'rules' must be a list of rules", data.key_lines["rules"])
                return []
        elif isinstance(data, _LList):
            rules_node = data
        else:
            self.err("expected a 'rules:' list of rules at the top level", 1)
            return []

        rules: list[Rule] = []
        names: dict[str, int | None] = {}
        for idx, (item, line) in enumerate(zip(rules_node, rules_node.item_lines)):
            rule = self.parse_rule(item, idx, line, names)
            if rule is not None:
                rules.append(rule)
        self.rule_label = None
        return rules

    # -- rule ---------------------------------------------------------------

    def parse_rule(self, item: Any, idx: int, line: int, names: dict[str, int | None]) -> Rule | None:
        self.rule_label = f"#{idx + 1}"
        if not isinstance(item, _LDict):
            self.err("a rule must be a mapping with name, match, profile, ...", line)
            return None
        kl = item.key_lines
        n_issues = len(self.issues)

        name = item.get("name")
        if isinstance(name, str) and name.strip():
            name = name.strip()
            self.rule_label = name
            if name in names:
                self.err(f"duplicate rule name {name!r} (first defined at line {names[name]})", kl["name"])
            else:
                names[name] = item.line
        elif "name" in item:
            hint = " (quote it: YAML reads yes/no/on/off/true/false as booleans)" \
                if isinstance(name, bool) else ""
            self.err(f"'name' must be a non-empty string{hint}", kl["name"])

        for k in item:
            if k not in RULE_KEYS:
                self.err(f"unknown key {k!r}{_suggest(str(k), RULE_KEYS)}; allowed keys: "
                         + ", ".join(RULE_KEYS), kl[k])
        for k in REQUIRED_KEYS:
            if k not in item:
                self.err(f"missing required field {k!r}", item.line)

        match: Condition | None = None
        if "match" in item:
            m = item["match"]
            mline = kl["match"]
            if isinstance(m, _LDict):
                match = AllOf(tuple(self.parse_mapping(m)), line=mline)
            elif isinstance(m, _LList):
                match = AllOf(tuple(self.parse_list_items(m, "match")), line=mline)
            else:
                self.err("'match' must be a mapping of conditions (use {} to match every series)", mline)

        profile = item.get("profile")
        if "profile" in item:
            if not isinstance(profile, str) or not profile.strip():
                self.err("'profile' must be a profile name", kl["profile"])
            else:
                profile = profile.strip()
                if self.known_profiles is not None and profile not in self.known_profiles:
                    self.err(f"unknown profile {profile!r}{_suggest(profile, self.known_profiles)}; known: "
                             + (", ".join(sorted(self.known_profiles)) or "none"), item.value_lines["profile"])

        backend = item.get("backend")
        if backend is not None and backend not in BACKEND_NAMES:
            self.err(f"unknown backend {backend!r}{_suggest(str(backend), BACKEND_NAMES)}; allowed: "
                     + ", ".join(BACKEND_NAMES), item.value_lines["backend"])

        dests: list[str] = []
        if "destinations" in item:
            d = item["destinations"]
            dline = kl["destinations"]
            if d is None:
                d = []
            if isinstance(d, str):
                d = [d]
            if not isinstance(d, list) or not all(isinstance(x, str) and x.strip() for x in d):
                self.err("'destinations' must be a list of destination names (or 'origin')", dline)
            else:
                lines = getattr(d, "item_lines", [dline] * len(d))
                for x, xl in zip(d, lines):
                    x = x.strip()
                    if (x != ORIGIN and self.known_destinations is not None
                            and x not in self.known_destinations):
                        known = sorted(self.known_destinations | {ORIGIN})
                        self.err(f"unknown destination {x!r}{_suggest(x, known)}; known: "
                                 + ", ".join(known), xl)
                    if x not in dests:
                        dests.append(x)

        flags = {}
        for k, default in (("share", True), ("stop", True), ("enabled", True), ("supersede", True),
                           ("early_start", True)):
            v = item.get(k, default)
            if not isinstance(v, bool):
                self.err(f"{k!r} must be true or false, not {v!r}", kl.get(k))
                v = default
            flags[k] = v
        desc = item.get("description", "")
        if desc is None:
            desc = ""
        if not isinstance(desc, str):
            self.err("'description' must be text", kl.get("description"))

        outputs = self.parse_outputs(item)

        if len(self.issues) != n_issues or match is None or not isinstance(name, str) or not isinstance(profile, str) \
                or outputs is None:
            return None
        return Rule(
            name=name, match=match, profile=profile, backend=backend, destinations=tuple(dests),
            description=str(desc), outputs=outputs, line=int(item.line), index=idx, **flags,
            where={str(k): (int(v), getattr(v, "col", None)) for k, v in item.value_lines.items()},
        )

    # -- outputs ------------------------------------------------------

    def parse_outputs(self, item: _LDict) -> OutputOptions | None:
        """``outputs:`` and ``overlay:`` of a rule; None (with issues recorded) when invalid."""
        kl = item.key_lines
        ok = True
        kinds: list[str] = list(DEFAULT_OUTPUTS)
        if "outputs" in item:
            v = item["outputs"]
            line = kl["outputs"]
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not v:
                self.err("'outputs' must be a list of: " + ", ".join(OUTPUT_KINDS), line)
                return None
            lines = getattr(v, "item_lines", [line] * len(v))
            kinds = []
            for x, xl in zip(v, lines):
                if x not in OUTPUT_KINDS:
                    self.err(f"unknown output {x!r}{_suggest(str(x), OUTPUT_KINDS)}; allowed: "
                             + ", ".join(OUTPUT_KINDS), xl)
                    ok = False
                elif x not in kinds:
                    kinds.append(x)
            if "sr" in kinds and "seg" not in kinds:
                self.err("output 'sr' references the SEG's segments: list 'seg' too", line)
                ok = False
        style = OverlayStyle()
        description = OutputOptions().overlay_series_description
        if "overlay" in item:
            ov = item["overlay"]
            line = kl["overlay"]
            if "overlay" not in kinds:
                self.err("'overlay' options without 'overlay' in outputs", line)
                ok = False
            if not isinstance(ov, _LDict):
                self.err("'overlay' must be a mapping: " + ", ".join(OVERLAY_KEYS), line)
                return None
            ol = ov.key_lines
            for k in ov:
                if k not in OVERLAY_KEYS:
                    self.err(f"overlay: unknown key {k!r}{_suggest(str(k), OVERLAY_KEYS)}; allowed: "
                             + ", ".join(OVERLAY_KEYS), ol.get(k, line))
                    ok = False
            mode = ov.get("style", "fill")
            if mode not in OVERLAY_MODES:
                self.err(f"overlay.style must be one of {', '.join(OVERLAY_MODES)}, not {mode!r}", ol.get("style"))
                ok = False
            opacity = ov.get("opacity", 0.4)
            if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0.1 <= opacity <= 1:
                self.err(f"overlay.opacity must be a number 0.1..1, not {opacity!r}", ol.get("opacity"))
                ok = False
            window = ov.get("window")
            if window is not None and not (
                    isinstance(window, list) and len(window) == 2
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in window)
                    and window[1] > 1):
                self.err(f"overlay.window must be [centre, width] in HU (width > 1), not {window!r}",
                         ol.get("window"))
                ok = False
            jpeg = ov.get("jpeg", True)
            if not isinstance(jpeg, bool):
                self.err(f"overlay.jpeg must be true or false, not {jpeg!r}", ol.get("jpeg"))
                ok = False
            description = ov.get("series_description", description)
            if not isinstance(description, str) or not description.strip():
                self.err("overlay.series_description must be a text template", ol.get("series_description"))
                ok = False
            else:
                try:
                    description.format_map(_AnyField())
                except (ValueError, IndexError) as exc:
                    self.err(f"overlay.series_description: bad template ({exc})", ol.get("series_description"))
                    ok = False
            if ok:
                style = OverlayStyle(mode=mode, opacity=float(opacity), jpeg=jpeg,
                                     window=(float(window[0]), float(window[1])) if window else None)
        if not ok:
            return None
        return OutputOptions(tuple(kinds), style, description)

    # -- conditions ---------------------------------------------------------

    def parse_list_items(self, lst: _LList, what: str) -> list[Condition]:
        out: list[Condition] = []
        for it, ln in zip(lst, lst.item_lines):
            if isinstance(it, _LDict):
                conds = self.parse_mapping(it)
                out.append(conds[0] if len(conds) == 1 else AllOf(tuple(conds), line=ln))
            else:
                self.err(f"each entry of {what!r} must be a mapping of conditions, not {it!r}", ln)
        return out

    def parse_mapping(self, m: _LDict) -> list[Condition]:
        out: list[Condition] = []
        for key, val in m.items():
            line = m.key_lines[key]
            if not isinstance(key, str):
                self.err(f"condition key {key!r} must be a DICOM keyword, fact or all/any/not", line)
                continue
            if key in ("all", "any"):
                if not isinstance(val, _LList) or not val:
                    self.err(f"'{key}' must be a non-empty list of condition mappings", line)
                    continue
                children = tuple(self.parse_list_items(val, key))
                out.append(AllOf(children, line=line) if key == "all" else AnyOf(children, line=line))
            elif key == "not":
                if isinstance(val, _LDict) and val:
                    conds = self.parse_mapping(val)
                    child = conds[0] if len(conds) == 1 else AllOf(tuple(conds), line=line)
                elif isinstance(val, _LList) and val:
                    child = AllOf(tuple(self.parse_list_items(val, key)), line=line)
                else:
                    self.err("'not' must be a non-empty mapping of conditions", line)
                    continue
                out.append(Not(child, line=line))
            else:
                if not self.check_field(key, line):
                    continue
                op = self.parse_operator(key, val, line)
                if op is not None:
                    out.append(FieldCondition(key, op, line=line))
        return out

    def check_field(self, key: str, line: int) -> bool:
        if key in FACT_FIELDS or key in ASSOCIATION_FIELDS:
            return True
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        tag = tag_for_keyword(key)
        if tag is None:
            cands = _all_keywords() + list(FACT_FIELDS) + list(ASSOCIATION_FIELDS) + list(COMBINATORS)
            self.err(f"unknown DICOM keyword or fact {key!r}{_suggest(key, cands)}", line)
            return False
        vr = dictionary_VR(tag)
        if not rule_visible(key):
            self.err(f"{key!r} is a {vr} attribute (sequence or binary); rules can only test "
                     "plain-valued attributes", line)
            return False
        return True

    def parse_operator(self, fld: str, val: Any, line: int) -> Operator | None:
        if isinstance(val, _LList):
            if not val or not all(_is_scalar(v) for v in val):
                self.err(f"{fld}: a list means one_of and needs plain values", line)
                return None
            return self.check_enum(fld, OneOf(tuple(val)), line)
        if not isinstance(val, _LDict):
            if not _is_scalar(val):
                hint = "no value given; use {exists: false} or {not_empty: false} to test absence" \
                    if val is None else f"unsupported value {val!r}; quote it"
                self.err(f"{fld}: {hint}", line)
                return None
            return self.check_enum(fld, Equals(val), line)

        bad = [k for k in val if k not in OPERATORS and k not in OPTION_KEYS]
        for k in bad:
            self.err(f"{fld}: unknown operator {k!r}{_suggest(str(k), OPERATORS + OPTION_KEYS)}; "
                     "allowed: " + ", ".join(OPERATORS + OPTION_KEYS), val.key_lines.get(k, line))
        if bad:
            return None
        ops = [k for k in val if k in OPERATORS]
        kinds = {("range" if k in ("min", "max") else k) for k in ops}
        if len(kinds) != 1 or ("range" in ops and ({"min", "max"} & set(ops))):
            self.err(f"{fld}: give exactly one operator (got {', '.join(ops) or 'none'})", line)
            return None
        kind = kinds.pop()
        ic = val.get("ignore_case", False)
        if "ignore_case" in val:
            if kind not in _CASE_OPS:
                self.err(f"{fld}: ignore_case only applies to " + ", ".join(_CASE_OPS), line)
                return None
            if not isinstance(ic, bool):
                self.err(f"{fld}: ignore_case must be true or false", line)
                return None
        arg = val.get(kind)
        if kind == "equals":
            if not _is_scalar(arg):
                self.err(f"{fld}: equals needs a plain value, not {arg!r}", line)
                return None
            return self.check_enum(fld, Equals(arg, ic), line)
        if kind == "one_of":
            if not isinstance(arg, list) or not arg or not all(_is_scalar(v) for v in arg):
                self.err(f"{fld}: one_of needs a non-empty list of plain values", line)
                return None
            return self.check_enum(fld, OneOf(tuple(arg), ic), line)
        if kind in ("regex", "glob"):
            if not isinstance(arg, str):
                self.err(f"{fld}: {kind} needs a string pattern, not {arg!r}", line)
                return None
            if kind == "glob":
                return Glob(arg, ic)
            try:
                return Regex(arg, ic)
            except re.error as exc:
                self.err(f"{fld}: bad regex {arg!r}: {exc}", line)
                return None
        if kind in ("exists", "not_empty"):
            if not isinstance(arg, bool):
                self.err(f"{fld}: {kind} must be true or false", line)
                return None
            return Exists(arg) if kind == "exists" else NotEmpty(arg)
        # range
        if "range" in val:
            r = val["range"]
            if not isinstance(r, list) or len(r) != 2:
                self.err(f"{fld}: range needs [min, max] (null for an open end)", line)
                return None
            lo, hi = r
        else:
            lo, hi = val.get("min"), val.get("max")
        for b in (lo, hi):
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))):
                self.err(f"{fld}: range bounds must be numbers or null, not {b!r}", line)
                return None
        if lo is None and hi is None:
            self.err(f"{fld}: range needs at least one bound", line)
            return None
        if lo is not None and hi is not None and lo > hi:
            self.err(f"{fld}: range minimum {lo} is above maximum {hi}", line)
            return None
        return Range(None if lo is None else float(lo), None if hi is None else float(hi))

    def check_enum(self, fld: str, op: Equals | OneOf, line: int) -> Operator | None:
        if fld == "orientation":
            values = op.values if isinstance(op, OneOf) else (op.value,)
            for v in values:
                if str(v).strip().lower() not in ORIENTATIONS:
                    self.err(f"orientation: {v!r} is not one of " + ", ".join(ORIENTATIONS), line)
                    return None
        return op


# ------------------------------------------------------------------------ loading


def rules_version(source: str | Path | bytes) -> str:
    """The version of a rule file (a path, or its bytes): the first 16 hex digits of the SHA-256 of
    its bytes.  Jobs carry it, and a SEG's identity derives from it."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def parse_rules(
    data: bytes | str,
    path: str | Path | None = None,
    *,
    known_profiles: Iterable[str] | None = None,
    known_destinations: Iterable[str] | None = None,
    mtime_ns: int | None = None,
) -> RuleSet:
    """Parse and validate rule text; raises :class:`RulesError` listing every problem."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    spath = str(path) if path is not None else None
    version = rules_version(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([RuleIssue(f"not UTF-8 text: {exc}", None, None, spath)], spath) from None
    try:
        doc = _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        col = mark.column + 1 if mark is not None else None
        what = exc.problem or str(exc)
        if exc.context:
            what = f"{exc.context}, {what}"
        label = "YAML error" if isinstance(exc, (_DuplicateKey, _TooComplex)) else "YAML syntax error"
        raise RulesError([RuleIssue(f"{label}: {what}", line, None, spath, col)], spath) from None
    except yaml.YAMLError as exc:
        raise RulesError([RuleIssue(f"YAML syntax error: {exc}", None, None, spath)], spath) from None
    parser = _Parser(spath, set(known_profiles) if known_profiles is not None else None,
                     set(known_destinations) if known_destinations is not None else None)
    rules = parser.parse_file(doc)
    if parser.issues:
        raise RulesError(parser.issues, spath)
    return RuleSet(tuple(rules), version, spath, mtime_ns)


def load_rules(
    path: str | Path,
    *,
    known_profiles: Iterable[str] | None = None,
    known_destinations: Iterable[str] | None = None,
) -> RuleSet:
    """Load and validate a rule file.

    Args:
        path: the YAML file.
        known_profiles: profile names that exist; unknown ones are errors (not checked if ``None``).
        known_destinations: destination names from node.yaml; ``origin`` is always allowed.

    Raises:
        RulesError: with every problem (file, line, rule) in ``issues``.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
        mtime = p.stat().st_mtime_ns
    except OSError as exc:
        raise RulesError([RuleIssue(f"cannot read rule file: {exc.strerror or exc}", None, None, str(p))],
                         p) from None
    return parse_rules(raw, p, known_profiles=known_profiles,
                       known_destinations=known_destinations, mtime_ns=mtime)


# --------------------------------------------------------------------- hot reload

NamesArg = Iterable[str] | Callable[[], Iterable[str]] | None


def _names(arg: NamesArg) -> set[str] | None:
    if arg is None:
        return None
    return set(arg() if callable(arg) else arg)


class RuleSetHolder:
    """Keeps the active :class:`RuleSet` and reloads it when the file changes.

    The initial load must succeed (raises :class:`RulesError`).  Afterwards
    :meth:`reload_if_changed` (called periodically by the scheduler) swaps in the
    new rules only if the edited file is valid; a broken edit keeps the previous
    rules active and is reported (logged once per broken file content).

    ``known_profiles`` / ``known_destinations`` may be sets or callables returning
    them (re-read on every reload).  ``on_change(ruleset)`` is called after a swap.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        known_profiles: NamesArg = None,
        known_destinations: NamesArg = None,
        on_change: Callable[[RuleSet], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._known_profiles = known_profiles
        self._known_destinations = known_destinations
        self._on_change = on_change
        self._lock = threading.Lock()
        self._ruleset = self._load()
        self._bad_version: str | None = None
        self.last_error: str | None = None

    def _load(self, raw: bytes | None = None, mtime: int | None = None) -> RuleSet:
        if raw is None:
            return load_rules(self.path, known_profiles=_names(self._known_profiles),
                              known_destinations=_names(self._known_destinations))
        return parse_rules(raw, self.path, known_profiles=_names(self._known_profiles),
                           known_destinations=_names(self._known_destinations), mtime_ns=mtime)

    @property
    def ruleset(self) -> RuleSet:
        """The active rules."""
        return self._ruleset

    def route(self, series: SeriesFacts) -> RoutingDecision:
        return self._ruleset.route(series)

    def reload_if_changed(self) -> tuple[bool, str | None]:
        """Reload if the file's content changed.

        Returns ``(changed, error)``: ``(True, None)`` after swapping in new rules,
        ``(False, None)`` when nothing changed, ``(False, message)`` when the file is
        unreadable or invalid (the previous rules stay active).
        """
        with self._lock:
            try:
                st = os.stat(self.path)
                raw = self.path.read_bytes()
            except OSError as exc:
                msg = f"{self.path}: cannot read rule file ({exc.strerror or exc}); keeping previous rules"
                return False, self._report(msg, "unreadable")
            version = rules_version(raw)
            current = self._ruleset
            if version == current.version:
                if current.mtime_ns != st.st_mtime_ns:
                    self._ruleset = RuleSet(current.rules, current.version, current.path, st.st_mtime_ns)
                self._bad_version = None
                self.last_error = None
                return False, None
            try:
                new = self._load(raw, st.st_mtime_ns)
            except RulesError as exc:
                lines = "; ".join(str(i) for i in exc.issues)
                msg = f"routing rules not reloaded, keeping version {current.version[:12]}: {lines}"
                return False, self._report(msg, version)
            self._ruleset = new
            self._bad_version = None
            self.last_error = None
        log.info("routing rules reloaded from %s: %d rule(s), version %s",
                 self.path, len(new), new.version[:12])
        if self._on_change is not None:
            self._on_change(new)
        return True, None

    def _report(self, msg: str, key: str) -> str:
        if self._bad_version != key:
            log.warning("%s", msg)
            self._bad_version = key
        self.last_error = msg
        return msg
