"""``dicom-node dataset export`` and ``dicom-node train nnunet`` (tiny trainer, CPU)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from ai_helpers import truth_on_loaded, write_case_series

from node.pipeline.seg import SegmentSpec, write_seg
from node.pipeline.series.find import select_series
from node.pipeline.series.load import load_series
from node.tools.synth_shapes import make_case

CLI = [sys.executable, "-m", "node.cli"]


def _annotated(case, folder: Path, labels=("organ", "bone")):
    """A CT series and a DICOM SEG of its truth (as a radiologist would send back)."""
    write_case_series(case, folder / "ct", series_description=f"ct {case.seed}", seed=case.seed)
    vol = load_series(select_series([folder / "ct"]))
    truth = truth_on_loaded(case, vol)
    ids = {"organ": 1, "bone": 2}
    specs = [SegmentSpec(label=f"{n}", tissue=n, description=n, color=(200, 50, 50),
                         category=("123037004", "SCT", "Anatomical Structure"),
                         type=("91723000", "SCT", "Anatomical Structure"), mask=truth == ids[n]) for n in labels]
    seg = folder / "seg.dcm"
    write_seg(vol, specs, seg, algorithm_name="reader", algorithm_version="1")
    return vol, truth, seg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cases = [make_case(s) for s in (300, 301)]
    truths = []
    for n, c in enumerate(cases):
        _, t, _ = _annotated(c, root / "in" / f"p{n}")
        truths.append(t)
    # a SEG made on another series (other frame of reference) but claiming to annotate p0's series
    _, _, bad = _annotated(make_case(302), root / "bad")
    ds = pydicom.dcmread(bad)
    p0 = pydicom.dcmread(next((root / "in" / "p0" / "ct").iterdir()), stop_before_pixels=True)
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = p0.SeriesInstanceUID
    ds.save_as(root / "in" / "p0" / "seg_wrong_geometry.dcm")
    out = root / "out"
    r = subprocess.run(CLI + ["dataset", "export", "-i", str(root / "in"), "-o", str(out), "--dataset-id", "991",
                              "--name", "Synth", "--label", "organ=organ", "--label", "bone=bone"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out / "Dataset991_Synth", truths, r.stdout


def test_export_layout_labels_inventory(exported):
    import SimpleITK as sitk

    folder, truths, stdout = exported
    assert "2 case(s) exported, 1 refused" in stdout
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "organ": 1, "bone": 2}
    assert meta["numTraining"] == 2 and meta["channel_names"] == {"0": "CT"}
    assert meta["label_mapping"] == {"organ": ["organ"], "bone": ["bone"]}
    assert meta["input_orientation"] == "LPS"  # what the nnU-Net backend reads from the model folder
    rows = list(csv.DictReader(open(folder / "inventory.csv")))
    assert sorted(r["status"] for r in rows) == ["exported", "exported", "refused"]
    refused = next(r for r in rows if r["status"] == "refused")
    assert "FrameOfReferenceUID differs" in refused["reason"]
    assert {r["labels_present"] for r in rows if r["status"] == "exported"} == {"organ;bone"}
    labs = sorted((folder / "labelsTr").glob("*.nii.gz"))
    assert len(labs) == 2 and len(list((folder / "imagesTr").glob("*_0000.nii.gz"))) == 2
    # label images equal the truth on the node's grid (same axes the nnU-Net backend uses)
    got = {int(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).sum()) for p in labs}
    want = {int(np.where(t == 2, 2, t == 1).sum()) for t in truths}
    assert got == want


@pytest.mark.slow
def test_train_tiny_and_register_profile(exported, tmp_path):
    pytest.importorskip("torch", reason="AI extras not installed")
    pytest.importorskip("nnunetv2", reason="nnunetv2 not installed")
    folder, _, _ = exported
    prof = tmp_path / "profiles" / "synth_nnunet.yaml"
    env = {**os.environ, "DICOM_NODE_MODELS": str(tmp_path / "models")}
    r = subprocess.run(CLI + ["train", "nnunet", "--dataset", str(folder), "--work", str(tmp_path / "work"),
                              "--tiny", "--epochs", "2", "--iterations", "4", "--device", "cpu", "--fold", "all",
                              "--profile", str(prof)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = tmp_path / "models" / "Dataset991_Synth" / "TinyTrainer__nnUNetPlans__3d_fullres"
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()
    import torch

    ck = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["optimizer_state"] is None and ck["trainer_name"] == "nnUNetTrainer"
    from node.profiles import load_profile_file

    p = load_profile_file(prof)
    assert p.model_type == "nnunet" and p.model["folder"] == "Dataset991_Synth/TinyTrainer__nnUNetPlans__3d_fullres"
    assert [t.structures for t in p.tissues] == [["organ"], ["bone"]]
    # the registered model runs through the backend (2 epochs: no quality claim)
    from node.pipeline.ai import common as ai_common
    from node.pipeline.backends import check_profile
    from node.tools.synth_shapes import case_volume

    ai_common.configure(models_root=tmp_path / "models")
    try:
        assert check_profile(p) is None
        from node.pipeline.backends import get_backend

        masks = get_backend("nnunet").segment(case_volume(make_case(7)), p, phase="contrast")
        assert set(masks) == {"organ", "bone"}
    finally:
        ai_common._settings["models_root"] = None


def test_export_in_another_orientation(exported, tmp_path):
    """``--orientation LAS``: images stored rows reversed (as dcm2niix does), said in dataset.json,
    same voxels at the same patient positions."""
    import nibabel as nib

    folder, _, _ = exported
    src = folder.parent.parent / "in"
    r = subprocess.run(CLI + ["dataset", "export", "-i", str(src), "-o", str(tmp_path), "--dataset-id", "992",
                              "--name", "Las", "--label", "organ=organ", "--orientation", "las"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    las = tmp_path / "Dataset992_Las"
    assert json.loads((las / "dataset.json").read_text())["input_orientation"] == "LAS"
    a: Any = nib.load(str(folder / "imagesTr" / "case_0000_0000.nii.gz"))
    b: Any = nib.load(str(las / "imagesTr" / "case_0000_0000.nii.gz"))
    assert "".join(nib.aff2axcodes(a.affine)) == "LPS" and "".join(nib.aff2axcodes(b.affine)) == "LAS"
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj)[:, ::-1, :])
    np.testing.assert_allclose(b.affine @ [0, 0, 0, 1], a.affine @ [0, a.shape[1] - 1, 0, 1], atol=1e-3)
