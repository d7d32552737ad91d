#!/usr/bin/env python3
"""Train the tiny nnU-Net test model (tests/fixtures/nnunet_tiny) from a fixed seed.

Synthetic CT-like volumes (node.tools.synth_shapes: body, an "organ" ellipsoid = label 1,
a "bone" cylinder = label 2) at 3 mm, nnU-Net's own fingerprint/plan/preprocess, the plans
shrunk to a 3-stage network with 12/24/48 features and 32^3 patches, then nnU-Net's trainer
for 20 epochs x 25 iterations (Adam) without mirroring, on the CPU with one thread (about 4 min on
2 cores).  The output folder holds what inference needs (dataset.json, plans.json,
fold_0/checkpoint_final.pth without optimizer state, trainer_name nnUNetTrainer), so it
serves both the nnU-Net backend and, laid out as TotalSegmentator's --fast model, the
TotalSegmentator backend.

    .venv-ai/bin/python scripts/train_tiny_nnunet.py [--out tests/fixtures/nnunet_tiny] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET_ID = 990
TRAIN_SEEDS = range(100, 112)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "nnunet_tiny")
    ap.add_argument("--work", type=Path, default=None, help="nnU-Net work folder (default: a temp folder)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=25)
    args = ap.parse_args()

    from node.training.nnunet import (dataset_name, export_model, plan_and_preprocess, set_nnunet_dirs, train,
                                      write_case_nifti, write_dataset_json)

    work = args.work or Path(tempfile.mkdtemp(prefix="tiny-nnunet-"))
    dirs = set_nnunet_dirs(work)
    from node.pipeline.ai import common as ai_common

    ai_common.prepare_torch(1)
    from node.tools.synth_shapes import LABELS, make_case

    raw = dirs["nnUNet_raw"] / dataset_name(DATASET_ID, "SynthTiny")
    shutil.rmtree(raw, ignore_errors=True)
    for s in TRAIN_SEEDS:
        c = make_case(s)
        write_case_nifti(raw / "imagesTr" / f"synth_{s:03d}_0000.nii.gz", c.hu, c.spacing)
        write_case_nifti(raw / "labelsTr" / f"synth_{s:03d}.nii.gz", c.labels, c.spacing)
    write_dataset_json(raw, LABELS, len(TRAIN_SEEDS))
    t0 = time.perf_counter()
    plan_and_preprocess(DATASET_ID, tiny=True)
    t1 = time.perf_counter()
    folder = train(DATASET_ID, fold=0, epochs=args.epochs, iterations=args.iterations, device="cpu", seed=0)
    t2 = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    export_model(folder, args.out, folds=(0,))
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"planned+preprocessed in {t1 - t0:.1f} s, trained in {t2 - t1:.1f} s; "
          f"model in {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
