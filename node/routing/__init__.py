"""Routing rules: which series get segmented with which profile, sent where.

* :mod:`node.routing.rules` - rule file schema, loader/validator, :class:`RuleSet`,
  :class:`RoutingDecision`, hot reload (:class:`RuleSetHolder`).
* :mod:`node.routing.conditions` - condition operators and combinators.
* :mod:`node.routing.facts` - :class:`SeriesFacts` computed from DICOM headers.
"""

from node.routing.facts import SeriesFacts, facts_from_paths
from node.routing.rules import (
    ORIGIN,
    Rule,
    RuleEvaluation,
    RuleIssue,
    RuleSet,
    RuleSetHolder,
    RulesError,
    RoutingDecision,
    load_rules,
    parse_rules,
    rules_version,
)

__all__ = [
    "ORIGIN", "Rule", "RuleEvaluation", "RuleIssue", "RuleSet", "RuleSetHolder", "RulesError",
    "RoutingDecision", "SeriesFacts", "facts_from_paths", "load_rules", "parse_rules",
    "rules_version",
]
