"""``dicom-node run``: segment one series offline (no network)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from node.backend_registry import BACKEND_NAMES
from node.profiles import list_profiles


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="segment a folder of DICOM files offline",
        description="Segment one CT series from a folder (or files) and write the DICOM SEG, "
        "STL/PLY meshes and report.json into --output.",
    )
    p.add_argument("--input", nargs="+", type=Path, help="DICOM folder(s) or file(s)")
    p.add_argument("--organ", help="organ profile name or YAML path (see --list-profiles)")
    p.add_argument("--model", choices=BACKEND_NAMES, default=None, help="backend; default: the profile's model_type")
    p.add_argument("--output", type=Path, default=Path("out"), help="output folder (default: ./out)")
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the input holds several series")
    p.add_argument("--phase", choices=("auto", "contrast", "non_contrast"), default=None,
                   help="contrast phase override (default: from the DICOM header)")
    p.add_argument("--fill-missing-uids", action="store_true",
                   help="offline only: fill empty SOP/Study/Series UIDs from the file meta and fresh UIDs")
    p.add_argument("--working-grid", type=float, default=None, metavar="MM",
                   help="segment and mesh on a grid of about MM mm voxels (faster on fine series; "
                   "0 = the series' own grid; default: the profile's working_grid_mm)")
    p.add_argument("--no-seg", action="store_true", help="do not write the DICOM SEG")
    p.add_argument("--no-meshes", action="store_true", help="do not write STL/PLY meshes")
    p.add_argument("--no-qc", action="store_true", help="do not write the QC pictures (qc/*.png)")
    p.add_argument("--outputs", default=None, metavar="KINDS",
                   help="result objects, comma separated: seg,sr,overlay,stl (default: seg)")
    p.add_argument("--overlay-style", choices=("fill", "outline"), default="fill", help="overlay: fill or outline")
    p.add_argument("--list-profiles", action="store_true", help="list the organ profiles and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.list_profiles:
        for name in list_profiles():
            print(name)
        return 0
    if not args.input or not args.organ:
        print("dicom-node run: error: --input and --organ are required (or --list-profiles)", file=sys.stderr)
        return 2
    from node.pipeline.run import run_pipeline  # heavy imports only when running
    from node.pipeline.outputs import OutputOptions, OverlayStyle

    try:
        outputs = OutputOptions(tuple(k.strip() for k in args.outputs.split(",") if k.strip()),
                                OverlayStyle(mode=args.overlay_style)) if args.outputs else None
    except ValueError as exc:
        print(f"dicom-node run: error: --outputs: {exc}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()

    def progress(stage: str, message: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {stage:8s} {message}", file=sys.stderr, flush=True)

    result = run_pipeline(
        args.input,
        args.organ,
        args.output,
        backend=args.model,
        phase=None if args.phase in (None, "auto") else args.phase,
        series_uid=args.series,
        fill_missing_uids=args.fill_missing_uids,
        write_segmentation=not args.no_seg,
        write_meshes=not args.no_meshes,
        working_grid_mm=args.working_grid,
        progress=progress,
        outputs=outputs,
        qc=not args.no_qc,
    )
    rep = result.report
    for name, t in rep["tissues"].items():
        wt = t.get("watertight")
        print(
            f"{rep['profile']['name']}/{name}: {t['volume_ml_voxels']:.1f} mL, "
            f"{t.get('triangles', 0)} triangles, watertight={wt}"
        )
    print(f"wrote {result.output_dir} (report.json, {len(result.mesh_paths)} mesh files"
          f"{', ' + result.seg_path.name if result.seg_path else ''}) in {rep['timings_s']['total']:.1f} s")
    extra = rep["outputs"]
    if extra.get("sr") or extra.get("overlay") or extra.get("encapsulated_stl"):
        print(f"  outputs: SR {extra.get('sr') or '-'}, overlay {len(extra.get('overlay') or [])} slice(s), "
              f"Encapsulated STL {len(extra.get('encapsulated_stl') or [])}")
    return 0
