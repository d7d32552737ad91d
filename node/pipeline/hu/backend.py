"""HU-threshold backend: body mask, per-tissue thresholds and morphology.

The body's bounding box is cut out first and every tissue is computed on it,
so morphology never runs over the empty field of view; masks are put back on
the full grid at the end.  Sizes in the profile are millimetres and are turned
into voxels with the volume's spacing by :mod:`node.pipeline.hu.morphology`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage

from node.errors import ProfileError
from node.pipeline.hu import anatomy, morphology, refine
from node.pipeline.box import bounding_box, grow_box
from node.pipeline.hu.body import body_mask_box
from node.pipeline.hu.morphology import Spacing
from node.pipeline.volume import Volume
from node.profiles import Grow, Inside, MorphologyStep, Profile, Tissue

log = logging.getLogger(__name__)


#: the profile steps that read the tissue's thresholded source values (the others read only masks)
_SOURCE_OPS = frozenset({"grow", "edge_grow"}) | anatomy.SOURCE_OPS

def _grow(mask: np.ndarray, src: np.ndarray, body: np.ndarray, step: Grow, spacing: Spacing) -> np.ndarray:
    """Hysteresis: add ``step.hu`` voxels connected to ``mask`` (within ``max_mm`` of it)."""
    lo, hi = step.hu
    allowed = src >= lo
    allowed &= src <= hi
    allowed &= body
    if step.max_mm:
        dist = ndimage.distance_transform_edt(~mask, sampling=(spacing[2], spacing[1], spacing[0]))
        allowed &= dist <= step.max_mm
        del dist
    allowed |= mask
    return morphology.components_touching(allowed, mask)


def _hu_range(tissue: Tissue, phase: str) -> tuple[float, float]:
    """The tissue's HU range for ``phase``; a profile made for a model backend may have none."""
    r = tissue.hu_range(phase)
    if r is None:
        raise ProfileError(f"tissue {tissue.name!r} has no 'hu' range: the profile is not one for the HU backend")
    return r


def apply_step(
    step: MorphologyStep, mask: np.ndarray, src: np.ndarray | None, body: np.ndarray, spacing: Spacing,
    masks: dict[str, np.ndarray] | None = None, *, hu: np.ndarray | None = None, ctx: anatomy.Context | None = None,
) -> np.ndarray:
    """Apply one profile morphology step to ``mask`` (``src``: the tissue's thresholded values, for
    ``grow`` and ``edge_grow``, ``None`` for a tissue without them; ``masks``: earlier tissues, for
    ``connected_to``; ``hu``: the unsmoothed CT values, for ``slice_valleys``; ``ctx``: the body box's
    geometry, for the anatomy steps)."""
    if step.op in anatomy.OPS:
        if ctx is None:
            raise ValueError(f"{step.op} needs the anatomy context")
        return anatomy.apply_step(step, mask, src, ctx, masks)
    if step.op == "slice_valleys":
        if hu is None:
            raise ValueError("slice_valleys needs the CT values")
        basis = mask
        for name in step.without:
            if masks is None or name not in masks:
                raise ValueError(f"slice_valleys: tissue {name!r} has not been segmented yet")
            basis = basis & ~masks[name]
        kept = morphology.slice_valleys(basis, hu, spacing, step.window_mm, step.ratio, step.min_area_mm2,
                                        core_mm=step.core_mm)
        return mask & ~(basis & ~kept)
    if step.op in ("closing", "opening", "dilation", "erosion", "median"):
        out = getattr(morphology, step.op)(mask, step.radius_mm, spacing)
        return out & body if step.op in ("closing", "dilation") else out
    if step.op == "fill_holes":
        if step.max_area_mm2:
            return morphology.fill_holes(mask, step.mode, step.max_area_mm2, spacing) & body
        return morphology.fill_holes(mask, step.mode)
    if step.op == "remove_thick":
        return morphology.remove_thick(mask, step.radius_mm, spacing)
    if step.op == "connected_to":
        if masks is None or step.tissue not in masks:
            raise ValueError(f"connected_to: tissue {step.tissue!r} has not been segmented yet")
        return morphology.connected_to(mask, masks[step.tissue], step.margin_mm, spacing)
    if step.op == "keep_largest":
        return morphology.keep_largest(mask, step.n)
    if step.op == "remove_small":
        return morphology.remove_small(mask, step.min_ml, spacing)
    if step.op in _SOURCE_OPS and src is None:  # _croppable() keeps such tissues off the no-source path
        raise ValueError(f"{step.op} reads the source values, which this tissue was segmented without")
    if step.op == "grow" and src is not None:
        return _grow(mask, src, body, step, spacing)
    if step.op == "edge_grow" and src is not None:
        allowed = body
        for name in step.avoid:
            if masks is None or name not in masks:
                raise ValueError(f"edge_grow: tissue {name!r} has not been segmented yet")
            allowed = allowed & ~masks[name]
        return refine.edge_grow(mask, src, spacing, max_mm=step.max_mm, background_mm=step.background_mm,
                                level=step.level, floor_hu=step.floor_hu, mode=step.mode, allowed=allowed)
    raise ValueError(f"unknown morphology op {step.op!r}")  # the profile schema prevents this


def _gaussian(hu: np.ndarray, sigma_kji: Sequence[float]) -> np.ndarray:
    """Gaussian of ``hu`` as float32: scipy's ``gaussian_filter`` kernel (``truncate=4``,
    reflecting edges), computed with OpenCV's separable filter in float32.

    OpenCV's vectorised filter needs far less CPU time than scipy's (which computes in
    double, one line at a time); the values agree with scipy's to float32
    rounding (about 1e-3 HU on CT).  In-plane per slice, then along ``k`` on the volume seen
    as a (slices x pixels) image, in column blocks written back in place: one float32
    volume in memory.  Arrays smaller than the kernel use scipy (OpenCV's reflection is
    not defined there).
    """
    kernels = [_gauss_kernel(s) for s in sigma_kji]
    if any(n < len(k) for n, k in zip(hu.shape, kernels)):
        return ndimage.gaussian_filter(hu, sigma_kji, output=np.float32)
    kz, ky, kx = kernels
    out = np.empty(hu.shape, dtype=np.float32)
    for k in range(hu.shape[0]):
        cv2.sepFilter2D(hu[k].astype(np.float32, copy=False), cv2.CV_32F, kx, ky, dst=out[k],
                        borderType=cv2.BORDER_REFLECT)
    if len(kz) > 1:
        flat = out.reshape(hu.shape[0], -1)
        one = np.ones(1, dtype=np.float32)
        block = 1 << 15
        for c in range(0, flat.shape[1], block):
            flat[:, c:c + block] = cv2.sepFilter2D(flat[:, c:c + block], cv2.CV_32F, one, kz,
                                                   borderType=cv2.BORDER_REFLECT)
    return out


def _gauss_kernel(sigma: float) -> np.ndarray:
    """scipy's normalised 1-D gaussian kernel for ``sigma`` (``truncate=4``), float32."""
    r = _gauss_radius(sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2) if sigma > 0 else (x == 0).astype(np.float64)
    return (w / w.sum()).astype(np.float32)


def _gauss_radius(sigma: float) -> int:
    """Half-width of scipy's gaussian kernel (``truncate=4``)."""
    return int(4.0 * float(sigma) + 0.5)


class HUBackend:
    """Threshold + morphology segmentation driven entirely by the profile."""

    #: calls ``on_mask`` as each tissue is final (see :meth:`segment`)
    streams_masks = True

    def segment(
        self,
        volume: Volume,
        profile: Profile,
        *,
        phase: str,
        on_mask: Callable[[str, np.ndarray], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Return one mask per tissue (full volume grid).

        ``on_mask(name, mask)`` is called with each tissue's final full-grid mask as soon
        as it is computed (later tissues never change an earlier one), so that the caller
        can mesh it while the next tissues are segmented.  The masks passed are the ones
        returned; the callee must not modify them.
        """
        spacing = volume.spacing
        out: dict[str, np.ndarray] = {}
        # an exact grid through uneven slices (node.pipeline.series.geometry): every grid slice
        # for the outline, so that it is found on the original slices, not only on the ones
        # interpolated between them
        every_slice = volume.frame_slices is not None and volume.resampled
        box, inside_body = body_mask_box(volume.array, spacing, profile.body_mask, margin=2, every_slice=every_slice)
        hu = volume.array[box]
        masks: dict[str, np.ndarray] = {}
        shift = np.eye(4)
        shift[:3, 3] = [box[2].start or 0, box[1].start or 0, box[0].start or 0]
        ctx = anatomy.Context(hu, inside_body, spacing, volume.affine @ shift)
        # Smoothed sources that the whole box needs are computed in a background thread
        # while the other tissues' morphology (SimpleITK, which releases the GIL) runs.
        # A tissue inside another one only needs its source on the envelope's box.
        full_smooth = {t.smooth_mm for t in profile.tissues if t.smooth_mm and not self._croppable(t)}
        last_use = {t.smooth_mm: i for i, t in enumerate(profile.tissues) if t.smooth_mm}
        # an envelope (its closing is the costliest step) is made once for all the tissues
        # inside or outside it, and kept bit-packed (1/8 of a mask) until the last of them
        envelopes: dict[tuple[str, float, str], tuple[np.ndarray, tuple[int, ...]]] = {}
        env_last = {self._env_key(e): i for i, t in enumerate(profile.tissues) for e in (t.inside, t.outside) if e}

        def envelope(spec: Inside, idx: int) -> np.ndarray:
            key = self._env_key(spec)
            if key in envelopes:
                packed, shape = envelopes[key]
                return np.unpackbits(packed, count=int(np.prod(shape))).view(bool).reshape(shape)
            e = masks[spec.tissue]
            if spec.closing_mm:
                e = morphology.closing(e, spec.closing_mm, spacing)
            e = morphology.fill_holes(e, spec.fill)
            if env_last[key] > idx:
                envelopes[key] = (np.packbits(e), e.shape)
            return e

        def head(tissue: Tissue, n_steps: int) -> np.ndarray:
            """A tissue's threshold and its first ``n_steps`` steps, which read no other tissue."""
            src = smoothed[tissue.smooth_mm].result() if tissue.smooth_mm else hu
            lo, hi = _hu_range(tissue, phase)
            m = (src >= lo) & (src <= hi) & inside_body
            for step in tissue.morphology[:n_steps]:
                m = apply_step(step, m, src, inside_body, spacing, None, hu=hu, ctx=ctx)
            return m

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hu-smooth") as pool:
            smoothed: dict[float, Future] = {
                mm: pool.submit(_gaussian, hu, self._sigma(mm, spacing)) for mm in sorted(full_smooth, reverse=True)
            }
            # The start of a later tissue that depends on no other tissue (its threshold and
            # leading steps) runs in the same background thread, after the smoothing, while
            # the first tissues are segmented: it fills the core that their single-threaded
            # steps leave idle.
            heads: dict[int, tuple[Future, int]] = {}
            for idx, tissue in enumerate(profile.tissues):
                n_head = self._independent_steps(tissue)
                if idx > 0 and not tissue.inside and n_head:
                    heads[idx] = (pool.submit(head, tissue, n_head), n_head)
            for idx, tissue in enumerate(profile.tissues):
                t0 = time.perf_counter()
                lo, hi = _hu_range(tissue, phase)
                env = envelope(tissue.inside, idx) if tissue.inside else None
                steps = tissue.morphology
                if idx in heads:
                    future, n_head = heads.pop(idx)
                    m = future.result()
                    steps = steps[n_head:]
                    src = smoothed[tissue.smooth_mm].result() if tissue.smooth_mm else hu
                elif env is not None and tissue.smooth_mm and self._croppable(tissue):
                    src = None  # only the _SOURCE_OPS steps read the source, and this tissue has none
                    m = self._threshold_on(env, hu, tissue.smooth_mm, spacing, lo, hi) & inside_body
                else:
                    if tissue.smooth_mm:
                        src = smoothed[tissue.smooth_mm].result()
                    else:
                        src = hu
                    m = (src >= lo) & (src <= hi) & inside_body
                    if env is not None:
                        m &= env
                del env
                for step in steps:
                    m = apply_step(step, m, src, inside_body, spacing, masks, hu=hu, ctx=ctx)
                for other in tissue.exclude:
                    m &= ~masks[other]
                if tissue.outside:
                    m &= ~envelope(tissue.outside, idx)
                for key in [k for k, last in env_last.items() if last == idx]:
                    envelopes.pop(key, None)
                full = np.zeros(volume.array.shape, dtype=bool)
                full[box] = m
                del m
                masks[tissue.name] = m = full[box]  # a view: one copy of each mask, not two
                del src
                if tissue.smooth_mm and last_use[tissue.smooth_mm] == idx:
                    smoothed.pop(tissue.smooth_mm, None)  # free the float32 volume
                out[tissue.name] = full
                if log.isEnabledFor(logging.DEBUG):  # the count is a pass over the box: only when logged
                    log.debug("tissue %s: %d voxels in %.2f s", tissue.name, int(m.sum()), time.perf_counter() - t0)
                if on_mask is not None:
                    on_mask(tissue.name, full)
        return out

    @staticmethod
    def _env_key(spec: Inside) -> tuple[str, float, str]:
        return (spec.tissue, float(spec.closing_mm), spec.fill)

    #: morphology ops that read other tissues' masks
    _DEPENDENT_OPS = frozenset({"connected_to", "edge_grow", "slice_valleys"}) | anatomy.DEPENDENT_OPS

    @classmethod
    def _independent_steps(cls, tissue: Tissue) -> int:
        """How many of the tissue's first morphology steps read no other tissue."""
        n = 0
        for step in tissue.morphology:
            if step.op in cls._DEPENDENT_OPS:
                break
            n += 1
        return n

    @staticmethod
    def _croppable(tissue: Tissue) -> bool:
        """A tissue inside an envelope whose source no morphology step reads."""
        return bool(tissue.inside) and not any(step.op in _SOURCE_OPS for step in tissue.morphology)

    @staticmethod
    def _sigma(smooth_mm: float, spacing: Spacing) -> list[float]:
        return [smooth_mm / s for s in (spacing[2], spacing[1], spacing[0])]

    def _threshold_on(
        self, env: np.ndarray, hu: np.ndarray, smooth_mm: float, spacing: Spacing, lo: float, hi: float
    ) -> np.ndarray:
        """``lo <= gaussian(hu) <= hi`` and ``env``, smoothing only the envelope's box.

        The box is grown by the kernel's half-width (where the array allows), so every
        voxel inside it gets exactly the value the whole-array filter would give it.
        """
        out = np.zeros(env.shape, dtype=bool)
        inner = bounding_box(env)
        if inner is None:
            return out
        sigma = self._sigma(smooth_mm, spacing)
        outer = grow_box(inner, [_gauss_radius(s) for s in sigma], env.shape)
        g = _gaussian(hu[outer], sigma)
        sub = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
        g = g[sub]
        out[inner] = (g >= lo) & (g <= hi) & env[inner]
        return out

    def run_info(self) -> dict[str, Any]:
        """Nothing beyond the report: this backend keeps no state between runs."""
        return {}
