"""nnU-Net backend: real nnUNetPredictor inference with the tiny committed model (CPU).

Skipped when torch / nnunetv2 are not installed (main suite without the AI extras).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch", reason="AI extras not installed (see docs/ai-backends.md)")
pytest.importorskip("nnunetv2", reason="nnunetv2 not installed: pip install '.[nnunet]' -c constraints.txt")

import torch
from ai_helpers import HELD_OUT_SEEDS, NNUNET_TINY, tissue_profile, truth_on_loaded, write_case_series

from node.errors import BackendUnavailable, InputError
from node.pipeline.ai import nnunet as backend_nnunet
from node.pipeline.backends import get_backend
from node.tools.synth_shapes import case_volume, dice, make_case

MODEL = {"folder": str(NNUNET_TINY), "folds": [0], "device": "cpu", "configuration": "3d_fullres"}


def _profile(**over):
    return tissue_profile("nnunet", {**MODEL, **over},
                          [("organ", {"structures": ["organ"]}), ("bone", {"labels": [2]})])


def test_dice_on_held_out_volume_and_warm_cache():
    backend_nnunet.clear_cache()
    be = get_backend("nnunet")
    prof = _profile()
    for n, seed in enumerate(HELD_OUT_SEEDS):
        case = make_case(seed)
        t0 = time.perf_counter()
        masks = be.segment(case_volume(case), prof, phase="contrast")
        dt = time.perf_counter() - t0
        d_organ, d_bone = dice(masks["organ"], case.labels == 1), dice(masks["bone"], case.labels == 2)
        print(f"nnU-Net seed {seed}: Dice organ {d_organ:.3f} bone {d_bone:.3f} ({dt:.2f} s, "
              f"{'cold' if n == 0 else 'warm'})")
        assert d_organ >= 0.9 and d_bone >= 0.9
    assert len(backend_nnunet.cached_models()) == 1  # built once, reused
    _, _, cached = backend_nnunet.get_predictor(backend_nnunet.NnUNetModel(**MODEL))
    assert cached
    assert torch.get_num_threads() == 1


def test_union_of_labels_and_unknown_structure():
    case = make_case(HELD_OUT_SEEDS[0])
    prof = tissue_profile("nnunet", MODEL, [("organ", {"labels": [1, 2]})], name="union")
    m = get_backend("nnunet").segment(case_volume(case), prof, phase="contrast")
    assert dice(m["organ"], (case.labels == 1) | (case.labels == 2)) >= 0.9
    bad = tissue_profile("nnunet", MODEL, [("organ", {"structures": ["pancreas"]})], name="bad")
    with pytest.raises(InputError, match="structure 'pancreas' is not a label"):
        get_backend("nnunet").segment(case_volume(case), bad, phase="contrast")


def test_missing_model_folder_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_NODE_MODELS", str(tmp_path))
    prof = _profile(folder="Dataset501_Pancreas/nnUNetTrainer__nnUNetPlans__3d_fullres")
    with pytest.raises(BackendUnavailable, match=str(tmp_path / "Dataset501_Pancreas")):
        get_backend("nnunet").segment(case_volume(make_case(1)), prof, phase="contrast")


def test_rule_override_end_to_end_dicom_to_seg(tmp_path):
    """run_pipeline(backend='nnunet') on a DICOM series: SEG written, masks match the truth."""
    import highdicom as hd

    from node.pipeline.run import run_pipeline

    case = make_case(HELD_OUT_SEEDS[1])
    write_case_series(case, tmp_path / "dicom")
    # an HU profile that also carries model labels: a rule picks nnunet for it
    prof = tissue_profile("nnunet", MODEL, [("organ", {"structures": ["organ"]}), ("bone", {"labels": [2]})],
                          name="synth")
    res = run_pipeline([tmp_path / "dicom"], prof, tmp_path / "out", backend="nnunet", write_meshes=False)
    truth = truth_on_loaded(case, res.volume)
    assert dice(res.masks["organ"], truth == 1) >= 0.9
    assert dice(res.masks["bone"], truth == 2) >= 0.9 and res.seg_path is not None
    seg = hd.seg.segread(res.seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["synth organ", "synth bone"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "nnU-Net"
    family = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert family.CodeMeaning == "Artificial Intelligence"
    assert res.report["profile"]["model_type"] == "nnunet"
    assert res.report["heap"] is None  # an AI backend's process keeps glibc's heap defaults
