"""HU-threshold backend: body mask, per-tissue thresholds and morphology.

The body's bounding box is cut out first and every tissue is computed on it,
so morphology never runs over the empty field of view; masks are put back on
the full grid at the end.  Sizes in the profile are millimetres and are turned
into voxels with the volume's spacing by :mod:`node.pipeline.morphology`.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from node.pipeline import morphology
from node.pipeline.body import body_mask, bounding_box
from node.pipeline.volume import Volume
from node.profiles import Grow, Profile, Tissue

log = logging.getLogger(__name__)


def _grow(mask: np.ndarray, src: np.ndarray, body: np.ndarray, step: Grow, spacing) -> np.ndarray:
    """Hysteresis: add ``step.hu`` voxels connected to ``mask`` (within ``max_mm`` of it)."""
    lo, hi = step.hu
    allowed = (src >= lo) & (src <= hi) & body
    if step.max_mm:
        dist = ndimage.distance_transform_edt(~mask, sampling=(spacing[2], spacing[1], spacing[0]))
        allowed &= dist <= step.max_mm
    labels, _ = ndimage.label(allowed | mask, structure=ndimage.generate_binary_structure(3, 1))
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[np.unique(labels[mask])] = True
    keep[0] = False
    return keep[labels]


def apply_step(
    step, mask: np.ndarray, src: np.ndarray, body: np.ndarray, spacing, masks: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Apply one profile morphology step to ``mask`` (``masks``: earlier tissues, for ``connected_to``)."""
    op = step.op
    if op in ("closing", "opening", "dilation", "erosion", "median"):
        out = getattr(morphology, op)(mask, step.radius_mm, spacing)
        return out & body if op in ("closing", "dilation") else out
    if op == "fill_holes":
        if getattr(step, "max_area_mm2", None):
            return morphology.fill_holes(mask, step.mode, step.max_area_mm2, spacing) & body
        return morphology.fill_holes(mask, step.mode)
    if op == "remove_thick":
        return morphology.remove_thick(mask, step.radius_mm, spacing)
    if op == "connected_to":
        if masks is None or step.tissue not in masks:
            raise ValueError(f"connected_to: tissue {step.tissue!r} has not been segmented yet")
        return morphology.connected_to(mask, masks[step.tissue], step.margin_mm, spacing)
    if op == "keep_largest":
        return morphology.keep_largest(mask, step.n)
    if op == "remove_small":
        return morphology.remove_small(mask, step.min_ml, spacing)
    if op == "grow":
        return _grow(mask, src, body, step, spacing)
    raise ValueError(f"unknown morphology op {op!r}")  # the profile schema prevents this


class HUBackend:
    """Threshold + morphology segmentation driven entirely by the profile."""

    name = "hu_based"

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        """Return one mask per tissue (full volume grid)."""
        spacing = volume.spacing
        body = body_mask(volume.array, spacing, profile.body_mask)
        box = bounding_box(body, margin=2)
        hu = volume.array[box]
        inside_body = body[box]
        masks: dict[str, np.ndarray] = {}
        smoothed: dict[float, np.ndarray] = {}
        for tissue in profile.tissues:
            src = self._source(hu, tissue, spacing, smoothed)
            lo, hi = tissue.hu_range(phase)  # type: ignore[misc]
            m = (src >= lo) & (src <= hi) & inside_body
            if tissue.inside:
                env = masks[tissue.inside.tissue]
                if tissue.inside.closing_mm:
                    env = morphology.closing(env, tissue.inside.closing_mm, spacing)
                m &= morphology.fill_holes(env, tissue.inside.fill)
            for step in tissue.morphology:
                m = apply_step(step, m, src, inside_body, spacing, masks)
            for other in tissue.exclude:
                m &= ~masks[other]
            masks[tissue.name] = m
            log.debug("tissue %s: %d voxels", tissue.name, int(m.sum()))
        out = {}
        for name, m in masks.items():
            full = np.zeros(volume.array.shape, dtype=bool)
            full[box] = m
            out[name] = full
        return out

    @staticmethod
    def _source(hu: np.ndarray, tissue: Tissue, spacing, cache: dict[float, np.ndarray]) -> np.ndarray:
        if not tissue.smooth_mm:
            return hu
        if tissue.smooth_mm not in cache:
            sigma = [tissue.smooth_mm / s for s in (spacing[2], spacing[1], spacing[0])]
            cache[tissue.smooth_mm] = ndimage.gaussian_filter(hu.astype(np.float32), sigma)
        return cache[tissue.smooth_mm]
