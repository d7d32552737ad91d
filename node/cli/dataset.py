"""``dicom-node dataset export``: series + DICOM SEG annotations -> nnU-Net raw dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="build training datasets from received series and DICOM SEG annotations")
    ps = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = ps.add_parser(
        "export",
        help="write an nnU-Net raw dataset (imagesTr/labelsTr/dataset.json + inventory.csv)",
        description="Pair every DICOM SEG in the input with the CT series it references and write an nnU-Net "
        "raw dataset. Pairs whose geometry does not match are refused and listed in inventory.csv.",
    )
    ex.add_argument("--input", "-i", nargs="+", required=True, type=Path, help="DICOM folders/files (CT + SEG)")
    ex.add_argument("--output", "-o", required=True, type=Path, help="folder receiving Dataset<ID>_<NAME>/")
    ex.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    ex.add_argument("--name", required=True, help="dataset name (letters, digits, _)")
    ex.add_argument("--orientation", default="LPS",
                    help="storage orientation of the written images, axis codes (default LPS); recorded in "
                         "dataset.json as input_orientation, which the nnU-Net backend reads from the model folder")
    ex.add_argument("--label", action="append", default=[], metavar="NAME=SEGMENT[,SEGMENT...]",
                    help="dataset label NAME made of the SEG segments with these SegmentLabels (repeat; order = "
                    "label ids 1..; later labels win where segments overlap). Default: one label per segment label")
    ex.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from node.training.dataset import export_dataset, parse_label_mapping

    mapping = parse_label_mapping(args.label) if args.label else None
    res = export_dataset(args.input, args.output, dataset_id=args.dataset_id, name=args.name, mapping=mapping,
                         orientation=args.orientation)
    print(f"{res.folder}: {len(res.exported)} case(s) exported, {len(res.refused)} refused; labels "
          + ", ".join(f"{k}={v}" for k, v in res.labels.items()))
    for path, why in res.refused:
        print(f"REFUSED {path}: {why}")
    print(f"inventory: {res.folder / 'inventory.csv'}")
    return 0 if res.exported else 1
