"""``dicom-node rules``: validate a rule file (``validate``) and show how the rules route a
folder of DICOM files or a stored series, rule by rule with the reason (``test``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from node.errors import InputError
from node.routing.facts import SeriesFacts, facts_from_paths
from node.routing.rules import RuleSet, RulesError, load_rules

DEFAULT_RULES = "routing_rules.yaml"


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def _profiles_from_dir(folder: str | None) -> set[str] | None:
    if folder is None:
        return None
    p = Path(folder)
    if not p.is_dir():
        raise InputError("profiles folder not found", path=p)
    return {f.stem for f in p.iterdir() if f.suffix in (".yaml", ".yml")}


def _load(args: argparse.Namespace) -> RuleSet:
    return load_rules(
        args.rules_file,
        known_profiles=_names(getattr(args, "profiles", None)) or _profiles_from_dir(
            getattr(args, "profiles_dir", None)),
        known_destinations=_names(getattr(args, "destinations", None)),
    )


def _print_errors(exc: RulesError) -> None:
    for issue in exc.issues or []:
        print(f"ERROR {issue}", file=sys.stderr)
    print(f"{len(exc.issues)} error(s) in {exc.path or 'routing rules'}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        rs = _load(args)
    except RulesError as exc:
        _print_errors(exc)
        return 1
    enabled = sum(1 for r in rs.rules if r.enabled)
    print(f"OK: {rs.path}: {len(rs)} rule(s) ({enabled} enabled), version {rs.version[:12]}")
    return 0


def _facts_from_store(uid: str, db_path: str | None,
                      calling_ae: str | None = None, called_ae: str | None = None) -> SeriesFacts:
    """Facts of a stored series, from the per-instance rule tags the store keeps.

    ``db_path`` defaults to the database of ./node.yaml.  The association AE
    titles default to the ones recorded with the series.  Only the tags the store
    keeps (``node.dicom_values.RULE_TAGS``, geometry included) are visible to the rules.
    """
    try:
        from node.store import Store  # written separately, optional here
    except ImportError as exc:
        raise InputError(
            f"cannot look up series {uid}: the node's store module is not available ({exc}); "
            "pass a DICOM file or folder instead"
        ) from None
    if db_path is None:
        try:
            from node.config import load_config
        except ImportError:
            raise InputError(f"cannot look up series {uid}: give the store database with --db") from None
        db_path = str(load_config(None).database_path)
    if not Path(db_path).is_file():
        raise InputError(f"cannot look up series {uid}: no store database", path=db_path)
    store = Store(db_path, migrate=False)
    try:
        series = store.get_series(uid)
        instances = store.series_instances(uid)
    finally:
        store.close()
    if series is None or not instances:
        raise InputError(f"series {uid} is not in the node's store", path=db_path)
    return SeriesFacts.from_tag_dicts(
        [dict(i.tags, SOPInstanceUID=i.sop_instance_uid, SeriesInstanceUID=i.series_uid)
         for i in instances],
        calling_ae or series.calling_ae,
        called_ae or series.called_ae,
        source=f"store:{db_path}",
    )


def _cmd_test(args: argparse.Namespace) -> int:
    try:
        rs = _load(args)
    except RulesError as exc:
        _print_errors(exc)
        return 1
    target = args.target
    if os.path.exists(target):
        series = facts_from_paths(target, args.calling_ae, args.called_ae)
    else:
        series = [_facts_from_store(target, args.db, args.calling_ae, args.called_ae)]
    print(f"rules: {rs.path} ({len(rs)} rule(s), version {rs.version[:12]})")
    for facts in series:
        s = facts.summary()
        print()
        print(f"series {s['series_instance_uid'] or '<no SeriesInstanceUID>'}")
        spacing = "n/a" if s["slice_spacing"] is None else f"{s['slice_spacing']:g}"
        thick = "n/a" if s["slice_thickness"] is None else f"{s['slice_thickness']:g}"
        print(f"  Modality={s['modality']} SeriesDescription={s['series_description']!r} "
              f"instances={s['instance_count']} slice_thickness={thick} slice_spacing={spacing} "
              f"orientation={s['orientation']} gantry_tilt={s['gantry_tilt']} "
              f"calling_ae={s['calling_ae']} called_ae={s['called_ae']}")
        decision = rs.route(facts)
        for line in decision.explain():
            print(line)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rules validate`` and ``rules test``."""
    p = subparsers.add_parser("rules", help="validate routing rules and try them on series")
    sub = p.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profiles", metavar="NAMES",
                        help="comma-separated known profile names; unknown profiles become errors")
        sp.add_argument("--profiles-dir", metavar="DIR",
                        help="known profiles are the *.yaml file names in DIR")
        sp.add_argument("--destinations", metavar="NAMES",
                        help="comma-separated known destination names ('origin' is always known)")

    v = sub.add_parser("validate", help="check a rule file; prints OK or every error")
    v.add_argument("rules_file", nargs="?", default=DEFAULT_RULES, metavar="FILE",
                   help=f"rule file (default ./{DEFAULT_RULES})")
    common(v)
    v.set_defaults(func=_cmd_validate)

    t = sub.add_parser("test", help="show how the rules route a DICOM folder/file or a stored series")
    t.add_argument("target", metavar="PATH_OR_SERIES_UID",
                   help="DICOM file or folder (each series in it is tested), or a stored SeriesInstanceUID")
    t.add_argument("--rules", dest="rules_file", default=DEFAULT_RULES, metavar="FILE",
                   help=f"rule file (default ./{DEFAULT_RULES})")
    t.add_argument("--calling-ae", default=None, help="calling AE title to assume")
    t.add_argument("--called-ae", default=None, help="called AE title to assume")
    t.add_argument("--db", default=None, metavar="PATH", help="the node's store database (for a SERIES_UID)")
    common(t)
    t.set_defaults(func=_cmd_test)

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
