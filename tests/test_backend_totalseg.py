"""TotalSegmentator backend: TotalSegmentator's real code path with the tiny model as its --fast weights.

The committed tiny nnU-Net (tests/fixtures/nnunet_tiny) is laid out as TotalSegmentator
expects the ``total --fast`` model
(``Dataset297_TotalSegmentator_total_3mm_1559subj/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/fold_0``,
checkpoint ``trainer_name`` nnUNetTrainer), so TotalSegmentator loads, resamples, predicts
and maps labels with its own code; its class map names label 1 "spleen" and 2 "kidney_right".
"""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="AI extras not installed (see docs/ai-backends.md)")
pytest.importorskip("totalsegmentator", reason="TotalSegmentator not installed: pip install '.[totalseg]' -c constraints.txt")

from ai_helpers import (HELD_OUT_SEEDS, NNUNET_TINY, fail_on_connect, self_check_hook,
                        tissue_profile, truth_on_loaded, write_case_series)

from node.errors import BackendUnavailable
from node.pipeline.ai import totalseg as bt
from node.pipeline.backends import get_backend
from node.tools.synth_shapes import case_volume, dice, make_case

FAST_DIR = ("Dataset297_TotalSegmentator_total_3mm_1559subj/"
            "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres")


@pytest.fixture(scope="module")
def ts_env(tmp_path_factory):
    """A weights folder holding the tiny model as total --fast, and a fresh TotalSegmentator home."""
    root = tmp_path_factory.mktemp("totalseg")
    dest = root / "weights" / FAST_DIR
    (dest / "fold_0").mkdir(parents=True)
    for f in ("dataset.json", "plans.json"):
        shutil.copy2(NNUNET_TINY / f, dest / f)
    shutil.copy2(NNUNET_TINY / "fold_0" / "checkpoint_final.pth", dest / "fold_0" / "checkpoint_final.pth")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOTALSEG_WEIGHTS_PATH", str(root / "weights"))
    mp.setenv("TOTALSEG_HOME_DIR", str(root / "home"))
    yield root
    mp.undo()


MODEL = {"task": "total", "fast": True, "device": "cpu"}


def _profile():
    return tissue_profile("totalsegmentator", MODEL,
                          [("organ", {"structures": ["spleen"]}), ("bone", {"structures": ["kidney_right"]})])


def test_dice_held_out_and_no_network(ts_env):
    self_check_hook()
    case = make_case(HELD_OUT_SEEDS[0])
    with fail_on_connect() as connects:
        masks = get_backend("totalsegmentator").segment(case_volume(case), _profile(), phase="contrast")
    assert connects == []
    d1, d2 = dice(masks["organ"], case.labels == 1), dice(masks["bone"], case.labels == 2)
    print(f"TotalSegmentator (tiny --fast model) Dice organ {d1:.3f} bone {d2:.3f}")
    assert d1 >= 0.9 and d2 >= 0.9
    cfg = json.loads((ts_env / "home" / "config.json").read_text())
    assert cfg["send_usage_stats"] is False


def test_stats_enabled_config_still_never_connects(ts_env):
    """Even if someone switches usage statistics back on, the node's call opens no connection."""
    home = ts_env / "home2"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"totalseg_id": "x", "send_usage_stats": True,
                                                   "prediction_counter": 0}))
    mp = pytest.MonkeyPatch()
    mp.setenv("TOTALSEG_HOME_DIR", str(home))
    try:
        # sabotage the node's config fix so TotalSegmentator really tries to post statistics
        mp.setattr(bt, "ensure_offline_config", lambda h: h / "config.json")
        from node.pipeline.ai import common as ai_common

        refused: list = []
        real = ai_common.no_network

        @contextlib.contextmanager
        def spy():
            with real() as blocked:
                yield blocked
            refused.extend(blocked)

        mp.setattr(ai_common, "no_network", spy)
        with fail_on_connect() as connects:
            get_backend("totalsegmentator").segment(case_volume(make_case(HELD_OUT_SEEDS[1])), _profile(),
                                                    phase="contrast")
        assert connects == []  # the node's no_network guard stopped it before any connect
        # ... and TotalSegmentator did try: the guard refused its statistics post (name lookup)
        assert any("stats.totalsegmentator.com" in r for r in refused), refused
    finally:
        mp.undo()


def test_parity_with_direct_call(ts_env):
    """The node's backend gives the same label map as calling TotalSegmentator directly."""
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    case = make_case(HELD_OUT_SEEDS[1])
    vol = case_volume(case)
    img = bt.to_nifti(vol)
    direct = totalsegmentator(img, None, ml=True, fast=True, task="total", device="cpu", quiet=True,
                              nr_thr_saving=1)
    direct_map = np.asarray(direct.dataobj).astype(np.uint16).transpose(2, 1, 0)
    prof = tissue_profile("totalsegmentator", MODEL, [("organ", {"labels": [1]}), ("bone", {"labels": [2]})])
    masks = get_backend("totalsegmentator").segment(vol, prof, phase="contrast")
    np.testing.assert_array_equal(masks["organ"], direct_map == 1)
    np.testing.assert_array_equal(masks["bone"], direct_map == 2)
    assert isinstance(direct, nib.Nifti1Image)


def test_nifti_file_in(ts_env, tmp_path):
    """TotalSegmentator's own NIfTI-file path with the same weights."""
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    case = make_case(HELD_OUT_SEEDS[0])
    f = tmp_path / "ct.nii.gz"
    nib.save(bt.to_nifti(case_volume(case)), f)
    out = totalsegmentator(f, tmp_path / "seg.nii.gz", ml=True, fast=True, device="cpu", quiet=True,
                           nr_thr_saving=1)
    lab = np.asarray(nib.Nifti1Image.from_filename(tmp_path / "seg.nii.gz").dataobj).transpose(2, 1, 0)
    assert dice(lab == 1, case.labels == 1) >= 0.9
    assert out is not None


def test_dicom_series_in_dicom_seg_out(ts_env, tmp_path):
    """DICOM series -> node pipeline with the TotalSegmentator backend -> DICOM SEG with SNOMED codes."""
    import highdicom as hd

    from node.pipeline.run import run_pipeline

    case = make_case(HELD_OUT_SEEDS[0])
    write_case_series(case, tmp_path / "dicom")
    codes = bt.snomed_mapping()
    prof = tissue_profile("totalsegmentator", MODEL, [("organ", {"structures": ["spleen"]})], name="synth")
    res = run_pipeline([tmp_path / "dicom"], prof, tmp_path / "out", write_meshes=False)
    truth = truth_on_loaded(case, res.volume)
    assert dice(res.masks["organ"], truth == 1) >= 0.9 and res.seg_path is not None
    seg = hd.seg.segread(res.seg_path)
    s0 = seg.SegmentSequence[0]
    assert s0.SegmentAlgorithmName == "TotalSegmentator"
    assert s0.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes["spleen"]["type"][0] == "78961009"


def test_missing_weights_say_folder_and_import_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    with fail_on_connect() as connects, pytest.raises(BackendUnavailable) as err:
        get_backend("totalsegmentator").segment(case_volume(make_case(1)), _profile(), phase="contrast")
    assert connects == []
    msg = str(err.value)
    assert str(tmp_path / "empty" / "Dataset297_TotalSegmentator_total_3mm_1559subj") in msg
    assert "totalseg_import_weights" in msg
    assert not (tmp_path / "empty" / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists()


def test_profile_codes_match_totalsegmentator_mapping():
    """profiles/ai/brain_totalseg.yaml carries TotalSegmentator's SNOMED codes for its structures."""
    from pathlib import Path

    from node.profiles import load_profile_file

    prof = load_profile_file(Path(__file__).parents[1] / "profiles" / "ai" / "brain_totalseg.yaml")
    codes = bt.snomed_mapping()
    for t in prof.tissues:
        for s in t.structures:
            assert s in bt.class_names("total")
        ref = codes[t.structures[0]]
        assert (t.type.value, t.type.meaning) == (ref["type"][0], ref["type"][2])
        assert (t.category.value, t.category.meaning) == (ref["category"][0], ref["category"][2])


@pytest.mark.parametrize("organ", ["pancreas", "heart"])
def test_model_only_organ_profiles_carry_totalsegmentator_codes(organ):
    """profiles/pancreas.yaml and heart.yaml (TotalSegmentator or a refused job) use its names and codes."""
    from node.profiles import load_profile

    prof = load_profile(organ)
    codes = bt.snomed_mapping()
    for t in prof.tissues:
        assert t.structures == [organ] and organ in bt.class_names("total")
        ref = codes[organ]
        assert (t.type.value, t.type.meaning) == (ref["type"][0], ref["type"][2])
        assert (t.category.value, t.category.meaning) == (ref["category"][0], ref["category"][2])
