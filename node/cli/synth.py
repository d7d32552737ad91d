"""``dicom-node synth``: the command line of :mod:`node.tools.synth_series` (test tooling)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a DICOM CT series from a NIfTI volume (tilt, uneven spacing, compression, ...)",
        add_help=False,
    )
    p.add_argument("args", nargs="*", help="options of node.tools.synth_series (try: dicom-node synth --help)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from node.tools.synth_series import main

    return int(main(args.args) or 0)
