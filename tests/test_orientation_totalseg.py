"""The TotalSegmentator backend against TotalSegmentator's own entry point (its Python API on a
NIfTI file, what ``TotalSegmentator -i ... -o ... --ml --fast`` runs) on real series stored as
dcm2niix writes them (LAS) and as LPS: per-segment parity (issue 16, part 4).

The weights are the committed tiny nnU-Net laid out as TotalSegmentator's ``total --fast`` model
(as in tests/test_backend_totalseg.py); TotalSegmentator brings every input to its closest
canonical (RAS) orientation before the model and back after, so the storage must not matter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="AI extras not installed (see docs/ai-backends.md)")
pytest.importorskip("totalsegmentator", reason="TotalSegmentator not installed: pip install '.[totalseg]' -c constraints.txt")

from ai_helpers import NNUNET_TINY, REAL_SERIES, nifti_as, on_volume_grid, real_series_dicom, tissue_profile

from node.pipeline.ai import totalseg as bt
from node.pipeline.backends import get_backend
from node.pipeline.series.load import load_series
from node.tools.synth_shapes import dice

FAST_DIR = ("Dataset297_TotalSegmentator_total_3mm_1559subj/"
            "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres")
SEGMENTS = (("organ", "spleen", 1), ("bone", "kidney_right", 2))


@pytest.fixture(scope="module")
def ts_env(tmp_path_factory):
    """The tiny model as TotalSegmentator's total --fast weights, and a home that sends no statistics."""
    root = tmp_path_factory.mktemp("totalseg")
    dest = root / "weights" / FAST_DIR
    (dest / "fold_0").mkdir(parents=True)
    for f in ("dataset.json", "plans.json"):
        shutil.copy2(NNUNET_TINY / f, dest / f)
    shutil.copy2(NNUNET_TINY / "fold_0" / "checkpoint_final.pth", dest / "fold_0" / "checkpoint_final.pth")
    bt.ensure_offline_config(root / "home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOTALSEG_WEIGHTS_PATH", str(root / "weights"))
    mp.setenv("TOTALSEG_HOME_DIR", str(root / "home"))
    yield root
    mp.undo()


@pytest.mark.parametrize("series", REAL_SERIES)
def test_totalseg_parity_with_its_own_entry_point(ts_env, tmp_path: Path, series: str) -> None:
    from totalsegmentator.python_api import totalsegmentator

    dicom_dir = real_series_dicom(series, tmp_path)
    volume = load_series(sorted(dicom_dir.glob("*.dcm")), decode_workers=1)
    prof = tissue_profile("totalsegmentator", {"task": "total", "fast": True, "device": "cpu", "threads": 1},
                          [(t, {"structures": [s]}) for t, s, _ in SEGMENTS], name="orient")
    got = get_backend("totalsegmentator").segment(volume, prof, phase="contrast")
    for codes in ("LAS", "LPS"):
        nifti = nifti_as(dicom_dir, volume, codes, tmp_path / f"{codes}.nii.gz")
        out = tmp_path / f"seg_{codes}.nii.gz"
        totalsegmentator(nifti, out, ml=True, fast=True, task="total", device="cpu", quiet=True,
                         nr_thr_resamp=1, nr_thr_saving=1)
        ref = on_volume_grid(out, volume)
        for tissue, _, label in SEGMENTS:
            d = dice(got[tissue], ref == label)
            print(f"{series} {codes} {tissue}: {int((ref == label).sum())} voxels, "
                  f"Dice node vs TotalSegmentator {d:.4f}")
            assert (ref == label).sum() > 100, (series, codes, tissue)  # the segment is there to compare
            assert d >= 0.99, (series, codes, tissue, d)
