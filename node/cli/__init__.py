"""``dicom-node`` command line.

Each command group lives in its own module under ``node.cli`` and exposes
``register(subparsers)``, which adds its sub-parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code).  Bad input
is reported as one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from node import __version__, logsafe
from node.errors import NodeError

#: command modules, in the order they appear in ``--help``
COMMAND_MODULES = ("run", "profiles", "serve", "worker", "users", "rules", "jobs", "synth", "dataset", "train")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="DICOM segmentation node: CT series in, DICOM SEG and STL/PLY meshes out.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"node.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    # `synth` hands everything after it to node.tools.synth_series' own parser
    args, extra = parser.parse_known_args(raw)
    if getattr(args, "command", None) == "synth":
        args.args = raw[raw.index("synth") + 1 :]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=getattr(logging, (args.log_level or "WARNING").upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logsafe.install()  # one line per record, control characters escaped, library warnings logged
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NodeError as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
