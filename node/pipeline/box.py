"""Bounding boxes of ``[k, j, i]`` masks: the pipeline's one helper for cropping work to a mask."""

from __future__ import annotations

from typing import Sequence

import numpy as np

Box = tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray, margin: int = 0) -> Box | None:
    """Slices ``(k, j, i)`` of the smallest box holding every true voxel of a 3-D ``mask``,
    grown by ``margin`` voxels on every side (within the array); ``None`` for an empty mask."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    # the other two axes are searched on the slices that hold the mask only
    sub = mask[ks[0] : ks[-1] + 1]
    js = np.flatnonzero(sub.any(axis=(0, 2)))
    ii = np.flatnonzero(sub.any(axis=(0, 1)))
    box = (slice(int(ks[0]), int(ks[-1]) + 1), slice(int(js[0]), int(js[-1]) + 1), slice(int(ii[0]), int(ii[-1]) + 1))
    return grow_box(box, (margin, margin, margin), mask.shape) if margin else box


def grow_box(box: Sequence[slice], margin_kji: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin_kji`` voxels per axis on both sides, cropped to an array of ``shape``."""
    k, j, i = (
        slice(max(0, b.start - int(m)), min(int(n), b.stop + int(m))) for b, m, n in zip(box, margin_kji, shape)
    )
    return (k, j, i)
