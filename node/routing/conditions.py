"""Condition operators and combinators of routing rules, evaluated with explanations.

:mod:`node.routing.rules` builds a condition tree from a rule's ``match`` block; evaluating it
against a :class:`~node.routing.facts.SeriesFacts` gives an :class:`Outcome`: matched or not,
and a one-line reason naming the condition that decided it (operator semantics: :class:`Operator`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import regex as _regex


class _Missing:
    """Marker for an attribute the series does not have."""

    _instance: "_Missing | None" = None

    def __new__(cls) -> "_Missing":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
"""Returned by :meth:`SeriesFacts.get` for an attribute that is absent."""


class FactSource(Protocol):
    """What conditions evaluate against (implemented by ``SeriesFacts``)."""

    def get(self, field: str) -> Any:  # pragma: no cover - protocol
        ...


@dataclass(frozen=True)
class Outcome:
    """Result of evaluating a condition."""

    matched: bool
    reason: str


# --------------------------------------------------------------------------- values


def _fmt(value: Any) -> str:
    """Render a value for explanations."""
    if value is MISSING:
        return "<missing>"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _num_text(value)
    if isinstance(value, (list, tuple)):
        return repr(as_text(value))
    return repr(value)


def _num_text(v: Any) -> str:
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(float(v))
    return str(v)


def as_text(value: Any) -> str:
    """The DICOM string form of a value: multi-values joined with a backslash."""
    if value is None or value is MISSING:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "\\".join(as_text(v) for v in value)
    if isinstance(value, (int, float)):
        return _num_text(value)
    return str(value).strip()


def as_number(value: Any) -> float | None:
    """A number from a value (first value of a multi-valued one), or ``None``."""
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    if value is None or value is MISSING or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def is_blank(value: Any) -> bool:
    """True for a missing, ``None``, empty or whitespace-only value."""
    if value is None or value is MISSING:
        return True
    if isinstance(value, (list, tuple)):
        return all(is_blank(v) for v in value)
    if isinstance(value, str):
        return not value.strip()
    return False


def _scalar_equal(expected: Any, actual: Any, ignore_case: bool) -> bool:
    if isinstance(expected, bool):
        if isinstance(actual, bool):
            return actual is expected
        return as_text(actual).lower() == ("true" if expected else "false")
    if isinstance(expected, (int, float)):
        got = as_number(actual) if not isinstance(actual, (list, tuple)) or len(actual) == 1 else None
        return got is not None and math.isclose(got, float(expected), rel_tol=1e-9, abs_tol=1e-9)
    exp = str(expected).strip()
    got_s = as_text(actual)
    if ignore_case:
        return exp.casefold() == got_s.casefold()
    return exp == got_s


# ----------------------------------------------------------------------- operators


class Operator:
    """A test applied to one attribute value.

    Value semantics (documented in ``routing_rules.yaml`` as well):

    * ``equals`` / plain scalar: strings compare case-sensitively after stripping
      surrounding blanks (``ignore_case: true`` to fold case); a number compares
      numerically (``3`` equals ``"3.0"``); ``true``/``false`` compare as booleans.
    * ``one_of`` / plain list: equals any of the listed values.
    * ``regex``: Python ``re.search`` (not anchored: use ``^...$`` to anchor).
    * ``glob``: ``fnmatch`` on the whole value (case-sensitive unless ``ignore_case``).
    * ``range`` / ``min``/``max``: inclusive numeric bounds, either may be ``null``.
    * ``exists``: the attribute is present (even if empty) / absent.
    * ``not_empty``: present with a non-blank value (``false``: absent or blank).
    * Multi-valued attributes (ImageType, PixelSpacing, ...): ``equals``, ``one_of``,
      ``regex`` and ``glob`` see the DICOM string form, values joined with ``\\``
      (``ORIGINAL\\PRIMARY\\AXIAL``); ``range`` uses the *first* value.
    """

    name = "?"
    needs_value = True
    """False for operators that decide on presence (exists, not_empty)."""

    def describe(self) -> str:
        raise NotImplementedError

    def test(self, value: Any) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Equals(Operator):
    value: Any
    ignore_case: bool = False
    name = "equals"

    def describe(self) -> str:
        return f"equals {_fmt(self.value)}" + (" (ignore case)" if self.ignore_case else "")

    def test(self, value: Any) -> bool:
        return _scalar_equal(self.value, value, self.ignore_case)


@dataclass(frozen=True)
class OneOf(Operator):
    values: tuple[Any, ...]
    ignore_case: bool = False
    name = "one_of"

    def describe(self) -> str:
        return f"one_of {list(self.values)!r}" + (" (ignore case)" if self.ignore_case else "")

    def test(self, value: Any) -> bool:
        return any(_scalar_equal(v, value, self.ignore_case) for v in self.values)


#: a ``regex`` condition gives up (no match, a warning) after this long on one value.  Rule patterns
#: run with the ``regex`` package, not ``re``: it takes a timeout and lets go of the GIL while it
#: matches.  With ``re`` a pattern like ``(a|aa)+$`` (written by mistake, or an operator's dry-run
#: draft) backtracked for hours on a 64-character value while holding the GIL: the whole node,
#: receiver included, stood still.
REGEX_TIMEOUT_S = 0.1

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Regex(Operator):
    pattern: str
    ignore_case: bool = False
    _re: Any = field(init=False, repr=False, compare=False)  # a regex.Pattern
    name = "regex"

    def __post_init__(self) -> None:
        try:  # VERSION0: the same syntax and meaning as Python's re
            compiled = _regex.compile(self.pattern, (_regex.IGNORECASE if self.ignore_case else 0) | _regex.VERSION0)
        except _regex.error as exc:  # the rule parser reports re.error at the rule's line
            raise re.error(str(exc)) from None
        object.__setattr__(self, "_re", compiled)

    def describe(self) -> str:
        return f"regex '{self.pattern}'" + (" (ignore case)" if self.ignore_case else "")

    def test(self, value: Any) -> bool:
        try:
            return self._re.search(as_text(value), timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            _log.warning("regex %r gave up after %.1f s on a value: taken as no match", self.pattern, REGEX_TIMEOUT_S)
            return False


@dataclass(frozen=True)
class Glob(Operator):
    pattern: str
    ignore_case: bool = False
    name = "glob"

    def describe(self) -> str:
        return f"glob '{self.pattern}'" + (" (ignore case)" if self.ignore_case else "")

    def test(self, value: Any) -> bool:
        text = as_text(value)
        if self.ignore_case:
            return fnmatch.fnmatchcase(text.casefold(), self.pattern.casefold())
        return fnmatch.fnmatchcase(text, self.pattern)


@dataclass(frozen=True)
class Range(Operator):
    min: float | None
    max: float | None
    name = "range"

    def describe(self) -> str:
        lo = "-inf" if self.min is None else _num_text(self.min)
        hi = "inf" if self.max is None else _num_text(self.max)
        return f"range [{lo}, {hi}]"

    def test(self, value: Any) -> bool:
        got = as_number(value)
        if got is None:
            return False
        if self.min is not None and got < self.min:
            return False
        if self.max is not None and got > self.max:
            return False
        return True


@dataclass(frozen=True)
class Exists(Operator):
    expected: bool = True
    name = "exists"
    needs_value = False

    def describe(self) -> str:
        return "exists" if self.expected else "is absent"

    def test(self, value: Any) -> bool:
        return (value is not MISSING) == self.expected


@dataclass(frozen=True)
class NotEmpty(Operator):
    expected: bool = True
    name = "not_empty"
    needs_value = False

    def describe(self) -> str:
        return "is not empty" if self.expected else "is empty"

    def test(self, value: Any) -> bool:
        return (not is_blank(value)) == self.expected


# ---------------------------------------------------------------------- conditions


class Condition:
    """A node of a condition tree."""

    line: int | None = None

    def evaluate(self, facts: FactSource) -> Outcome:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class FieldCondition(Condition):
    """One attribute (DICOM keyword, association field or series fact) tested by an operator."""

    field: str
    op: Operator
    line: int | None = None

    def describe(self) -> str:
        return f"{self.field} {self.op.describe()}"

    def evaluate(self, facts: FactSource) -> Outcome:
        value = facts.get(self.field)
        ok = self.op.test(value)
        if value is MISSING and self.op.needs_value:
            return Outcome(False, f"{self.field} is missing ({self.op.describe()} needs a value)")
        verb = "matched" if ok else "did not match"
        if not self.op.needs_value:
            shown = "present" if value is not MISSING else "absent"
            if value is not MISSING:
                shown += f", value {_fmt(value)}"
            return Outcome(ok, f"{self.field} {self.op.describe()}: {'yes' if ok else 'no'} ({shown})")
        return Outcome(ok, f"{self.field} {self.op.describe()} {verb} {_fmt(value)}")


@dataclass(frozen=True)
class AllOf(Condition):
    """Every child must match (a ``match`` mapping is an implicit ``all``)."""

    children: tuple[Condition, ...]
    line: int | None = None

    def describe(self) -> str:
        return "all(" + ", ".join(c.describe() for c in self.children) + ")"

    def evaluate(self, facts: FactSource) -> Outcome:
        if not self.children:
            return Outcome(True, "no conditions (matches every series)")
        reasons = []
        for child in self.children:
            out = child.evaluate(facts)
            if not out.matched:
                return out
            reasons.append(out.reason)
        if len(reasons) == 1:
            return Outcome(True, reasons[0])
        return Outcome(True, "all matched: " + "; ".join(reasons))


@dataclass(frozen=True)
class AnyOf(Condition):
    """At least one child must match."""

    children: tuple[Condition, ...]
    line: int | None = None

    def describe(self) -> str:
        return "any(" + ", ".join(c.describe() for c in self.children) + ")"

    def evaluate(self, facts: FactSource) -> Outcome:
        reasons = []
        for child in self.children:
            out = child.evaluate(facts)
            if out.matched:
                return out
            reasons.append(out.reason)
        return Outcome(False, "none of any[] matched: " + "; ".join(reasons))


@dataclass(frozen=True)
class Not(Condition):
    """Inverts its child."""

    child: Condition
    line: int | None = None

    def describe(self) -> str:
        return f"not({self.child.describe()})"

    def evaluate(self, facts: FactSource) -> Outcome:
        out = self.child.evaluate(facts)
        return Outcome(not out.matched, f"not: {out.reason}")
