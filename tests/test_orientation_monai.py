"""The MONAI backend against MONAI's own entry points on real series stored as dcm2niix writes
them (LAS) and as LPS: per-segment parity (issue 16, part 4).

- bundle: the bundle's own inference workflow, ``monai.bundle.run`` (its ``initialize``
  and ``run`` sections: LoadImaged, Orientationd RAS, the inferer, Invertd, SaveImaged);
- TorchScript: what a MONAI user writes, ``LoadImaged`` + ``EnsureChannelFirstd`` +
  ``Orientationd(RAS)`` + ``ScaleIntensityRanged`` and ``sliding_window_inference`` on the NIfTI.

The tiny UNet is trained here without flips (so a flipped input gives another answer) on the
synthetic shapes of tests/test_backend_monai.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="AI extras not installed (see docs/ai-backends.md)")
pytest.importorskip("monai", reason="MONAI not installed: pip install '.[monai]' -c constraints.txt")

from ai_helpers import REAL_SERIES, nifti_as, on_volume_grid, real_series_dicom, tissue_profile
from test_backend_monai import TISSUES, WINDOW, train_unet

from node.pipeline.ai import monai as backend_monai
from node.pipeline.backends import get_backend
from node.pipeline.series.load import load_series
from node.tools.synth_shapes import dice

ROI = [48, 48, 48]
#: the bundle's own workflow (what ``monai.bundle run`` executes; the node reads only
#: network_def, preprocessing, inferer and postprocessing from the same file)
WORKFLOW: dict[str, Any] = {
    "image": "",
    "initialize": ["$torch.set_grad_enabled(False)",
                   "$@network_def.load_state_dict(torch.load(@bundle_root + '/models/model.pt', weights_only=True))",
                   "$@network_def.eval()"],
    "run": ["$[@postprocessing({**d, 'pred': @inferer(d['image'][None], @network_def)[0]}) "
            "for d in [@preprocessing({'image': @image})]]"],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    return train_unet(tmp_path_factory.mktemp("monai-orient"), flips=False, bundle_extra=WORKFLOW)


def _bundle_run(bundle: Path, nifti: Path, out: Path) -> Path:
    """``monai.bundle.run`` (what ``python -m monai.bundle run`` calls; the command line also needs
    the ``fire`` package) with the image and output folder overridden."""
    from monai.bundle import run

    run(run_id="run", config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
        image=str(nifti), output_dir=str(out))
    (seg,) = out.rglob("*_seg.nii.gz")
    return seg


def _torchscript_run(ts: Path, nifti: Path, out: Path) -> Path:
    import nibabel as nib
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged

    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
                   ScaleIntensityRanged("image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True)])
    d = pre({"image": str(nifti)})
    net = torch.jit.load(str(ts), map_location="cpu").eval()
    with torch.inference_mode():
        logits = sliding_window_inference(d["image"][None].float(), roi_size=ROI, sw_batch_size=1, predictor=net,
                                          overlap=0.25, mode="gaussian")
    assert isinstance(logits, torch.Tensor)
    label = torch.argmax(logits, dim=1)[0].to(torch.uint8).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, np.asarray(d["image"].affine, float)), str(out))
    return out


@pytest.mark.parametrize("series", REAL_SERIES)
def test_monai_parity_with_its_own_entry_points(model, tmp_path: Path, series: str, monkeypatch) -> None:
    """Both model kinds on one series: the series is loaded and converted once (dcm2niix is slow on JPEG 2000)."""
    monkeypatch.chdir(tmp_path)
    dicom_dir = real_series_dicom(series, tmp_path)
    volume = load_series(sorted(dicom_dir.glob("*.dcm")), decode_workers=1)
    niftis = {codes: nifti_as(dicom_dir, volume, codes, tmp_path / f"{codes}.nii.gz") for codes in ("LAS", "LPS")}
    for kind in ("bundle", "torchscript"):
        spec = ({"bundle": str(model["bundle"]), "device": "cpu", "threads": 1} if kind == "bundle" else
                {"torchscript": str(model["ts"]), "window": WINDOW, "roi_size": ROI, "device": "cpu", "threads": 1})
        backend_monai.clear_cache()
        prof = tissue_profile("monai", spec, TISSUES, name="orient")
        got = get_backend("monai").segment(volume, prof, phase="contrast")
        for codes, nifti in niftis.items():
            out = (_bundle_run(model["bundle"], nifti, tmp_path / f"{kind}_{codes}") if kind == "bundle" else
                   _torchscript_run(model["ts"], nifti, tmp_path / f"{kind}_{codes}" / "seg.nii.gz"))
            ref = np.rint(on_volume_grid(out, volume))
            for tissue, label in (("organ", 1), ("bone", 2)):
                d = dice(got[tissue], ref == label)
                print(f"{kind} {series} {codes} {tissue}: {int((ref == label).sum())} voxels, Dice node vs MONAI {d:.4f}")
                assert (ref == label).sum() > 100, (kind, series, codes, tissue)  # the segment is there to compare
                assert d >= 0.99, (kind, series, codes, tissue, d)
