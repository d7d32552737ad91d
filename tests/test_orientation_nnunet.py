"""The nnU-Net backend against nnU-Net's own entry point on NIfTIs of a real series stored in
other orientations (dcm2niix's LAS, LPS): per-segment parity once the model's
``input_orientation`` is honoured."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="AI extras not installed")
pytest.importorskip("nnunetv2", reason="nnunetv2 not installed")

from ai_helpers import HELD_OUT_SEEDS, NNUNET_TINY, tissue_profile, write_case_series

from node.pipeline.ai import nnunet as backend_nnunet
from node.pipeline.orientation import axis_codes, to_orientation
from node.tools.synth_shapes import dice, make_case


def _model_as(tmp_path: Path, codes: str) -> Path:
    """The tiny model folder, its dataset.json stating ``codes`` as the training orientation."""
    folder = tmp_path / f"model_{codes}"
    shutil.copytree(NNUNET_TINY, folder)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["input_orientation"] = codes
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def _nnunet_predict(model: Path, nifti: Path, out: Path) -> Path:
    exe = shutil.which("nnUNetv2_predict_from_modelfolder") or str(
        Path(__file__).resolve().parents[1] / ".venv" / "bin" / "nnUNetv2_predict_from_modelfolder")
    inp = out / "in"
    inp.mkdir(parents=True)
    shutil.copy(nifti, inp / "case_0000.nii.gz")
    subprocess.run([exe, "-i", str(inp), "-o", str(out / "pred"), "-m", str(model), "-f", "0", "-device", "cpu",
                    "--disable_tta", "-npp", "1", "-nps", "1"], check=True, capture_output=True, timeout=600)
    return out / "pred" / "case.nii.gz"


def _on_volume_grid(nifti: Path, volume) -> np.ndarray:
    """A NIfTI label map on the volume grid, by its affine (flips and permutations only)."""
    import nibabel as nib

    img: Any = nib.load(str(nifti))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    idx = np.rint(np.linalg.inv(lps) @ (volume.affine @ pts))[:3].astype(int)
    data = np.asarray(img.dataobj)
    assert np.all((idx >= 0) & (idx < np.array(data.shape)[:, None]))
    return data[idx[0], idx[1], idx[2]].reshape(volume.shape)


def _write_nifti(volume, codes: str, path: Path) -> None:
    import nibabel as nib

    r = to_orientation(volume.array.astype(np.int16), volume.affine, codes)
    nib.save(nib.Nifti1Image(r.array.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ r.affine), str(path))


def _node(volume, model: Path) -> dict[str, np.ndarray]:
    from node.pipeline.backends import get_backend

    prof = tissue_profile("nnunet", {"folder": str(model), "folds": [0], "device": "cpu"},
                          [("organ", {"labels": [1]}), ("bone", {"labels": [2]})], name="orient")
    backend_nnunet.clear_cache()
    return get_backend("nnunet").segment(volume, prof, phase="contrast")


@pytest.mark.parametrize("codes", ["LPS", "LAS"])
def test_nnunet_parity_with_nnunetv2_predict(tmp_path: Path, codes: str) -> None:
    """The node on a DICOM series against nnUNetv2 on the same series stored as ``codes``
    (LAS: converted by dcm2niix where it is installed), for a model stating ``codes``."""
    from node.pipeline.series.load import load_series

    case = make_case(HELD_OUT_SEEDS[0])
    files = write_case_series(case, tmp_path / "dicom")
    volume = load_series(files, decode_workers=1)
    assert axis_codes(volume.affine) == "LPS"
    model = _model_as(tmp_path, codes)
    nifti = tmp_path / "image.nii.gz"
    if codes == "LAS" and shutil.which("dcm2niix"):
        conv = tmp_path / "dcm2niix"
        conv.mkdir()
        subprocess.run(["dcm2niix", "-z", "y", "-f", "image", "-o", str(conv), str(tmp_path / "dicom")],
                       check=True, capture_output=True, timeout=120)
        shutil.copy(conv / "image.nii.gz", nifti)
        import nibabel as nib

        conv_img: Any = nib.load(str(nifti))
        assert "".join(nib.aff2axcodes(conv_img.affine)) == "LAS"  # dcm2niix's storage
    else:
        _write_nifti(volume, codes, nifti)
    ref = _on_volume_grid(_nnunet_predict(model, nifti, tmp_path / "nnunet"), volume)
    got = _node(volume, model)
    assert backend_nnunet.last_run_info()["input_orientation"] == codes
    for name, label in (("organ", 1), ("bone", 2)):
        d = dice(got[name], ref == label)
        print(f"{codes} {name}: Dice node vs nnUNetv2_predict {d:.4f}")
        assert d >= 0.99, (codes, name, d)
