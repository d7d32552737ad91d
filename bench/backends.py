#!/usr/bin/env python3
"""AI backends benchmark: cold load, warm inference, peak RSS, and the node's overhead.

For each backend (nnU-Net, TotalSegmentator, MONAI) on the same synthetic CT volume
(node.tools.synth_shapes, default 96x128x128 voxels at 3 mm), each in its own process so
that peak RSS is that backend's alone:

* cold: first call through the node's backend (model load + first inference);
* warm: median of ``--repeat`` further calls through the node's backend;
* direct: median of the same number of calls to the library itself, with the same model
  and settings (nnU-Net: the same ``nnUNetPredictor.predict_single_npy_array``;
  TotalSegmentator: ``totalsegmentator.python_api.totalsegmentator`` on the same NIfTI;
  MONAI: ``sliding_window_inference`` on the same tensor);
* overhead = warm / direct - 1 (target <= 10 %);
* peak RSS of the process (ru_maxrss).

Models: the committed tiny nnU-Net (also laid out as TotalSegmentator's --fast model) and a
randomly initialised MONAI UNet of the test's architecture saved as TorchScript (timing does
not depend on the weights).  Needs the AI extras (docs/ai-backends.md)::

    .venv-ai/bin/python bench/backends.py [--size 96 128 128] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "tests" / "fixtures" / "nnunet_tiny"
FAST_DIR = "Dataset297_TotalSegmentator_total_3mm_1559subj/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
TISSUES = [("organ", {"labels": [1]}), ("bone", {"labels": [2]})]


def _profile(model_type: str, model: dict):
    from node.profiles import parse_profile

    return parse_profile({
        "name": "bench", "description": "bench", "model_type": model_type, "model": model,
        "tissues": [{"name": t, "description": t, "color": [200, 100, 100], **spec,
                     "category": {"value": "123037004", "meaning": "Anatomical Structure"},
                     "type": {"value": "91723000", "meaning": "Anatomical Structure"}} for t, spec in TISSUES],
    }, "<bench>")


def _timed(fn, n: int) -> tuple[float, list[float]]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(name: str, size: tuple[int, int, int], repeat: int, work: Path) -> dict:
    from node.pipeline.ai import common as ai_common
    from node.pipeline.backends import get_backend
    from node.tools.synth_shapes import case_volume, make_case

    ai_common.prepare_torch(1)
    vol = case_volume(make_case(7, shape=size))
    res: dict = {"backend": name, "shape_kji": list(vol.shape)}

    if name == "nnunet":
        from node.pipeline.ai import nnunet as bn

        model = {"folder": str(TINY), "folds": [0], "device": "cpu"}
        prof = _profile("nnunet", model)
        be = get_backend("nnunet")
        t0 = time.perf_counter()
        pred, entry, _ = bn.get_predictor(bn.NnUNetModel(**model))
        res["load_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        be.segment(vol, prof, phase="contrast")
        res["cold_s"] = round(time.perf_counter() - t0 + res["load_s"], 3)
        import numpy as np

        si, sj, sk = vol.spacing

        def direct():
            pred.predict_single_npy_array(np.asarray(vol.array, np.float32)[None], {"spacing": [sk, sj, si]},
                                          None, None, False)

        def node():
            be.segment(vol, prof, phase="contrast")

    elif name == "totalsegmentator":
        weights = work / "weights" / FAST_DIR
        (weights / "fold_0").mkdir(parents=True, exist_ok=True)
        for f in ("dataset.json", "plans.json"):
            shutil.copy2(TINY / f, weights / f)
        shutil.copy2(TINY / "fold_0" / "checkpoint_final.pth", weights / "fold_0" / "checkpoint_final.pth")
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(work / "weights")
        os.environ["TOTALSEG_HOME_DIR"] = str(work / "home")
        from node.pipeline.ai import totalseg as bt

        bt.ensure_offline_config(work / "home")
        prof = _profile("totalsegmentator", {"task": "total", "fast": True, "device": "cpu"})
        be = get_backend("totalsegmentator")
        t0 = time.perf_counter()
        be.segment(vol, prof, phase="contrast")
        res["cold_s"] = round(time.perf_counter() - t0, 3)
        res["load_s"] = None  # TotalSegmentator builds its predictor inside every call
        from totalsegmentator.python_api import totalsegmentator

        img = bt.to_nifti(vol)

        def direct():
            # what a user would write; 1 thread like the node (TotalSegmentator would take all cores)
            with bt._cpu_count(1):
                totalsegmentator(img, None, ml=True, fast=True, task="total", device="cpu", quiet=True,
                                 nr_thr_saving=1, skip_saving=True)

        def node():
            be.segment(vol, prof, phase="contrast")

    elif name == "monai":
        import torch
        from monai.inferers import sliding_window_inference
        from monai.networks.nets import UNet

        from node.pipeline.ai import monai as bm

        torch.manual_seed(0)
        net = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2),
                   num_res_units=1).eval()
        ts = work / "tiny.ts"
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 48, 48, 48)), str(ts))
        model = {"torchscript": str(ts), "window": [-200, 400], "roi_size": [64, 64, 64], "device": "cpu"}
        prof = _profile("monai", model)
        be = get_backend("monai")
        t0 = time.perf_counter()
        be.segment(vol, prof, phase="contrast")
        res["cold_s"] = round(time.perf_counter() - t0, 3)
        settings = bm.MonaiModel(**model)
        m = bm._torchscript(ts, torch.device("cpu"))
        t0 = time.perf_counter()
        torch.jit.load(str(ts))
        res["load_s"] = round(time.perf_counter() - t0, 3)
        x, _, _ = bm.prepare_input(vol, settings)
        xt = torch.from_numpy(x)[None]

        def direct():
            with torch.inference_mode():
                logits = sliding_window_inference(xt, roi_size=(64, 64, 64), sw_batch_size=1, predictor=m,
                                                  overlap=0.25, mode="gaussian")
                assert isinstance(logits, torch.Tensor)  # as the node checks: the model gives one tensor
                torch.argmax(logits, dim=1)

        def node():
            be.segment(vol, prof, phase="contrast")
    else:
        raise SystemExit(f"unknown backend {name}")

    # interleave to share any drift between both sides
    d_times, n_times = [], []
    for _ in range(repeat):
        d_times += _timed(direct, 1)[1]
        n_times += _timed(node, 1)[1]
    res["warm_s"] = round(statistics.median(n_times), 3)
    res["direct_s"] = round(statistics.median(d_times), 3)
    res["overhead_pct"] = round(100 * (res["warm_s"] / res["direct_s"] - 1), 1)
    res["peak_rss_mb"] = round(_peak_mb(), 1)
    res["torch_threads"] = __import__("torch").get_num_threads()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["nnunet", "totalsegmentator", "monai"])
    ap.add_argument("--size", nargs=3, type=int, default=[96, 128, 128], help="k j i voxels (3 mm)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="bench-ai-") as tmp:
            print("RESULT " + json.dumps(run_one(args.one, tuple(args.size), args.repeat, Path(tmp))))
        return 0
    results = []
    for b in args.backends:
        r = subprocess.run([sys.executable, __file__, "--one", b, "--size", *map(str, args.size),
                            "--repeat", str(args.repeat)], capture_output=True, text=True)
        line = next((s for s in r.stdout.splitlines() if s.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            print(f"{b}: FAILED\n{r.stderr[-2000:]}")
            continue
        results.append(json.loads(line[7:]))
    print(f"{'backend':18s} {'load s':>7s} {'cold s':>7s} {'warm s':>7s} {'direct s':>8s} {'overhead':>8s} "
          f"{'peak RSS MB':>11s}")
    for r in results:
        load = "-" if r["load_s"] is None else f"{r['load_s']:.2f}"
        print(f"{r['backend']:18s} {load:>7s} {r['cold_s']:7.2f} {r['warm_s']:7.2f} {r['direct_s']:8.2f} "
              f"{r['overhead_pct']:7.1f}% {r['peak_rss_mb']:11.0f}")
    if results:
        print(f"volume {results[0]['shape_kji']} (k, j, i) at 3 mm, torch threads {results[0]['torch_threads']}, "
              f"CPU only")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if len(results) == len(args.backends) else 1


if __name__ == "__main__":
    sys.exit(main())
