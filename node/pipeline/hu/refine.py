"""Intensity-driven refinement of a tissue mask's boundary (the profile's ``edge_grow`` step).

A global HU threshold puts a boundary at the same HU everywhere, but a structure's
partial-volume edge lies half-way between its own density and its surroundings' (a 130 HU
cartilage bar ends near 15 HU in fat, near 90 HU against muscle): the boundary is placed by
that local half-maximum rule.  Conventions as in :mod:`node.pipeline.hu.morphology`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from node.pipeline.box import bounding_box, grow_box

Spacing = Sequence[float]


def _half_widths(radius_mm: float, spacing: Spacing, in_plane: bool) -> tuple[int, int, int]:
    """Per-axis half-widths ``(k, j, i)`` in voxels of a box of ``radius_mm``: at least one voxel
    along every axis the growth moves along (in-plane only with ``in_plane``), so that a radius
    below the voxel size still sees the neighbour the voxel would join."""
    si, sj, sk = (float(s) for s in spacing)
    rk = 0 if in_plane else max(1, int(np.floor(radius_mm / sk + 1e-6)))
    return rk, max(1, int(np.floor(radius_mm / sj + 1e-6))), max(1, int(np.floor(radius_mm / si + 1e-6)))


def _ring(m: np.ndarray, in_plane: bool) -> np.ndarray:
    """Voxels face-adjacent to ``m`` (in-plane only with ``in_plane``) that are not in it."""
    r = np.zeros_like(m)
    r[:, 1:] |= m[:, :-1]
    r[:, :-1] |= m[:, 1:]
    r[:, :, 1:] |= m[:, :, :-1]
    r[:, :, :-1] |= m[:, :, 1:]
    if not in_plane:
        r[1:] |= m[:-1]
        r[:-1] |= m[1:]
    r &= ~m
    return r


def _ring_k(m: np.ndarray) -> np.ndarray:
    """Voxels next to ``m`` across slices only (3D growth on slices thinner than the pixels)."""
    r = np.zeros_like(m)
    r[1:] |= m[:-1]
    r[:-1] |= m[1:]
    r &= ~m
    return r


def _offsets(half: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    rk, rj, ri = half
    return [(a, b, c) for a in range(-rk, rk + 1) for b in range(-rj, rj + 1) for c in range(-ri, ri + 1)]


def edge_grow(
    mask: np.ndarray,
    hu: np.ndarray,
    spacing: Spacing,
    *,
    max_mm: float,
    background_mm: float = 3.0,
    level: float = 0.5,
    floor_hu: float = -150.0,
    mode: str = "slice",
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Grow ``mask`` outwards to the local half-maximum edge, at most ``max_mm`` far.

    A neighbour of the mask joins when its HU is at least
    ``background + level * (tissue - background)``, where ``tissue`` is the mean HU of the
    mask's voxels in a box of half-width ``background_mm / 2`` and ``background`` the lowest
    HU in a box of half-width ``background_mm`` (not below ``floor_hu``, so air or lung next
    to the structure does not drag the edge into fat); both boxes are at least one voxel
    wide along the axes the growth moves along.  One voxel layer is added per step,
    in-plane (``mode="slice"``, 4-connected) or in 3D (6-connected), never further than
    ``max_mm`` along any axis (so not at all where the pixels are coarser than ``max_mm``),
    and no further once nothing joins.  ``allowed`` (e.g. the body minus other tissues)
    bounds the growth.

    Only the voxels next to the mask are evaluated (their windows gathered by offset), so
    the cost follows the mask's surface, not the size of its bounding box.
    """
    if mode not in ("slice", "3d"):
        raise ValueError(f"edge_grow mode must be 'slice' or '3d', got {mode!r}")
    if not 0 < level < 1:
        raise ValueError(f"edge_grow level must be between 0 and 1, got {level}")
    if hu.shape != mask.shape:
        raise ValueError(f"edge_grow: HU shape {hu.shape} != mask shape {mask.shape}")
    in_plane = mode == "slice"
    # layers of voxels within ``max_mm``: in-plane, and across slices (3D mode only)
    steps = int(np.floor(max_mm / min(float(spacing[0]), float(spacing[1])) + 1e-6))
    k_steps = 0 if in_plane else int(np.floor(max_mm / float(spacing[2]) + 1e-6))
    box = bounding_box(mask)
    if box is None or max(steps, k_steps) < 1:
        return mask.copy()
    bg_half = _half_widths(background_mm, spacing, in_plane)
    fg_half = _half_widths(background_mm / 2.0, spacing, in_plane)
    win = [max(x, y) for x, y in zip(bg_half, fg_half)]
    grow = (k_steps, steps, steps)
    # the box holds every voxel the growth can reach; around it, ``win`` voxels of window,
    # taken from the array where it has them and replicated from its faces where it has not
    inner = grow_box(box, grow, mask.shape)
    outer = grow_box(inner, win, mask.shape)
    short = [(w - (i.start - o.start), w - (o.stop - i.stop)) for w, i, o in zip(win, inner, outer)]
    padded = any(p0 or p1 for p0, p1 in short) or not hu.flags.c_contiguous
    grid: np.ndarray
    if padded:
        # windows would leave the array: read them from a copy of the box padded by
        # replicating the array's faces
        h = np.pad(hu[outer], short, mode="edge")
        grid = np.zeros(h.shape, dtype=bool)
        origin = list(win)
    else:
        # windows stay inside the array: read the arrays in place, no copy of the box
        h = hu
        grid = mask.copy()
        origin = [i.start for i in inner]
    core = tuple(slice(o, o + (i.stop - i.start)) for o, i in zip(origin, inner))
    if padded:
        grid[core] = mask[inner]
    m = grid[core]  # a view: the flat writes below grow it
    ok = allowed[inner] if allowed is not None else None
    strides = np.array([grid.shape[1] * grid.shape[2], grid.shape[2], 1], dtype=np.int64)
    bg_flat = [int(np.dot(o, strides)) for o in _offsets(bg_half)]
    fg_flat = [int(np.dot(o, strides)) for o in _offsets(fg_half)]
    hflat, mflat = h.ravel(), grid.ravel()
    lvl = np.float32(level)
    for step in range(max(steps, k_steps)):
        ring = _ring(m, in_plane or step >= k_steps) if step < steps else _ring_k(m)
        if ok is not None:
            ring &= ok
        idx = np.nonzero(ring)
        if idx[0].size == 0:
            break
        base = (idx[0] + origin[0]) * strides[0] + (idx[1] + origin[1]) * strides[1] + (idx[2] + origin[2])
        bg = np.full(base.size, np.inf, dtype=np.float32)
        for off in bg_flat:
            np.minimum(bg, hflat[base + off], out=bg)
        np.maximum(bg, np.float32(floor_hu), out=bg)
        num = np.zeros(base.size, dtype=np.float32)
        cnt = np.zeros(base.size, dtype=np.float32)
        for off in fg_flat:
            inside = mflat[base + off]
            num += np.where(inside, hflat[base + off], 0)
            cnt += inside
        tissue = num / np.maximum(cnt, 1)
        join = (cnt > 0) & (hflat[base] >= bg + lvl * (tissue - bg))
        if not join.any():
            break
        mflat[base[join]] = True
    if not padded:
        return grid
    out = mask.copy()
    out[inner] = m
    return out
