"""``dicom-node profiles list | show NAME | validate [FILE...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from node.errors import NodeError
from node.profiles import Profile, default_profiles_dir, list_profiles, load_profile, load_profile_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list, show and validate organ profiles")
    p.add_argument("--dir", type=Path, default=None, help="profiles folder (default: the repository's profiles/)")
    ps = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ps.add_parser("list", help="list profiles with their tissues").set_defaults(func=_list)
    show = ps.add_parser("show", help="say what a profile does, step by step (--yaml: as loaded, defaults filled in)")
    show.add_argument("name")
    show.add_argument("--yaml", action="store_true", help="print the profile as loaded, defaults filled in")
    show.set_defaults(func=_show)
    val = ps.add_parser("validate", help="validate profile files (default: all in the folder)")
    val.add_argument("files", nargs="*", type=Path)
    val.set_defaults(func=_validate)


def _list(args: argparse.Namespace) -> int:
    for name in list_profiles(args.dir):
        try:
            p = load_profile(name, args.dir)
            print(f"{name:12s} {p.model_type:16s} {', '.join(t.name for t in p.result_tissues):30s} {p.description}")
        except NodeError as exc:
            print(f"{name:12s} INVALID: {exc}")
    return 0


def _show(args: argparse.Namespace) -> int:
    p = load_profile(args.name, args.dir)
    if args.yaml:
        print(yaml.safe_dump(p.model_dump(mode="json", exclude={"source"}), sort_keys=False), end="")
    else:
        from node.profile_text import describe

        print(describe(p), end="")
    return 0


def _backend_problem(profile: Profile) -> str | None:
    """Why ``profile`` cannot run here (missing package, model folder or weights), or None."""
    from node.pipeline.backends import check_profile

    return check_profile(profile)


def _validate(args: argparse.Namespace) -> int:
    files = args.files or sorted((args.dir or default_profiles_dir()).glob("*.yaml"))
    bad = 0
    for f in files:
        try:
            p = load_profile_file(f)
        except NodeError as exc:
            bad += 1
            print(f"ERROR {exc}")
            continue
        problem = _backend_problem(p)
        if problem and p.refuse_without_backend:
            # a deployment without the model: its jobs are refused with the profile's reason
            print(f"OK    {f} ({p.model_type}, {len(p.tissues)} tissues; not available here, its jobs are refused: "
                  f"{problem})")
        elif problem:
            bad += 1
            print(f"ERROR {f}: model_type: {problem}")
        else:
            print(f"OK    {f} ({p.model_type}, {len(p.tissues)} tissues)")
    if not files:
        print("no profile files found", file=sys.stderr)
        return 1
    return 1 if bad else 0
