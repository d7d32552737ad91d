"""``dicom-node rules``: validate a rule file against the node (``validate``), show how the rules
route a folder of DICOM files or a stored series (``test``, ``dry-run`` per condition), and change
the live rule file with every version kept (``apply``, ``history``, ``diff``, ``rollback``,
``enable``, ``disable``, ``move``; node/rules_admin.py).  The node is ``--config node.yaml``
(no config: the embedded defaults, as ``dicom-node serve`` without one).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from node.config import NodeConfig, load_config
from node.errors import InputError
from node.routing.facts import SeriesFacts, facts_from_paths
from node.routing.rules import RuleSet, RulesError, load_rules, parse_rules
from node.store_db import is_postgres_url

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
    """The rule file, checked against the node's names (or the ones the flags give)."""
    from node.rules_admin import node_names

    names = node_names(_config(args))
    profiles = _names(getattr(args, "profiles", None)) or _profiles_from_dir(getattr(args, "profiles_dir", None))
    destinations = _names(getattr(args, "destinations", None))
    return load_rules(
        args.rules_file,
        known_profiles=profiles if profiles is not None else names.profiles,
        known_destinations=destinations if destinations is not None else names.destinations,
    )


def _print_errors(exc: RulesError) -> None:
    for issue in exc.issues or []:
        print(f"ERROR {issue}", file=sys.stderr)
    print(f"{len(exc.issues)} error(s) in {exc.path or 'routing rules'}", file=sys.stderr)


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(getattr(args, "config", None))


def _rules_path(args: argparse.Namespace, cfg: NodeConfig) -> str:
    """The FILE argument, else the node's rule file with --config, else ./routing_rules.yaml."""
    if getattr(args, "rules_file", None):
        return str(args.rules_file)
    return str(cfg.rules) if getattr(args, "config", None) else DEFAULT_RULES


def _validation(args: argparse.Namespace, cfg: NodeConfig, path: str) -> "Any":
    from node.rules_admin import validate_text

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read rule file: {exc.strerror or exc}", path=path) from None
    profiles = _names(getattr(args, "profiles", None)) or _profiles_from_dir(getattr(args, "profiles_dir", None))
    return validate_text(raw, cfg, path=path, profiles=profiles,
                         destinations=_names(getattr(args, "destinations", None)),
                         check_backends=not getattr(args, "no_backends", False))


def _print_validation(v: "Any", path: str) -> None:
    from node.rules_admin import format_issue

    for issue in v.issues:
        print(f"{'WARNING' if issue.severity == 'warning' else 'ERROR'} {format_issue(issue)}", file=sys.stderr)
    if v.errors:
        print(f"{len(v.errors)} error(s), {len(v.warnings)} warning(s) in {path}", file=sys.stderr)
    print(f"checked against {v.checked_against}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    path = _rules_path(args, cfg)
    v = _validation(args, cfg, path)
    if not v.ok:
        _print_validation(v, path)
        return 1
    rs = v.ruleset
    enabled = sum(1 for r in rs.rules if r.enabled)
    warn = f", {len(v.warnings)} warning(s)" if v.warnings else ""
    print(f"OK: {path}: {len(rs)} rule(s) ({enabled} enabled), version {rs.version[:12]}{warn}")
    _print_validation(v, path)
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


def _admin(args: argparse.Namespace) -> "Any":
    from node.rules_admin import RulesAdmin
    from node.store import Store

    cfg = _config(args)
    db = str(args.db) if getattr(args, "db", None) else cfg.database_url  # a SQLite file or a postgresql:// URL
    return RulesAdmin(cfg, Store(db), check_backends=not getattr(args, "no_backends", False))


def _user() -> str:
    try:
        return f"shell:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"shell:uid {os.getuid()}"


def _report_apply(admin: "Any", outcome: "Any") -> int:
    if not outcome.changed:
        print(f"unchanged: {admin.path} is already version {str(outcome.previous_version)[:12]}")
        return 0
    v = outcome.version
    print(outcome.diff, end="")
    print(f"applied: {admin.path} version {v.version[:12]} (#{v.id}, {v.action} by {v.applied_by}); "
          f"was {str(outcome.previous_version)[:12]}. A running node loads it within 2 s.")
    for issue in outcome.validation.warnings:
        from node.rules_admin import format_issue

        print(f"WARNING {format_issue(issue)}", file=sys.stderr)
    return 0


def _changing(fn: "Any") -> "Any":
    """Run a change; an invalid result prints every error at its line and exits 1."""
    from node.rules_admin import RulesInvalid

    def run(args: argparse.Namespace) -> int:
        admin = _admin(args)
        try:
            return _report_apply(admin, fn(admin, args))
        except RulesInvalid as exc:
            _print_validation(exc.validation, str(admin.path))
            print("not applied: the live rule file is unchanged", file=sys.stderr)
            return 1
        finally:
            admin.store.close()
    return run


def _apply(admin: "Any", args: argparse.Namespace) -> "Any":
    try:
        text = Path(args.draft).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the draft: {exc}", path=args.draft) from None
    return admin.apply(text, user=_user(), comment=args.comment)


def _rollback(admin: "Any", args: argparse.Namespace) -> "Any":
    return admin.rollback(args.ref, user=_user(), comment=args.comment)


def _enable(admin: "Any", args: argparse.Namespace) -> "Any":
    return admin.set_enabled(args.name, args.rules_command == "enable", user=_user(), comment=args.comment)


def _move(admin: "Any", args: argparse.Namespace) -> "Any":
    return admin.move(args.name, args.position, user=_user(), comment=args.comment)


def _cmd_history(args: argparse.Namespace) -> int:
    import time

    admin = _admin(args)
    try:
        entries = admin.history(args.limit)
    finally:
        admin.store.close()
    if not entries:
        print("no rule version recorded yet (the first change through the console or `rules apply` records "
              "the live file and the new one)")
        return 0
    print(f"{'ID':>4}  {'VERSION':<12}  {'APPLIED':<19}  {'BY':<24} {'ACTION':<9} {'+/-':>9}  COMMENT")
    for e in entries:
        v = e.version
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.applied_at))
        live = "  (live)" if e.live else ""
        print(f"{v.id:>4}  {v.version[:12]:<12}  {when:<19}  {v.applied_by[:24]:<24} {v.action:<9} "
              f"{'+' + str(e.added) + '/-' + str(e.removed):>9}  {(v.comment or '')[:80]}{live}")
        if args.diff and e.diff:
            print(e.diff, end="")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    admin = _admin(args)
    try:
        print(admin.diff(args.a, args.b) or "(no difference)\n", end="")
    finally:
        admin.store.close()
    return 0


def _cmd_dry_run(args: argparse.Namespace) -> int:
    from node.rules_dryrun import dry_run, explain, facts_for_folder, facts_for_recent, facts_for_series
    from node.store import Store

    cfg = _config(args)
    path = _rules_path(args, cfg)
    v = _validation(args, cfg, path)
    if not v.ok:
        _print_validation(v, path)
        print("no dry run: the draft has errors", file=sys.stderr)
        return 1
    live = None
    if Path(cfg.rules).is_file() and Path(path).resolve() != Path(cfg.rules).resolve():
        try:
            live = parse_rules(Path(cfg.rules).read_bytes(), cfg.rules)
        except RulesError:
            live = None
    errors: list[str] = []
    if args.folder:
        targets = facts_for_folder(args.folder, args.calling_ae, args.called_ae)
    else:
        db = str(args.db) if args.db else cfg.database_url  # a SQLite file or a postgresql:// URL
        if not is_postgres_url(db) and not Path(db).is_file():
            raise InputError("no node database here (has the node run with this configuration?)", path=db)
        store = Store(db, migrate=False)
        try:
            if args.series:
                targets, errors = facts_for_series(store, args.series)
            else:
                targets, errors = facts_for_recent(store, args.last)
        finally:
            store.close()
    result = dry_run(v.ruleset, targets, cfg, live=live, errors=errors)
    print("\n".join(explain(result)))
    return 1 if errors and not result.series else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rules validate`` and ``rules test``."""
    p = subparsers.add_parser("rules", help="validate routing rules and try them on series")
    sub = p.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")

    def node(sp: argparse.ArgumentParser, db: bool = True) -> None:
        sp.add_argument("--config", "-c", default=None, metavar="FILE",
                        help="the node's node.yaml (default: embedded defaults, as serve)")
        if db:
            sp.add_argument("--db", default=None, metavar="PATH",
                            help="the node's store database (default: the one node.yaml names)")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-backends", action="store_true",
                        help="skip the check that each rule's backend is usable on this node")
        sp.add_argument("--profiles", metavar="NAMES",
                        help="comma-separated known profile names; unknown profiles become errors")
        sp.add_argument("--profiles-dir", metavar="DIR",
                        help="known profiles are the *.yaml file names in DIR")
        sp.add_argument("--destinations", metavar="NAMES",
                        help="comma-separated known destination names ('origin' is always known)")

    v = sub.add_parser("validate", help="check a rule file against the node; prints OK or every error at its line")
    v.add_argument("rules_file", nargs="?", default=None, metavar="FILE",
                   help=f"rule file (default: the node's with --config, else ./{DEFAULT_RULES})")
    node(v, db=False)
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
    t.add_argument("--config", "-c", default=None, metavar="FILE",
                   help="the node's node.yaml: its profiles and destinations (default: embedded defaults)")
    common(t)
    t.set_defaults(func=_cmd_test)

    d = sub.add_parser("dry-run", help="what a draft would do, per rule and condition, with stored series, "
                       "the last N received, or a folder")
    d.add_argument("rules_file", nargs="?", default=None, metavar="DRAFT",
                   help="draft rule file (default: the node's live file)")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--series", nargs="+", metavar="UID", help="stored SeriesInstanceUIDs")
    which.add_argument("--last", type=int, metavar="N", help="the N series received last")
    which.add_argument("--folder", metavar="DIR", help="a folder of DICOM files (headers only)")
    d.add_argument("--calling-ae", default=None, help="calling AE title to assume (--folder)")
    d.add_argument("--called-ae", default=None, help="called AE title to assume (--folder)")
    node(d)
    common(d)
    d.set_defaults(func=_cmd_dry_run)

    a = sub.add_parser("apply", help="validate a draft and make it the node's live rule file (version recorded)")
    a.add_argument("draft", metavar="FILE")
    a.add_argument("--comment", "-m", default=None, help="why (kept with the version)")
    node(a)
    a.add_argument("--no-backends", action="store_true", help=argparse.SUPPRESS)
    a.set_defaults(func=_changing(_apply))

    h = sub.add_parser("history", help="every applied version: who, when, why, lines changed")
    h.add_argument("--limit", type=int, default=50)
    h.add_argument("--diff", action="store_true", help="print each version's diff against the one before")
    node(h)
    h.set_defaults(func=_cmd_history)

    df = sub.add_parser("diff", help="diff of two recorded versions, or of one and the live file")
    df.add_argument("a", nargs="?", default=None, metavar="VERSION",
                    help="id (#12) or version hash prefix (default: the last recorded)")
    df.add_argument("b", nargs="?", default=None, metavar="VERSION", help="default: the live file")
    node(df)
    df.set_defaults(func=_cmd_diff)

    rb = sub.add_parser("rollback", help="make a recorded version live again")
    rb.add_argument("ref", metavar="VERSION", help="id (#12) or version hash prefix")
    rb.add_argument("--comment", "-m", default=None)
    node(rb)
    rb.add_argument("--no-backends", action="store_true", help=argparse.SUPPRESS)
    rb.set_defaults(func=_changing(_rollback))

    for verb in ("enable", "disable"):
        e = sub.add_parser(verb, help=f"{verb} a rule of the live file (enabled: {str(verb == 'enable').lower()})")
        e.add_argument("name", metavar="RULE")
        e.add_argument("--comment", "-m", default=None)
        node(e)
        e.add_argument("--no-backends", action="store_true", help=argparse.SUPPRESS)
        e.set_defaults(func=_changing(_enable))

    mv = sub.add_parser("move", help="move a rule of the live file to a position (1 = first)")
    mv.add_argument("name", metavar="RULE")
    mv.add_argument("position", type=int, metavar="POSITION")
    mv.add_argument("--comment", "-m", default=None)
    node(mv)
    mv.add_argument("--no-backends", action="store_true", help=argparse.SUPPRESS)
    mv.set_defaults(func=_changing(_move))

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
