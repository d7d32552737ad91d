"""Body outline: the patient without the CT table, head holders, arcs, cables and air; every
tissue threshold is restricted to it.  Found on a grid of about 2 mm and refined at full
resolution only at the skin.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.pipeline.hu import morphology
from node.pipeline.box import bounding_box, grow_box
from node.profiles import BodyMaskSpec

WORK_GRID_MM = 2.0


def _steps(spacing: tuple[float, float, float], every_slice: bool = False) -> tuple[int, int, int]:
    """Integer subsampling factors (k, j, i) giving a ~2 mm working grid (in-plane only with
    ``every_slice``)."""
    si, sj, sk = spacing
    fk, fj, fi = (max(1, int(WORK_GRID_MM // s)) for s in (sk, sj, si))
    return (1 if every_slice else fk, fj, fi)


def _fill_with_cut_edges(soft: np.ndarray, region: np.ndarray,
                         cut: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> np.ndarray:
    """``soft`` with its holes filled slice by slice, where the edge of the image counts as
    closed wherever the thresholded ``region`` reaches it: a body cut by the field of view (an
    arm at the edge) still encloses its bone there, while a device stays open to the air.
    ``cut``: which edges (first row, last row, first column, last column) are the image's own
    (a box inside the image is open to the air beyond its edges)."""
    padded = np.zeros((soft.shape[0], soft.shape[1] + 2, soft.shape[2] + 2), dtype=bool)
    padded[:, 1:-1, 1:-1] = soft
    if cut[0]:
        padded[:, 0, 1:-1] = region[:, 0, :]
    if cut[1]:
        padded[:, -1, 1:-1] = region[:, -1, :]
    if cut[2]:
        padded[:, 1:-1, 0] = region[:, :, 0]
    if cut[3]:
        padded[:, 1:-1, -1] = region[:, :, -1]
    return np.ascontiguousarray(morphology.fill_holes(padded, "slice")[:, 1:-1, 1:-1])


def body_mask(hu: np.ndarray, spacing: tuple[float, float, float], spec: BodyMaskSpec | None = None) -> np.ndarray:
    """Boolean mask of the patient's body on the volume grid.

    Threshold above ``threshold_hu``; an opening breaks thin bridges to the table
    and removes cables; components smaller than ``min_component_ml`` are dropped
    (arms lying beside the trunk are separate components and are kept); the
    survivors are grown back inside the threshold and their holes (lungs, bowel
    gas) filled slice by slice.  At full resolution, voxels inside the outline
    are kept whatever their HU, voxels on the outline follow the threshold.

    Patient support devices (table tops, head holders, arcs, U-shapes, ECG leads) are dense
    (``dense_hu`` and up) and lie outside the skin, often touching it through a cushion as
    dense as soft tissue, so the threshold joins them to the patient.  Dense material of the
    body (bone, contrast) is always enclosed by soft tissue in its slice; a device never is.
    So only the softer part of the thresholded region is filled slice by slice, and dense
    voxels are body only where that fill encloses them or where they enclose tissue
    themselves in their slice (a cortex around its marrow whose skin the coarse grid lost; a
    holder, table or lead encloses nothing, or only the air pockets between a holder and the
    table top).  On the outline band, where the coarse grid cannot tell a cushion from the
    thinner holder beside it, dense voxels are decided again at full resolution by the same
    enclosure.
    """
    box, inside = body_mask_box(hu, spacing, spec, margin=0)
    out = np.zeros(hu.shape, dtype=bool)
    out[box] = inside
    return out


def body_mask_box(
    hu: np.ndarray, spacing: tuple[float, float, float], spec: BodyMaskSpec | None = None, *, margin: int = 0,
    every_slice: bool = False,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """``(box, mask)``: the body mask (as :func:`body_mask`) on its bounding box plus ``margin`` voxels;
    ``every_slice``: the coarse outline on every slice (subsampled in-plane only).

    Only the box is ever built at full resolution: the coarse outline bounds it, so the
    full-size mask never has to be allocated, upsampled or searched for its extent.
    """
    spec = spec or BodyMaskSpec()
    if not spec.enabled:
        nk, nj, ni = hu.shape
        return (slice(0, nk), slice(0, nj), slice(0, ni)), np.ones(hu.shape, dtype=bool)
    steps = _steps(spacing, every_slice)
    small = hu[:: steps[0], :: steps[1], :: steps[2]] > spec.threshold_hu
    sp = (spacing[0] * steps[2], spacing[1] * steps[1], spacing[2] * steps[0])
    core = morphology.opening(small, spec.opening_mm, sp) if spec.opening_mm else small
    core = morphology.remove_small(core, spec.min_component_ml, sp)
    empty = (slice(0, 0),) * 3
    if not core.any():
        return empty, np.zeros((0, 0, 0), dtype=bool)
    if spec.opening_mm:
        core = morphology.dilation(core, spec.opening_mm, sp) & small
    if spec.dense_hu is not None:
        dense = hu[:: steps[0], :: steps[1], :: steps[2]] >= spec.dense_hu
        # the soft part, filled per slice: dense material enclosed by it comes back (bone),
        # dense material outside it (devices) does not; what is left of the device's cushion
        # (soft, outside the skin) is dropped when no longer big enough to be a body part
        soft = morphology.remove_small(core & ~dense, spec.min_component_ml, sp)
        if not soft.any():
            return empty, np.zeros((0, 0, 0), dtype=bool)
        filled = _fill_with_cut_edges(soft, core)
        # dense material left outside that encloses something in its slice is bone whose skin
        # the coarse grid lost (a cortex around its marrow); a holder, table or lead encloses nothing
        outside = dense & core & ~filled
        if outside.any():
            # what it encloses must be tissue (marrow), not air: a holder lying on the table top
            # closes air pockets between them; nor the patient's own soft part (a ring of
            # devices around the whole body)
            holes = morphology.fill_holes(outside, "slice") & ~outside & small & ~filled
            if holes.any():
                in_plane = np.zeros((3, 3, 3), dtype=bool)
                in_plane[1] = True
                lab, _ = ndimage.label(outside, structure=in_plane)
                touching = np.unique(lab[ndimage.binary_dilation(holes, structure=in_plane)])
                keep = np.isin(lab, touching[touching > 0])
                filled = _fill_with_cut_edges(soft | keep, core)
        del soft
    else:
        filled = morphology.fill_holes(core, "slice")
    if steps == (1, 1, 1):
        inside = filled
    else:
        # one working voxel of margin around the outline decides by threshold at full
        # resolution: coarse voxels are 0 (outside), 1 (inside) or 2 (on the outline)
        outer = morphology.dilation(filled, max(sp), sp)
        state = outer.view(np.uint8) * np.uint8(2)
        if spec.dense_hu is not None:
            # on the outline band, dense and inside the filled outline (bone the coarse grid
            # decided); the rest of the band's dense voxels are decided at full resolution below
            state[filled & dense & (state == 2)] = 3
            del dense
        # the body goes on beyond the first and last slice: eroded there, their inside (lungs,
        # bowel gas) would be decided by the threshold and drop out of the body
        pad = int(np.ceil(max(sp) / sp[2])) + 1
        state[morphology.erosion(np.pad(filled, ((pad, pad), (0, 0), (0, 0)), mode="edge"), max(sp), sp)[pad:-pad]] = 1
        cbox = bounding_box(outer)
        assert cbox is not None  # the outline holds the non-empty core
        # the full-resolution box of the coarse outline, cropped to the array
        fbox = tuple(
            slice(b.start * f, min(n, b.stop * f)) for b, f, n in zip(cbox, steps, hu.shape)
        )
        up = morphology.upsample_nearest(np.ascontiguousarray(state[cbox]), steps, [b.stop - b.start for b in fbox])
        inside = up >= 2
        inside &= hu[fbox] > spec.threshold_hu
        if spec.dense_hu is not None:
            # on the outline band dense voxels only where the coarse grid took them as bone, or
            # where the band's softer voxels enclose them at full resolution: a cushion and a
            # holder thinner than a working voxel share its voxels, so the coarse fill cannot
            # tell them apart
            band_dense = inside & (up == 2) & (hu[fbox] >= spec.dense_hu)
            inside &= ~band_dense
            if band_dense.any():
                cut = (fbox[1].start == 0, fbox[1].stop == hu.shape[1], fbox[2].start == 0,
                       fbox[2].stop == hu.shape[2])
                enclosed = _fill_with_cut_edges(inside | (up == 1), hu[fbox] > spec.threshold_hu, cut)
                inside |= band_dense & enclosed
                del enclosed
            del band_dense
        inside |= up == 1
        del up
        sub = bounding_box(inside)
        if sub is None:
            return empty, np.zeros((0, 0, 0), dtype=bool)
        tight = tuple(slice(f.start + s.start, f.start + s.stop) for f, s in zip(fbox, sub))
        box = grow_box(tight, (margin, margin, margin), hu.shape)
        out = np.zeros([b.stop - b.start for b in box], dtype=bool)
        out[tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tight, box))] = inside[sub]
        return box, out
    sub = bounding_box(inside, margin=margin)
    if sub is None:
        return empty, np.zeros((0, 0, 0), dtype=bool)
    return sub, np.ascontiguousarray(inside[sub])

