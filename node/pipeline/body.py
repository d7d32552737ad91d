"""Body outline: the patient, without the CT table, cushions, cables and air.

Everything a tissue threshold sees is first restricted to this mask, so a bone
threshold never picks up the table and a soft-tissue threshold never picks up
a blanket.  The outline is found on a grid of about 2 mm (a few times fewer
voxels than a 0.7 mm scan) and refined at full resolution only at the skin,
which keeps it cheap on 512x512x400 series.
"""

from __future__ import annotations

import numpy as np

from node.pipeline import morphology
from node.profiles import BodyMaskSpec

WORK_GRID_MM = 2.0


def _steps(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Integer subsampling factors (k, j, i) giving a ~2 mm working grid."""
    si, sj, sk = spacing
    return tuple(max(1, int(WORK_GRID_MM // s)) for s in (sk, sj, si))  # type: ignore[return-value]


def _upsample(mask: np.ndarray, steps: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling by integer factors, cropped to ``shape``."""
    out = mask
    for axis, f in enumerate(steps):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def body_mask(hu: np.ndarray, spacing: tuple[float, float, float], spec: BodyMaskSpec | None = None) -> np.ndarray:
    """Boolean mask of the patient's body on the volume grid.

    Threshold above ``threshold_hu``; an opening breaks thin bridges to the table
    and removes cables; components smaller than ``min_component_ml`` are dropped
    (arms lying beside the trunk are separate components and are kept); the
    survivors are grown back inside the threshold and their holes (lungs, bowel
    gas) filled slice by slice.  At full resolution, voxels inside the outline
    are kept whatever their HU, voxels on the outline follow the threshold.
    """
    spec = spec or BodyMaskSpec()
    if not spec.enabled:
        return np.ones(hu.shape, dtype=bool)
    steps = _steps(spacing)
    small = hu[:: steps[0], :: steps[1], :: steps[2]] > spec.threshold_hu
    sp = (spacing[0] * steps[2], spacing[1] * steps[1], spacing[2] * steps[0])
    core = morphology.opening(small, spec.opening_mm, sp) if spec.opening_mm else small
    core = morphology.remove_small(core, spec.min_component_ml, sp)
    if not core.any():
        return np.zeros(hu.shape, dtype=bool)
    if spec.opening_mm:
        core = morphology.dilation(core, spec.opening_mm, sp) & small
    filled = morphology.fill_holes(core, "slice")
    if steps == (1, 1, 1):
        return filled
    # one working voxel of margin around the outline decides by threshold at full resolution
    outer = _upsample(morphology.dilation(filled, max(sp), sp), steps, hu.shape)
    inner = _upsample(morphology.erosion(filled, max(sp), sp), steps, hu.shape)
    return inner | (outer & (hu > spec.threshold_hu))


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice]:
    """Slices of the smallest box (plus ``margin`` voxels) that holds every true voxel."""
    if not mask.any():
        return (slice(0, 0),) * 3  # type: ignore[return-value]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, nz[0] - margin), min(mask.shape[axis], nz[-1] + 1 + margin)))
    return tuple(out)  # type: ignore[return-value]
