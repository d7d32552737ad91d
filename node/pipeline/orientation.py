"""Voxel storage orientation: which way each array axis runs, as axis codes (``LPS``: the first
voxel axis ``i`` runs toward patient Left, ``j`` toward Posterior, ``k`` toward Superior, as
nibabel names them), and a volume brought to the orientation a model was trained on and back,
by axis flips and permutations only (no interpolation).

A DICOM axial head-first-supine series on the volume grid is ``LPS``; dcm2niix stores rows the
other way (``LAS``), which is what most public models (and TotalSegmentator's) were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_codes(codes: str) -> str:
    """``codes`` upper-cased when it names one direction of each of L/R, A/P, S/I; else ValueError."""
    c = str(codes).strip().upper()
    if len(c) != 3 or sorted(next(n for n, p in enumerate(_PAIRS) if ch in p) if any(ch in p for p in _PAIRS)
                               else 9 for ch in c) != [0, 1, 2]:
        raise ValueError(f"orientation must be three axis codes, one of L/R, A/P and S/I each (e.g. LAS, LPS, "
                         f"RAS), got {codes!r}")
    return c


def axis_codes(affine_lps: np.ndarray) -> str:
    """The orientation of a grid whose affine maps ``(i, j, k, 1)`` to LPS mm (closest axes)."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(_LPS_TO_RAS @ np.asarray(affine_lps, float)))


@dataclass(frozen=True)
class Reoriented:
    """An array ``[k, j, i]`` brought to ``codes``, its voxel size ``(i, j, k)`` and affine (LPS)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    codes: str
    _to_target: np.ndarray
    _source_shape_ijk: tuple[int, int, int]

    def back(self, array_kji: np.ndarray) -> np.ndarray:
        """An array on this grid (``[k, j, i]``) back on the source grid, exactly."""
        from nibabel.orientations import apply_orientation

        # the inverse of the permutation with flips: target axis tf[n, 0] goes back to axis n
        tf = self._to_target
        inv = np.zeros((3, 2))
        for n in range(3):
            inv[int(tf[n, 0])] = (n, tf[n, 1])
        out = apply_orientation(np.asarray(array_kji).transpose(2, 1, 0), inv)
        assert out.shape == self._source_shape_ijk
        return np.ascontiguousarray(out.transpose(2, 1, 0))


def to_orientation(array_kji: np.ndarray, affine_lps: np.ndarray, codes: str) -> Reoriented:
    """``array_kji`` (affine ``affine_lps``) stored in orientation ``codes``: axes flipped and
    permuted, never resampled."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    codes = check_codes(codes)
    ras = _LPS_TO_RAS @ np.asarray(affine_lps, float)
    tf = ornt_transform(io_orientation(ras), axcodes2ornt(tuple(codes)))
    ijk = np.asarray(array_kji).transpose(2, 1, 0)
    new = apply_orientation(ijk, tf)
    new_ras = ras @ inv_ornt_aff(tf, ijk.shape)
    new_lps = _LPS_TO_RAS @ new_ras
    sx, sy, sz = (float(v) for v in np.linalg.norm(new_lps[:3, :3], axis=0))
    ni, nj, nk = (int(v) for v in ijk.shape)
    return Reoriented(np.ascontiguousarray(new.transpose(2, 1, 0)), (sx, sy, sz), new_lps, codes, tf, (ni, nj, nk))
