"""Working grid: segment/mesh on block-averaged voxels, SEG still on every source frame."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from node.pipeline.seg import read_seg_masks
from node.pipeline.series.find import find_series
from node.pipeline.series.load import load_series
from node.pipeline.volume import SeriesInfo, SourceFrame, Volume

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"


def _volume(shape=(6, 9, 10), spacing=(0.5, 0.7, 1.5)) -> Volume:
    nk, nj, ni = shape
    iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    frames = [
        SourceFrame(None, None, f"1.2.{k}", np.array([-10.0, -20.0, 5.0 + spacing[2] * k]), iop,
                    (spacing[1], spacing[0]), nj, ni)
        for k in range(nk)
    ]
    aff = frames[0].pixel_to_patient()
    aff[:3, 2] = [0, 0, spacing[2]]
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return Volume(arr, aff, SeriesInfo("1.2", "1", "1.2.3", "CT"), frames)


def _brute_force(vol: Volume, mask: np.ndarray) -> np.ndarray:
    """Nearest-neighbour lookup of every source pixel centre, no shortcuts."""
    inv = np.linalg.inv(vol.affine)
    out = []
    for fr in vol.frames:
        jj, ii = np.mgrid[0 : fr.rows, 0 : fr.columns]
        pts = fr.pixel_to_patient() @ np.stack([ii.ravel(), jj.ravel(), 0 * ii.ravel(), 1 + 0 * ii.ravel()])
        ijk = np.rint(inv @ pts)[:3].astype(int)
        ok = ((ijk >= 0) & (ijk < np.array(mask.shape[::-1])[:, None])).all(0)
        v = np.zeros(ii.size, bool)
        v[ok] = mask[ijk[2, ok], ijk[1, ok], ijk[0, ok]]
        out.append(v.reshape(fr.rows, fr.columns))
    return np.stack(out)


def test_factors_follow_spacing():
    vol = _volume()
    assert vol.grid_factors(1.5) == (1, 2, 3)  # (k, j, i): 1.5/1.5, 1.5/0.7, 1.5/0.5
    assert vol.grid_factors(0.1) == (1, 1, 1)


def test_block_mean_and_affine_centres():
    vol = _volume()
    small = vol.downsampled((2, 3, 2))
    assert small.shape == (3, 3, 5) and small.resampled and small.frames is vol.frames
    block = vol.array[0:2, 0:3, 0:2].astype(float)
    assert small.array[0, 0, 0] == np.rint(block.mean())
    edge = vol.array[4:6, 6:9, 8:10].astype(float)  # last block is complete here
    assert small.array[2, 2, 4] == np.rint(edge.mean())
    # the coarse voxel centre is the mean position of the fine voxel centres of its block
    fine = [vol.affine @ [i, j, k, 1] for k in (0, 1) for j in (0, 1, 2) for i in (0, 1)]
    assert np.allclose(small.affine @ [0, 0, 0, 1], np.mean(fine, axis=0))
    partial = vol.downsampled((4, 4, 4))  # 6x9x10 -> partial edge blocks average what they hold
    assert partial.shape == (2, 3, 3)
    assert partial.array[1, 2, 2] == np.rint(vol.array[4:6, 8:9, 8:10].astype(float).mean())


def test_mask_on_frames_fast_path_equals_brute_force():
    vol = _volume(shape=(7, 11, 13))
    rng = np.random.default_rng(1)
    for factors in [(2, 3, 2), (3, 2, 4), (1, 1, 2)]:
        small = vol.downsampled(factors)
        mask = rng.random(small.shape) > 0.5
        assert np.array_equal(small.mask_on_frames(mask), _brute_force(small, mask))
    # a grid that covers only part of the frames (edges fall outside): still exact
    small = vol.downsampled((2, 2, 2))
    shifted = small.affine.copy()
    shifted[:3, 3] += shifted[:3, :3] @ np.array([1.6, 1.2, 1.4])
    part = Volume(small.array, shifted, small.info, small.frames, resampled=True)
    mask = rng.random(part.shape) > 0.5
    got = part.mask_on_frames(mask)
    assert np.array_equal(got, _brute_force(part, mask))
    assert not got[0].any() and not got[:, 0, :].any()  # outside the grid = background


@pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA}")
def test_run_on_a_working_grid_keeps_every_frame(tmp_path):
    from node.pipeline.run import run_pipeline

    native = run_pipeline([J2K], "liver", tmp_path / "native", write_meshes=False)
    coarse = run_pipeline([J2K], "liver", tmp_path / "coarse", working_grid_mm=2.0)
    rep = json.loads((tmp_path / "coarse" / "report.json").read_text())
    assert rep["input"]["shape_kji"] == [20, 512, 512]
    assert rep["input"]["working_grid"]["factors_kji"] == [1, 2, 2]
    assert rep["input"]["working_grid"]["shape_kji"] == [20, 256, 256]
    assert rep["tissues"]["tissue"]["watertight"] is True
    assert coarse.seg_path is not None
    masks = read_seg_masks(coarse.seg_path)["liver tissue"]
    vol = load_series(next(iter(find_series([J2K]).values())))
    assert len(masks) == 20
    on_frames = np.stack([masks[f.sop_instance_uid] for f in vol.frames])
    ref = native.masks["tissue"]
    dice = 2 * (on_frames & ref).sum() / (on_frames.sum() + ref.sum())
    assert dice > 0.95, dice
