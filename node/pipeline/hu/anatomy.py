"""Anatomy-aware morphology steps of the HU backend: where an organ lies, not only its HU.

A threshold finds tissue of an organ's density; these steps decide which of it is the
organ, from what anatomy and physics say about it:

* ``select``: cut the mask into parts at necks narrower than the organ (an opening), give
  every voxel back to its nearest part, and keep the parts on the expected side of the
  patient, at the expected distance from the midline and the spine, of a plausible size.
* ``adapt_hu``: re-threshold at the organ's own density, its core's median +- k robust SD
  (scanners, kV and patients shift soft tissue by 10-20 HU; the order of the organs stays).
* ``drop_gas``: drop the parts whose core is gas (within 50 HU of air): bowel gas is pure
  air, lung parenchyma is air mixed with tissue and blood (about -850 HU).
* ``subtract``: remove earlier tissues before the next steps (a neighbour found first, e.g. the
  liver before the right kidney is cut from what touches it).
* ``trachea``: the air tube that enters the scan at its top near the midline, surrounded
  by soft tissue, followed down through the carina until its branches meet the lungs.

Directions are the patient's (DICOM LPS through the volume's affine), so they hold for any
array orientation; sizes are millimetres.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from node.pipeline.box import bounding_box
from node.pipeline.hu import morphology

Spacing = Sequence[float]  # (i, j, k) mm

#: the ops this module implements (dispatched from :func:`node.pipeline.hu.backend.apply_step`)
OPS = frozenset({"select", "adapt_hu", "drop_gas", "trachea", "subtract"})
#: those of them that read earlier tissues' masks
DEPENDENT_OPS = frozenset({"subtract"})
#: those of them that read the tissue's thresholded source values
SOURCE_OPS = frozenset({"adapt_hu"})

#: bone for the spine landmark: cortical and dense cancellous bone, above any soft tissue
#: or unenhanced blood (contrast-filled vessels reach it, but not as a column on the midline)
BONE_HU = 200.0
#: half-width of the band around the body's centre searched for the spine, mm
SPINE_BAND_MM = 30.0
#: at least this much bone in that band for a slice to have a spine, mm^2
SPINE_MIN_MM2 = 100.0


@dataclass
class Context:
    """What the anatomy steps read besides the mask: the CT values on the backend's box,
    the body mask, the spacing and the box's voxel -> LPS affine.  The patient frame
    (midline and spine per slice) is found once, on first use."""

    hu: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    _frame: Frame | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def frame(self) -> Frame:
        with self._lock:
            if self._frame is None:
                self._frame = patient_frame(self.hu, self.body, self.spacing, self.affine)
            return self._frame


@dataclass(frozen=True)
class Frame:
    """The patient's frame on the box grid, per slice ``k``: the midline (LPS x, mm) and the
    spine's centre (LPS y, mm; the body's centre where no spine is seen).  ``spine_found``
    says in how many slices the spine itself was seen."""

    mid_x: np.ndarray
    spine_y: np.ndarray
    spine_found: int


def _lps(affine: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """LPS coordinates (rows x, y, z) of voxel positions ``kji`` (3 x N, index order k, j, i)."""
    ijk = np.asarray(kji, dtype=np.float64)[::-1]
    return np.asarray(affine[:3, :3] @ ijk + affine[:3, 3:4])


def patient_frame(hu: np.ndarray, body: np.ndarray, spacing: Spacing, affine: np.ndarray) -> Frame:
    """Midline and spine per slice, from the body mask and bone near its centre.

    In each slice the spine is the bone (>= ``BONE_HU``) within ``SPINE_BAND_MM`` of the
    body's centre (left-right); its centroid gives the midline and the spine's AP position.
    Slices without enough bone there take the values of the nearest slices that have it; a
    series without any (a head, a limb) uses the body's centroid.
    """
    nk = hu.shape[0]
    mid = np.full(nk, np.nan)
    ap = np.full(nk, np.nan)
    body_x = np.full(nk, np.nan)
    body_y = np.full(nk, np.nan)
    px_mm2 = spacing[0] * spacing[1]
    rows, cols = np.arange(body.shape[1], dtype=np.float64), np.arange(body.shape[2], dtype=np.float64)
    for k in range(nk):
        b = body[k]
        area = int(np.count_nonzero(b))
        if area == 0:
            continue
        # the centroid's position is the position of the mean index (the affine is linear)
        cj = float(b.sum(axis=1, dtype=np.int64) @ rows) / area
        ci = float(b.sum(axis=0, dtype=np.int64) @ cols) / area
        centre = _lps(affine, np.array([[k], [cj], [ci]]))[:, 0]
        body_x[k], body_y[k] = float(centre[0]), float(centre[1])
        bone = b & (hu[k] >= BONE_HU)
        bj, bi = np.nonzero(bone)
        if bj.size == 0:
            continue
        bp = _lps(affine, np.stack([np.full(bj.size, k), bj, bi]))
        near = np.abs(bp[0] - body_x[k]) <= SPINE_BAND_MM
        if near.sum() * px_mm2 >= SPINE_MIN_MM2:
            mid[k], ap[k] = float(bp[0][near].mean()), float(bp[1][near].mean())
    found = int(np.isfinite(mid).sum())
    for arr, fallback in ((mid, body_x), (ap, body_y)):
        ok = np.isfinite(arr)
        if ok.any():
            arr[:] = np.interp(np.arange(nk), np.flatnonzero(ok), arr[ok])
        else:
            good = np.isfinite(fallback)
            arr[:] = np.interp(np.arange(nk), np.flatnonzero(good), fallback[good]) if good.any() else 0.0
    if found:
        # a vertebra's centroid moves with its posterior elements from slice to slice: the
        # median over about a vertebra's height (25 mm) follows the column instead
        half = max(1, round(12.5 / spacing[2]))
        mid = ndimage.median_filter(mid, size=2 * half + 1, mode="nearest")
        ap = ndimage.median_filter(ap, size=2 * half + 1, mode="nearest")
    return Frame(mid, ap, found)


# --------------------------------------------------------------------------- parts and select


def _block_factors(spacing: Spacing, target_mm: float) -> tuple[int, int, int]:
    """(k, j, i) block sizes giving voxels of at most about ``target_mm``."""
    def factor(s: float) -> int:
        return max(1, int(target_mm // s))

    return factor(spacing[2]), factor(spacing[1]), factor(spacing[0])


def _block_majority(mask: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """``mask`` on blocks of ``f`` voxels: a block is set when at least half of it is (a block
    "any" would close the fat planes between organs that the split needs)."""
    if f == (1, 1, 1):
        return mask
    pad = [(0, (-n) % s) for n, s in zip(mask.shape, f)]
    m = np.pad(mask, pad) if any(p[1] for p in pad) else mask
    kk, jj, ii = (n // s for n, s in zip(m.shape, f))
    counts = m.reshape(kk, f[0], jj, f[1], ii, f[2]).sum(axis=(1, 3, 5), dtype=np.int32)
    return counts * 2 >= f[0] * f[1] * f[2]


def split_parts(mask: np.ndarray, spacing: Spacing, split_mm: float) -> tuple[np.ndarray, int]:
    """Label map of ``mask`` cut into parts at necks narrower than ``2 * split_mm``.

    The parts are the connected components of the mask opened by a ball of ``split_mm``;
    the voxels of the mask one voxel from a part (the rim a discrete opening takes at
    corners) go to the nearest part; what the opening removed beyond that (bridges, thin
    structures alongside) belongs to no part (label 0).  Parts are found on a grid of about
    ``split_mm / 2`` (the neck's scale; a block is in the mask when half of it is), so the
    cost does not grow with the series' resolution.
    """
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), 0
    if split_mm <= 0:
        lab, n = ndimage.label(mask)
        return lab, int(n)
    f = _block_factors(spacing, split_mm / 2)
    small = _block_majority(mask, f)
    sp = (spacing[0] * f[2], spacing[1] * f[1], spacing[2] * f[0])
    # the organ goes on beyond the scan's first and last slices: repeat them, so that a
    # series thinner than the ball (a 40 mm slab) is not opened away
    pad = int(np.ceil(split_mm / sp[2])) + 1
    opened = morphology.opening(np.pad(small, ((pad, pad), (0, 0), (0, 0)), mode="edge"), split_mm, sp)[pad:-pad]
    core, n = ndimage.label(opened)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.int32), 0
    dist, idx = ndimage.distance_transform_edt(core == 0, sampling=(sp[2], sp[1], sp[0]), return_indices=True)
    lab = core[tuple(idx)]
    del idx
    # one (working) voxel around each part is its own; on a coarse grid that also covers the
    # full-resolution voxels of the blocks the majority left out at the part's edge
    lab[dist > max(sp)] = 0
    del dist
    if f != (1, 1, 1):
        lab = morphology.upsample_nearest(lab, f, mask.shape)
    lab = np.where(mask, lab, 0).astype(np.int32)
    return lab, int(n)


@dataclass(frozen=True)
class Part:
    """One candidate part: its label, volume and position in the patient's frame."""

    label: int
    ml: float
    side: str  # "left" | "right" (of the midline)
    lateral_mm: float  # centroid's distance from the midline
    anterior_mm: float  # centroid in front of (+) or behind (-) the spine's centre
    slice: int  # the centroid's slice


def describe_parts(lab: np.ndarray, n: int, ctx: Context) -> list[Part]:
    """Volume and position of each labelled part (patient left = +x in LPS)."""
    if n == 0:
        return []
    frame = ctx.frame
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    idx = np.flatnonzero(counts[1:]) + 1  # labels a later split emptied have no centre
    centres = ndimage.center_of_mass(lab > 0, lab, idx)
    voxel_ml = float(np.prod(ctx.spacing)) / 1000.0
    out = []
    for label, c in zip(idx, centres):
        k = int(np.clip(round(c[0]), 0, lab.shape[0] - 1))
        x, y, _ = _lps(ctx.affine, np.array([[c[0]], [c[1]], [c[2]]]))[:, 0]
        dx = float(x - frame.mid_x[k])
        out.append(Part(int(label), counts[label] * voxel_ml, "left" if dx > 0 else "right", abs(dx),
                        float(frame.spine_y[k] - y), k))
    return out


def _split_oversized(lab: np.ndarray, count: int, spacing: Spacing, split_mm: float, max_split_mm: float,
                     max_ml: float) -> tuple[np.ndarray, int]:
    """Parts larger than ``max_ml`` cut again at wider necks (``split_mm`` x 1.25 per round, up
    to ``max_split_mm``): an organ merged with its neighbours through several bridges."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    radius = split_mm
    while True:
        radius = min(radius * 1.25, max_split_mm)
        sizes = np.bincount(lab.ravel(), minlength=count + 1) * voxel_ml
        big = [int(x) for x in np.flatnonzero(sizes > max_ml) if x > 0]
        if not big:
            return lab, count
        for label in big:
            part = lab == label
            box = bounding_box(part)
            if box is None:
                continue
            sub, m = split_parts(part[box], spacing, radius)
            view = lab[box]
            view[part[box]] = 0
            inside = sub > 0
            view[inside] = sub[inside] + count
            count += m
        if radius >= max_split_mm:
            return lab, count


def select(mask: np.ndarray, ctx: Context, *, split_mm: float = 0, side: str = "any", n: int = 1,
           lateral_mm: tuple[float, float] | None = None, anterior_mm: tuple[float, float] | None = None,
           min_ml: float = 0, max_ml: float | None = None, max_split_mm: float = 0) -> np.ndarray:
    """The parts of ``mask`` (see :func:`split_parts`) that lie where the organ lies.

    A part is a candidate when its centroid is on ``side`` of the midline (``left``,
    ``right``; ``any`` or ``both``: either), ``lateral_mm`` from the midline,
    ``anterior_mm`` in front of the spine's centre (negative: behind it), and its volume in
    [``min_ml``, ``max_ml``].  Kept: the ``n`` largest candidates, or with ``side: both``
    the ``n`` largest on each side (paired organs).  With ``max_split_mm``, parts larger
    than ``max_ml`` are cut again at wider necks, up to that radius.
    """
    lab, count = split_parts(mask, ctx.spacing, split_mm)
    if max_ml is not None and max_split_mm > split_mm:
        lab, count = _split_oversized(lab, count, ctx.spacing, split_mm, max_split_mm, max_ml)
    parts = describe_parts(lab, count, ctx)
    ok = []
    for p in parts:
        if side in ("left", "right") and p.side != side:
            continue
        if lateral_mm is not None and not lateral_mm[0] <= p.lateral_mm <= lateral_mm[1]:
            continue
        if anterior_mm is not None and not anterior_mm[0] <= p.anterior_mm <= anterior_mm[1]:
            continue
        if p.ml < min_ml or (max_ml is not None and p.ml > max_ml):
            continue
        ok.append(p)
    ok.sort(key=lambda p: -p.ml)
    if side == "both":
        keep = [p for s in ("left", "right") for p in [q for q in ok if q.side == s][:n]]
    else:
        keep = ok[:n]
    if not keep:
        return np.zeros(mask.shape, dtype=bool)
    lut = np.zeros(count + 1, dtype=bool)
    lut[[p.label for p in keep]] = True
    return lut[lab]


# --------------------------------------------------------------------------- adapt_hu


def robust_range(values: np.ndarray, sd: float) -> tuple[float, float, float, float]:
    """``(median, sigma, low, high)``: sigma is 1.4826 x the median absolute deviation (the
    standard deviation of normal noise, unmoved by a few vessels or lesions)."""
    med = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - med)))
    return med, sigma, med - sd * sigma, med + sd * sigma


def adapt_hu(mask: np.ndarray, src: np.ndarray, ctx: Context, *, core_mm: float, sd: float,
             limits: tuple[float, float] | None = None, grow_mm: float | None = None) -> np.ndarray:
    """Re-threshold at the organ's own density: ``median +- sd * sigma`` of the HU in its core
    (the mask eroded by ``core_mm``; the whole mask when nothing is that thick), clipped to
    ``limits``, within the mask grown by ``grow_mm`` (None: anywhere in the body); the
    result keeps what is connected to the core."""
    if not mask.any():
        return mask
    core = morphology.erosion(mask, core_mm, ctx.spacing) if core_mm > 0 else mask
    if not core.any():
        core = mask
    _, _, lo, hi = robust_range(src[core], sd)
    if limits is not None:
        lo, hi = max(lo, limits[0]), min(hi, limits[1])
    region = (src >= lo) & (src <= hi) & ctx.body
    if grow_mm is not None:
        region &= morphology.dilation(mask, grow_mm, ctx.spacing) if grow_mm > 0 else mask
    return morphology.components_touching(region | core, core)


# --------------------------------------------------------------------------- drop_gas


def drop_gas(mask: np.ndarray, ctx: Context, *, core_mm: float = 3, air_hu: float = -950,
             fraction: float = 0.5) -> np.ndarray:
    """Remove the connected parts whose core is gas: at least ``fraction`` of their voxels
    ``core_mm`` or more inside the part (beyond the wall's partial volume) are below
    ``air_hu``.  A part too thin to have such a core is judged on all its voxels."""
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask)
    core = morphology.erosion(mask, core_mm, ctx.spacing) if core_mm > 0 else mask
    gas = ctx.hu < air_hu
    gas &= mask
    # counts per part from the labels of the selected voxels only (no float copy of the volume)
    all_n = np.bincount(lab[mask], minlength=n + 1)
    all_gas = np.bincount(lab[gas], minlength=n + 1)
    core_n = np.bincount(lab[core], minlength=n + 1)
    gas &= core
    core_gas = np.bincount(lab[gas], minlength=n + 1)
    del gas, core
    use_core = core_n > 0
    frac = np.where(use_core, core_gas / np.maximum(core_n, 1), all_gas / np.maximum(all_n, 1))
    keep = frac < fraction
    keep[0] = False
    return keep[lab]


# --------------------------------------------------------------------------- trachea


@dataclass(frozen=True)
class AirwayLimits:
    """What makes an air tube the trachea or a main bronchus (adult and child anatomy)."""

    min_area_mm2: float = 40  # a child's trachea (7 mm across) and up
    max_area_mm2: float = 700  # an adult's trachea is 15-25 mm across (<= ~500 mm^2)
    midline_mm: float = 30  # the trachea's centre lies this close to the midline
    min_length_mm: float = 30  # a tube this long at least (esophageal air is thinner, patchy)
    bronchi_mm: float = 40  # below the carina, main bronchi followed this far at most
    wall_mm: float = 4  # the ring around the lumen checked for soft tissue
    max_ring_air: float = 0.3  # a trachea is surrounded by soft tissue, not lung


def _superior_first(affine: np.ndarray, nk: int) -> list[int]:
    """Slice indices from the patient's head downwards (LPS +z is superior)."""
    return list(range(nk)) if affine[2, 2] < 0 else list(range(nk - 1, -1, -1))


def _ring_air(comp: np.ndarray, air: np.ndarray, wall_px: tuple[int, int]) -> float:
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * wall_px[0] + 1, 2 * wall_px[1] + 1))
    ring = cv2.dilate(comp.view(np.uint8), ker).view(bool) & ~comp
    return float(air[ring].mean()) if ring.any() else 1.0


def trachea(mask: np.ndarray, ctx: Context, limits: AirwayLimits = AirwayLimits()) -> np.ndarray:
    """Trachea and main bronchi in the air ``mask``: found in the top slice, followed down.

    The seed is the largest air component of the top slice with a lumen of
    ``min_area_mm2`` .. ``max_area_mm2`` within ``midline_mm`` of the midline whose ring
    (``wall_mm``) is soft tissue.  Going down, a slice's air components that overlap the
    tube so far join it, except those that are lung: larger than ``max_area_mm2`` or ringed
    by air.  After the carina (two branches) the bronchi are followed ``bronchi_mm`` at
    most.  A tube shorter than ``min_length_mm`` is not an airway (nothing is returned).
    """
    out = np.zeros(mask.shape, dtype=bool)
    nk = mask.shape[0]
    if nk == 0 or not mask.any():
        return out
    px = ctx.spacing[0] * ctx.spacing[1]
    wall = (max(1, round(limits.wall_mm / ctx.spacing[0])), max(1, round(limits.wall_mm / ctx.spacing[1])))
    order = [k for k in _superior_first(ctx.affine, nk) if ctx.body[k].any()]
    if not order:
        return out
    frame = ctx.frame
    top = order[0]
    n, lab, stats, cents = cv2.connectedComponentsWithStats(mask[top].view(np.uint8), connectivity=8)
    best, best_area = 0, 0.0
    for c in range(1, n):
        area = stats[c, cv2.CC_STAT_AREA] * px
        if not limits.min_area_mm2 <= area <= limits.max_area_mm2:
            continue
        x = _lps(ctx.affine, np.array([[top], [cents[c][1]], [cents[c][0]]]))[0, 0]
        if abs(x - frame.mid_x[top]) > limits.midline_mm:
            continue
        comp = lab == c
        if _ring_air(comp, mask[top], wall) > limits.max_ring_air:
            continue
        if area > best_area:
            best, best_area = c, area
    if not best:
        return out
    current = lab == best
    out[top] = current
    length = 0.0
    below_carina: float | None = None
    for k in order[1:]:
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask[k].view(np.uint8), connectivity=8)
        hit = np.unique(lab[current])
        nxt = np.zeros_like(current)
        branches = 0
        for c in hit[hit > 0]:
            comp = lab == c
            if stats[c, cv2.CC_STAT_AREA] * px > limits.max_area_mm2:
                continue  # a lung reached in this slice
            if _ring_air(comp, mask[k], wall) > limits.max_ring_air:
                continue  # inside the lung
            nxt |= comp
            branches += 1
        if not nxt.any():
            break
        length += ctx.spacing[2]
        if branches >= 2 and below_carina is None:
            below_carina = 0.0
        elif below_carina is not None:
            below_carina += ctx.spacing[2]
            if below_carina > limits.bronchi_mm:
                break
        out[k] = nxt
        current = nxt
    if length + ctx.spacing[2] < limits.min_length_mm:
        return np.zeros(mask.shape, dtype=bool)
    return out


# --------------------------------------------------------------------------- dispatch


def apply_step(step: Any, mask: np.ndarray, src: np.ndarray | None, ctx: Context,
               masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Run one of :data:`OPS` (a profile step) on ``mask``; ``src`` is the thresholded source,
    ``masks`` the earlier tissues (for :data:`DEPENDENT_OPS`)."""
    op = step.op
    if op == "subtract":
        out = mask.copy()
        for name in step.tissues:
            if masks is None or name not in masks:
                raise ValueError(f"subtract: tissue {name!r} has not been segmented yet")
            other = masks[name]
            out &= ~(morphology.dilation(other, step.margin_mm, ctx.spacing) if step.margin_mm else other)
        return out
    if op == "select":
        return select(mask, ctx, split_mm=step.split_mm, side=step.side, n=step.n,
                      lateral_mm=step.lateral_mm, anterior_mm=step.anterior_mm,
                      min_ml=step.min_ml, max_ml=step.max_ml, max_split_mm=step.max_split_mm) & mask
    if op == "adapt_hu":
        if src is None:
            raise ValueError("adapt_hu reads the source values, which this tissue was segmented without")
        return adapt_hu(mask, src, ctx, core_mm=step.core_mm, sd=step.sd, limits=step.limits, grow_mm=step.grow_mm)
    if op == "drop_gas":
        return drop_gas(mask, ctx, core_mm=step.core_mm, air_hu=step.air_hu, fraction=step.fraction)
    if op == "trachea":
        return trachea(mask, ctx, AirwayLimits(bronchi_mm=step.bronchi_mm, midline_mm=step.midline_mm,
                                               max_area_mm2=step.max_area_mm2, min_area_mm2=step.min_area_mm2,
                                               min_length_mm=step.min_length_mm))
    raise ValueError(f"unknown anatomy op {op!r}")
