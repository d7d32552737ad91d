"""MONAI backend: a tiny UNet trained here (600 steps, ~18 s on an idle CPU) run as TorchScript and as a bundle folder."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="AI extras not installed (see docs/ai-backends.md)")
pytest.importorskip("monai", reason="MONAI not installed: pip install '.[monai]' -c constraints.txt")

import torch
from ai_helpers import HELD_OUT_SEEDS, fail_on_connect, tissue_profile

from node.pipeline.ai import common as ai_common
from node.pipeline.ai import monai as backend_monai
from node.pipeline.backends import get_backend
from node.profiles import MonaiModel
from node.tools.synth_shapes import case_volume, dice, make_case

WINDOW = [-200.0, 400.0]
# batch norm, not MONAI's default instance norm: the absolute intensity is the cue here and
# per-patch instance normalisation washed it out (held-out organ Dice ~0.5-0.85 vs ~0.98)
ARCH: dict[str, Any] = dict(spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
            norm="batch")
TRAIN_SEEDS = range(200, 216)
# a fixed number of steps, not a time budget: a loaded machine would otherwise train a weaker
# model and the Dice bounds below would fail for reasons that are not the backend's
PATCH, BATCH, LR, STEPS = 24, 4, 1e-2, 600
TISSUES = [("organ", {"labels": [1]}), ("bone", {"labels": [2]})]


def _pair(seed):
    case = make_case(seed)
    vol = case_volume(case)
    x, back, _ = backend_monai.prepare_input(vol, MonaiModel(torchscript="x", window=WINDOW))
    lab_vol = case_volume(case)
    lab_vol.array = case.labels
    y, _, _ = backend_monai.to_ras(lab_vol)
    return case, x, np.rint(y).astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the tiny UNet for STEPS steps (random crops, flips, Adam, cosine decay); save TorchScript and a bundle."""
    return train_unet(tmp_path_factory.mktemp("monai"))


def train_unet(root, flips: bool = True, steps: int = STEPS, bundle_extra: dict | None = None) -> dict:
    """Train the tiny UNet for ``steps`` steps (random crops, random flips unless ``flips`` is off, Adam,
    cosine decay); save it under ``root`` as TorchScript and as a bundle (``bundle_extra``: more
    keys for its inference.json)."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    ai_common.prepare_torch(1)
    torch.manual_seed(0)
    data = [_pair(s)[1:] for s in TRAIN_SEEDS]
    xs = torch.from_numpy(np.stack([d[0] for d in data]))
    ys = torch.from_numpy(np.stack([d[1] for d in data]))[:, None]
    net = UNet(**ARCH)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    t0, it = time.perf_counter(), 0
    rng = np.random.default_rng(0)
    while it < steps:
        for g in opt.param_groups:  # cosine decay over the steps
            g["lr"] = LR * 0.5 * (1 + np.cos(np.pi * it / steps))
        xb, yb = [], []
        for _ in range(BATCH):  # random 24^3 crops with random flips
            n = rng.integers(len(data))
            o = [rng.integers(0, xs.shape[2 + d] - PATCH + 1) for d in range(3)]
            sl = (n, slice(None), slice(o[0], o[0] + PATCH), slice(o[1], o[1] + PATCH), slice(o[2], o[2] + PATCH))
            xx, yy = xs[sl], ys[sl]
            for d in range(3):
                if flips and rng.random() < 0.5:
                    xx, yy = xx.flip(d + 1), yy.flip(d + 1)
            xb.append(xx)
            yb.append(yy)
        opt.zero_grad()
        loss = loss_fn(net(torch.stack(xb)), torch.stack(yb))
        loss.backward()
        opt.step()
        it += 1
    net.eval()
    ts = root / "tiny.ts"
    torch.jit.save(torch.jit.trace(net, xs[:1]), str(ts))
    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    (bundle / "configs" / "inference.json").write_text(json.dumps({**_bundle_config(), **(bundle_extra or {})}, indent=2))
    print(f"MONAI tiny UNet: {it} iterations in {time.perf_counter() - t0:.1f} s, final loss {loss.item():.3f}")
    return {"ts": ts, "bundle": bundle, "iterations": it}


def _bundle_config():
    return {
        "bundle_root": ".",
        "device": "cpu",
        "output_dir": "/tmp",
        "network_def": {"_target_": "UNet", **{k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()}},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": WINDOW[0], "a_max": WINDOW[1],
                 "b_min": 0.0, "b_max": 1.0, "clip": True},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [48, 48, 48], "sw_batch_size": 1,
                    "overlap": 0.25},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg"},
            ],
        },
    }


@pytest.mark.parametrize("kind", ["torchscript", "bundle"])
def test_dice_held_out(trained, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    backend_monai.clear_cache()
    model = ({"torchscript": str(trained["ts"]), "window": WINDOW, "roi_size": [48, 48, 48], "device": "cpu"}
             if kind == "torchscript" else {"bundle": str(trained["bundle"]), "device": "cpu"})
    prof = tissue_profile("monai", model, TISSUES)
    for seed in HELD_OUT_SEEDS:
        case = make_case(seed)
        with fail_on_connect() as connects:
            masks = get_backend("monai").segment(case_volume(case), prof, phase="contrast")
        assert connects == []
        d1, d2 = dice(masks["organ"], case.labels == 1), dice(masks["bone"], case.labels == 2)
        print(f"MONAI {kind} seed {seed}: Dice organ {d1:.3f} bone {d2:.3f}")
        assert d1 > 0.95 and d2 > 0.95
    assert not list(tmp_path.rglob("*.nii*")), "the bundle's SaveImaged must not write files"


def test_oblique_orientation_maps_back(trained):
    """A volume stored in another orientation (flipped/permuted axes) gives the same masks."""
    case = make_case(HELD_OUT_SEEDS[0])
    vol = case_volume(case)
    prof = tissue_profile("monai", {"torchscript": str(trained["ts"]), "window": WINDOW, "device": "cpu"}, TISSUES)
    ref = get_backend("monai").segment(vol, prof, phase="contrast")["bone"]
    flipped = case_volume(case)
    flipped.array = vol.array[::-1, :, ::-1].copy()  # k and i reversed
    aff = vol.affine.copy()
    aff[:3, 0] *= -1
    aff[:3, 2] *= -1
    aff[:3, 3] = vol.affine[:3, :3] @ np.array([vol.shape[2] - 1, 0, vol.shape[0] - 1]) + vol.affine[:3, 3]
    flipped.affine = aff
    got = get_backend("monai").segment(flipped, prof, phase="contrast")["bone"]
    np.testing.assert_array_equal(got[::-1, :, ::-1], ref)
