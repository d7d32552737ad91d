"""Rule administration: the node's live routing rule file checked against the node it runs on,
changed only through validated, atomic applies, every applied version kept in the store.

* :func:`validate_text` checks a rule file against the node (``node.yaml``'s destinations and known
  AEs, the profiles folder, the backends installed here) and reports every problem at once, each
  at its line and column, errors (the file cannot go live) and warnings (it can, but part of it
  will not work as written here).
* :class:`RulesAdmin` shows the live file with its version, applies a new text (validate, write
  tmp + fsync + rename, record who/when/why in ``rule_versions``), rolls back to a recorded
  version, reorders rules and turns a rule off or on; the running node picks the file up with its
  hot reload (``rules-reload``, node/service.py), or at once through ``on_applied``.
* :func:`reorder_text` / :func:`set_enabled_text` change the text of the file in place (comments
  and layout kept), so what is applied is still the operator's file.

Dry runs of a draft are in :mod:`node.rules_dryrun`.
"""

from __future__ import annotations

import difflib
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from node.backend_registry import BACKEND_NAMES
from node.config import NodeConfig
from node.durable import atomic_open
from node.errors import InputError, NodeError
from node.profiles import list_profiles, load_profile
from node.routing.rules import (
    ORIGIN,
    RuleIssue,
    RuleSet,
    RulesError,
    _LDict,
    _load_yaml,
    _LList,
    parse_rules,
    rules_version,
)
from node.store import RuleVersion, Store

__all__ = [
    "NotFound", "NodeNames", "Validation", "RulesInvalid", "RulesConflict", "LiveRules", "ApplyOutcome",
    "HistoryEntry", "RulesAdmin", "node_names", "validate_text", "reorder_text", "set_enabled_text",
    "move_text", "rule_block", "replace_rule_text",
    "unified_diff", "format_issue",
]

#: ``applied_by`` of a version found on disk that the console did not write (edited by hand)
FOUND_BY = "(outside the console)"


# ------------------------------------------------------------------------ the node's names


@dataclass(frozen=True)
class NodeNames:
    """What a rule may name on this node."""

    profiles: frozenset[str]
    destinations: frozenset[str]
    known_aes: frozenset[str]
    profiles_dir: str
    source: str
    """Where they came from: the node.yaml path, or ``embedded defaults``."""

    def describe(self) -> str:
        return (f"{self.source}: profiles {', '.join(sorted(self.profiles)) or 'none'} ({self.profiles_dir}); "
                f"destinations {', '.join(sorted(self.destinations | {ORIGIN}))}; "
                f"backends {', '.join(BACKEND_NAMES)}")


def node_names(config: NodeConfig) -> NodeNames:
    """The profiles, destinations and known AEs of the node that ``config`` describes."""
    return NodeNames(
        profiles=frozenset(list_profiles(config.profiles)) if Path(config.profiles).is_dir() else frozenset(),
        destinations=frozenset(config.destinations),
        known_aes=frozenset(config.known_aes),
        profiles_dir=str(config.profiles),
        source=str(config.config_path) if config.config_path else "embedded defaults",
    )


# ------------------------------------------------------------------------------ validation


def format_issue(issue: RuleIssue) -> str:
    """``file:line:col: rule 'x': message``, as the CLI prints it (after ERROR or WARNING)."""
    where = issue.path or "<rules>"
    if issue.line:
        where += f":{issue.line}"
        if issue.column:
            where += f":{issue.column}"
    rest = str(RuleIssue(issue.message, None, issue.rule, None)).split(":", 1)[1]
    return f"{where}:{rest}"


@dataclass(frozen=True)
class Validation:
    """The outcome of :func:`validate_text`: every issue (errors and warnings, in file order)."""

    version: str
    issues: tuple[RuleIssue, ...]
    ruleset: RuleSet | None
    checked_against: str

    @property
    def errors(self) -> list[RuleIssue]:
        return [i for i in self.issues if i.severity != "warning"]

    @property
    def warnings(self) -> list[RuleIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when the file may go live (warnings allowed)."""
        return self.ruleset is not None and not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "version": self.version,
            "rules": len(self.ruleset) if self.ruleset is not None else None,
            "checked_against": self.checked_against,
            "issues": [{"severity": i.severity, "line": i.line, "column": i.column, "rule": i.rule,
                        "message": i.message, "text": format_issue(i)} for i in self.issues],
        }


def _node_checks(rs: RuleSet, config: NodeConfig | None, names: NodeNames, path: str | None,
                 check_backends: bool) -> list[RuleIssue]:
    """What the parser cannot see: profiles that exist but do not load, backends not installed
    here, ``origin`` without known AEs, rules no series can reach."""
    out: list[RuleIssue] = []

    def issue(rule: Any, key: str | None, message: str, severity: str) -> None:
        line, col = rule.where.get(key, (rule.line, None)) if key else (rule.line, None)
        out.append(RuleIssue(message, line, rule.name, path, col, severity))

    loaded: dict[str, Any] = {}
    for rule in rs.rules:
        if rule.profile not in loaded:
            try:
                loaded[rule.profile] = load_profile(rule.profile, names.profiles_dir)
            except NodeError as exc:
                loaded[rule.profile] = exc
        prof = loaded[rule.profile]
        if isinstance(prof, NodeError):
            issue(rule, "profile", f"profile {rule.profile!r} cannot be loaded: {prof}", "error")
            continue
        if check_backends:
            from node.pipeline.backends import check_profile

            backend = rule.backend or prof.model_type
            problem = check_profile(prof, backend)
            if problem:
                # its first sentence; `dicom-node profiles validate` prints the whole install hint
                problem = problem.split(". ")[0].split(": expected")[0][:200] + \
                    " (dicom-node profiles validate says how to install it)"
                what = (f"its jobs are refused here ({prof.refuse_without_backend.strip()})"
                        if prof.refuse_without_backend else "its jobs will fail here")
                issue(rule, "backend" if rule.backend else "profile",
                      f"backend {backend!r} for profile {rule.profile!r} is not usable on this node: {problem}; {what}",
                      "warning")
        if ORIGIN in rule.destinations and not names.known_aes:
            issue(rule, "destinations", "destination 'origin' sends results back to the calling AE, but node.yaml "
                  "has no known_aes: nothing will be sent", "warning")
    stopper = None
    for rule in rs.rules:
        if stopper is not None:
            out.append(RuleIssue(f"never reached: rule {stopper.name!r} (line {stopper.line}) matches every series "
                                 "and has stop: true", rule.line, rule.name, path, None, "warning"))
            continue
        if rule.enabled and rule.stop and not getattr(rule.match, "children", True):
            stopper = rule
    if rs.rules and not any(r.enabled for r in rs.rules):
        out.append(RuleIssue("every rule is disabled: every series will be unrouted", 1, None, path, None, "warning"))
    return out


def validate_text(
    text: str | bytes,
    config: NodeConfig | None = None,
    *,
    path: str | Path | None = None,
    names: NodeNames | None = None,
    profiles: Iterable[str] | None = None,
    destinations: Iterable[str] | None = None,
    check_backends: bool = True,
) -> Validation:
    """Check rule text against the node: by default the node ``config`` describes (embedded
    defaults when ``None``); ``profiles`` / ``destinations`` replace its names (the CLI's flags).

    Never raises for a bad file: the problems are in :attr:`Validation.issues`.
    """
    if names is None:
        names = node_names(config if config is not None else _default_config())
    if profiles is not None or destinations is not None:
        names = NodeNames(frozenset(profiles) if profiles is not None else names.profiles,
                          frozenset(destinations) if destinations is not None else names.destinations,
                          names.known_aes, names.profiles_dir, names.source + " (names given)")
    raw = text.encode("utf-8") if isinstance(text, str) else text
    spath = str(path) if path is not None else None
    version = rules_version(raw)
    try:
        rs = parse_rules(raw, spath, known_profiles=names.profiles, known_destinations=names.destinations)
    except RulesError as exc:
        return Validation(version, tuple(sorted(exc.issues, key=_order)), None, names.describe())
    extra = _node_checks(rs, config, names, spath, check_backends)
    issues = sorted(extra, key=_order)
    bad = any(i.severity != "warning" for i in issues)
    return Validation(version, tuple(issues), None if bad else rs, names.describe())


def _order(issue: RuleIssue) -> tuple[int, int]:
    return (issue.line or 0, issue.column or 0)


def _default_config() -> NodeConfig:
    from node.config import load_config

    return load_config(None)


# ----------------------------------------------------------------------- text changes


def _parse_tree(text: str) -> tuple[_LList, list[str]]:
    try:
        doc = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise InputError(f"the rule file is not valid YAML ({exc}); fix it first") from None
    rules = doc.get("rules") if isinstance(doc, _LDict) else doc
    if not isinstance(rules, _LList):
        raise InputError("the rule file has no 'rules:' list")
    return rules, text.splitlines(keepends=True)


class NotFound(InputError):
    """No rule of that name, or no recorded version of that id/hash."""


def _rule_index(rules: _LList, name: str) -> int:
    names = [r.get("name") if isinstance(r, _LDict) else None for r in rules]
    if name not in names:
        close = difflib.get_close_matches(name, [str(n) for n in names if n], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise NotFound(f"no rule named {name!r}{hint}")
    return names.index(name)


def _blocks(rules: _LList, lines: list[str]) -> tuple[int, list[list[str]]]:
    """The text of each rule (its dash line to the next rule's, with the comment lines right above
    it) and the index of the first block's first line."""
    starts: list[int] = []
    for ln in rules.item_lines:
        i = int(ln) - 1
        while i > 0 and not lines[i].lstrip().startswith("-"):
            i -= 1  # "-" alone on its line, the mapping below it
        starts.append(i)
    if len(set(starts)) != len(starts) or any(b <= a for a, b in zip(starts, starts[1:])):
        raise InputError("the rules are written in flow style ([{...}, {...}]); edit the whole file instead")
    begins = []
    for s in starts:
        b = s
        while b > 0 and lines[b - 1].lstrip().startswith("#"):
            b -= 1  # a comment right above a rule goes with it
        begins.append(b)
    begins[0] = max(begins[0], 0)
    blocks = [lines[b:e] for b, e in zip(begins, begins[1:] + [len(lines)])]
    return begins[0], blocks


def _rule_span(text: str, name: str) -> tuple[list[str], int, int]:
    """The file's lines and the 0-based [start, end) of rule ``name``: its dash line to its last
    line of YAML (comments and blank lines around it excluded)."""
    rules, lines = _parse_tree(text)
    idx = _rule_index(rules, name)
    head, blocks = _blocks(rules, lines)
    start = head + sum(len(b) for b in blocks[:idx])
    block = blocks[idx]
    skip = 0
    while skip < len(block) and block[skip].lstrip().startswith("#"):
        skip += 1
    end = start + len(block)
    while end > start + skip and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1  # blank lines and comments after the rule stay where they are
    return lines, start + skip, end


def rule_block(text: str, name: str) -> tuple[int, str]:
    """The text of one rule as written in the file and its first line (1-based), for editing one rule."""
    lines, start, end = _rule_span(text, name)
    return start + 1, "".join(lines[start:end])


def replace_rule_text(text: str, name: str, block: str) -> str:
    """The file with rule ``name``'s text (as :func:`rule_block` gives it) replaced by ``block``."""
    lines, start, end = _rule_span(text, name)
    if block and not block.endswith("\n"):
        block += "\n"
    return "".join(lines[:start]) + block + "".join(lines[end:])


def reorder_text(text: str, order: list[str]) -> str:
    """The rule file with its rules in ``order`` (every rule name once); comments above a rule
    move with it, the header stays."""
    rules, lines = _parse_tree(text)
    names = [r.get("name") if isinstance(r, _LDict) else None for r in rules]
    if sorted(map(str, order)) != sorted(map(str, names)) or len(set(order)) != len(order):
        raise InputError(f"the new order must name every rule once: {', '.join(map(str, names))}")
    head, blocks = _blocks(rules, lines)
    sep = any(b and not b[-1].strip() for b in blocks[:-1])

    def trimmed(block: list[str]) -> list[str]:
        block = list(block)
        if block and not block[-1].endswith("\n"):
            block[-1] += "\n"
        while block and not block[-1].strip():
            block.pop()
        return block

    out = lines[:head]
    for k, name in enumerate(order):
        out += trimmed(blocks[names.index(name)])
        if sep and k < len(order) - 1:
            out.append("\n")
    return "".join(out)


def move_text(text: str, name: str, position: int) -> str:
    """The rule file with rule ``name`` moved to 1-based ``position``."""
    rules, _ = _parse_tree(text)
    names = [str(r.get("name")) if isinstance(r, _LDict) else "" for r in rules]
    idx = _rule_index(rules, name)
    if not 1 <= position <= len(names):
        raise InputError(f"position must be 1..{len(names)} (got {position})")
    names.insert(position - 1, names.pop(idx))
    return reorder_text(text, names)


def set_enabled_text(text: str, name: str, enabled: bool) -> str:
    """The rule file with ``enabled:`` of rule ``name`` set (the key added after ``name:`` when absent)."""
    import re

    rules, lines = _parse_tree(text)
    item = rules[_rule_index(rules, name)]
    value = "true" if enabled else "false"
    if "enabled" in item:
        ln = item.value_lines["enabled"]
        i, col = int(ln) - 1, (getattr(ln, "col", None) or 1) - 1
        line = lines[i]
        m = re.compile(r"""("[^"]*"|'[^']*'|[^\s#,}\]]+)""").match(line, col)
        if m is None:
            raise InputError(f"rule {name!r}: cannot read its 'enabled:' value at line {i + 1}")
        lines[i] = line[:m.start()] + value + line[m.end():]
        return "".join(lines)
    start = int(item.line) - 1
    col = (getattr(item.line, "col", None) or 1) - 1
    if lines[start][col:col + 1] == "{":  # - {name: x, ...}
        lines[start] = lines[start][:col + 1] + f"enabled: {value}, " + lines[start][col + 1:]
        return "".join(lines)
    kl = item.key_lines["name"]
    indent = (getattr(kl, "col", None) or 1) - 1
    vl = int(item.value_lines["name"])
    after = lines[vl - 1]
    if not after.endswith("\n"):
        lines[vl - 1] = after + "\n"
    lines.insert(vl, " " * indent + f"enabled: {value}\n")
    return "".join(lines)


def unified_diff(old: str, new: str, old_label: str, new_label: str) -> str:
    """A unified diff of two rule texts (empty when equal)."""
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=old_label, tofile=new_label))


# ----------------------------------------------------------------------------- the service


class RulesInvalid(InputError):
    """The text was not applied: it has errors (``validation`` holds them all)."""

    def __init__(self, validation: Validation) -> None:
        self.validation = validation
        errors = validation.errors
        super().__init__(f"not applied: {len(errors)} error(s); first: {format_issue(errors[0])}"
                         if errors else "not applied: invalid rules")


class RulesConflict(InputError):
    """The live file changed since the caller read it (``expected_version`` is not live)."""


@dataclass(frozen=True)
class LiveRules:
    """The rule file the node runs now."""

    path: str
    text: str
    version: str
    validation: Validation
    recorded: RuleVersion | None
    """The store's row for this version when the last recorded version is this one, else None
    (never applied through the console, or edited by hand since)."""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "text": self.text, "version": self.version,
                "validation": self.validation.to_json(),
                "recorded": _version_json(self.recorded) if self.recorded else None}


@dataclass(frozen=True)
class ApplyOutcome:
    """What :meth:`RulesAdmin.apply` did."""

    changed: bool
    version: RuleVersion | None
    """The recorded row of the new version (None when nothing changed)."""
    previous_version: str | None
    diff: str
    validation: Validation

    def to_json(self) -> dict[str, Any]:
        return {"changed": self.changed, "version": _version_json(self.version) if self.version else None,
                "previous_version": self.previous_version, "diff": self.diff,
                "validation": self.validation.to_json()}


@dataclass(frozen=True)
class HistoryEntry:
    """A recorded version with its diff against the version recorded before it."""

    version: RuleVersion
    previous: str | None
    diff: str
    added: int
    removed: int
    live: bool

    def to_json(self) -> dict[str, Any]:
        return {**_version_json(self.version), "previous_version": self.previous, "diff": self.diff,
                "added": self.added, "removed": self.removed, "live": self.live}


def _version_json(v: RuleVersion) -> dict[str, Any]:
    return {"id": v.id, "version": v.version, "applied_by": v.applied_by, "applied_at": v.applied_at,
            "action": v.action, "comment": v.comment, "path": v.path}


def _counts(diff: str) -> tuple[int, int]:
    lines = diff.splitlines()[2:]
    return (sum(1 for ln in lines if ln.startswith("+")), sum(1 for ln in lines if ln.startswith("-")))


@dataclass
class RulesAdmin:
    """The live rule file of a node and its recorded versions.

    Args:
        config: the node (its ``rules`` file, profiles, destinations).
        store: where versions are recorded.
        on_applied: called after a new file is written (the service reloads its rules at once).
        check_backends: include the "backend not usable here" warnings (imports backends).
    """

    config: NodeConfig
    store: Store
    on_applied: Callable[[], Any] | None = None
    check_backends: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.config.rules)

    def validate(self, text: str | bytes) -> Validation:
        return validate_text(text, self.config, path=self.path.name, check_backends=self.check_backends)

    def _read_live(self) -> tuple[str, str] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(f"cannot read the rule file: {exc.strerror or exc}", path=self.path) from None
        return raw.decode("utf-8", errors="replace"), rules_version(raw)

    def live(self) -> LiveRules:
        got = self._read_live()
        if got is None:
            raise InputError("the node's rule file does not exist", path=self.path)
        text, version = got
        last = self.store.rule_versions(1)
        recorded = last[0] if last and last[0].version == version else None
        return LiveRules(str(self.path), text, version, self.validate(text), recorded)

    # -- changes
    def apply(self, text: str, *, user: str, comment: str | None = None, expected_version: str | None = None,
              action: str = "apply") -> ApplyOutcome:
        """Validate ``text`` and make it the live rule file (see the module docstring).

        Raises:
            RulesConflict: ``expected_version`` is given and is not the live version.
            RulesInvalid: the text has errors; nothing was written.
        """
        with self._lock:
            got = self._read_live()
            live_text, live_version = got if got is not None else ("", None)
            if expected_version is not None and expected_version != live_version:
                raise RulesConflict(f"the rule file changed since it was read (live version {live_version}, "
                                    f"expected {expected_version}); reload and apply again", path=self.path)
            validation = self.validate(text)
            if not validation.ok:
                raise RulesInvalid(validation)
            raw = text.encode("utf-8")
            if validation.version == live_version:
                return ApplyOutcome(False, None, live_version, "", validation)
            last = self.store.rule_versions(1)
            if got is not None and (not last or last[0].version != live_version):
                # the file as it was (first change through the console, or edited by hand since)
                self.store.add_rule_version(live_version or "", live_text, applied_by=FOUND_BY, action="found",
                                            comment="the live file before this change", path=str(self.path))
            mode = stat.S_IMODE(os.stat(self.path).st_mode) if got is not None else None
            with atomic_open(self.path, mode=mode) as fh:
                fh.write(raw)
            vid = self.store.add_rule_version(validation.version, text, applied_by=user, action=action,
                                              comment=comment, path=str(self.path))
            row = self.store.get_rule_version(vid)
        diff = unified_diff(live_text, text, f"{self.path.name}@{(live_version or 'none')[:12]}",
                            f"{self.path.name}@{validation.version[:12]}")
        if self.on_applied is not None:
            self.on_applied()
        return ApplyOutcome(True, row, live_version, diff, validation)

    def _current_text(self, expected_version: str | None) -> str:
        live = self.live()
        if expected_version is not None and expected_version != live.version:
            raise RulesConflict(f"the rule file changed since it was read (live version {live.version}, "
                                f"expected {expected_version}); reload and try again", path=self.path)
        return live.text

    def rollback(self, ref: str | int, *, user: str, comment: str | None = None,
                 expected_version: str | None = None) -> ApplyOutcome:
        """Make a recorded version live again (by row id or version hash prefix)."""
        target = self.find(ref)
        note = f"rollback to #{target.id} ({target.version[:12]})" + (f": {comment}" if comment else "")
        return self.apply(target.text, user=user, comment=note, expected_version=expected_version, action="rollback")

    def reorder(self, order: list[str], *, user: str, comment: str | None = None,
                expected_version: str | None = None) -> ApplyOutcome:
        text = reorder_text(self._current_text(expected_version), order)
        return self.apply(text, user=user, comment=comment or "order: " + ", ".join(order),
                          expected_version=expected_version, action="reorder")

    def move(self, name: str, position: int, *, user: str, comment: str | None = None,
             expected_version: str | None = None) -> ApplyOutcome:
        text = move_text(self._current_text(expected_version), name, position)
        return self.apply(text, user=user, comment=comment or f"{name} to position {position}",
                          expected_version=expected_version, action="reorder")

    def set_enabled(self, name: str, enabled: bool, *, user: str, comment: str | None = None,
                    expected_version: str | None = None) -> ApplyOutcome:
        text = set_enabled_text(self._current_text(expected_version), name, enabled)
        return self.apply(text, user=user, comment=comment or f"{'enable' if enabled else 'disable'} {name}",
                          expected_version=expected_version, action="enable" if enabled else "disable")

    # -- history
    def find(self, ref: str | int) -> RuleVersion:
        """A recorded version by row id (``12`` or ``#12``) or version hash prefix (at least 4 digits)."""
        s = str(ref).strip().lstrip("#")
        if s.isdigit() and len(s) < 8:
            row = self.store.get_rule_version(int(s))
            if row is None:
                raise NotFound(f"no recorded rule version #{s}")
            return row
        if len(s) < 4:
            raise InputError(f"give a version id or at least 4 digits of a version hash (got {s!r})")
        rows = self.store.find_rule_versions(s.lower())
        if not rows:
            raise NotFound(f"no recorded rule version {s!r}")
        if len({r.version for r in rows}) > 1:
            raise InputError(f"version {s!r} is ambiguous: " + ", ".join(sorted({r.version for r in rows})))
        return rows[0]

    def history(self, limit: int = 50, offset: int = 0) -> list[HistoryEntry]:
        """Recorded versions, newest first, each with its diff against the one before it."""
        rows = self.store.rule_versions(limit + 1, offset)
        got = self._read_live()
        live_version = got[1] if got else None
        out = []
        for k, row in enumerate(rows[:limit]):
            prev = rows[k + 1] if k + 1 < len(rows) else self.store.previous_rule_version(row.id)
            diff = unified_diff(prev.text if prev else "", row.text,
                                f"#{prev.id} {prev.version[:12]}" if prev else "(nothing)",
                                f"#{row.id} {row.version[:12]}")
            added, removed = _counts(diff)
            out.append(HistoryEntry(row, prev.version if prev else None, diff, added, removed,
                                    k + offset == 0 and row.version == live_version))
        return out

    def diff(self, a: str | int | None, b: str | int | None = None) -> str:
        """Diff between two recorded versions; ``b`` None: against the live file; ``a`` None: the
        last recorded version."""
        if a is not None:
            old = self.find(a)
        else:
            last = self.store.rule_versions(1)
            if not last:
                raise InputError("no rule version recorded yet")
            old = last[0]
        if b is None:
            live = self.live()
            return unified_diff(old.text, live.text, f"#{old.id} {old.version[:12]}", f"live {live.version[:12]}")
        new = self.find(b)
        return unified_diff(old.text, new.text, f"#{old.id} {old.version[:12]}", f"#{new.id} {new.version[:12]}")
