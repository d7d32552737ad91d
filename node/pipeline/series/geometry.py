"""The volume's geometry from ImagePositionPatient / ImageOrientationPatient / PixelSpacing only
(never SliceThickness, InstanceNumber, SliceLocation or GantryDetectorTilt): frames ordered along
the slice normal, duplicates dropped, and the regular grid with its affine.  Two grids:

* ``exact``: every original pixel is a grid voxel, unmodified.  Gantry tilt is a sheared affine
  (the slice axis runs along the stack's IPP line, not the normal); uneven gaps get a slice step
  that puts every original slice on a grid slice (snapped by at most a fraction of a
  millimetre), the slices between them interpolated.  Thresholds on this grid are thresholds
  on the images the radiologist sees, and the grid slice of each frame is known
  (``frame_slices``).
* ``orthogonal``: tilt shifted away and uneven gaps interpolated to the median gap, as dcm2niix
  does (what AI models trained on dcm2niix conversions expect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from node.errors import SeriesError
from node.pipeline.series.decode import same_pixels
from node.pipeline.series.frames import Frame, warn

_MIN_GAP_MM = 0.01
_REL_GAP = 0.01
# exact grid with uneven gaps: at most this many times the original slice count (memory and
# time), and an original slice is snapped onto its grid slice by at most this fraction of the step
# when a step that small exists
_MAX_SLICE_FACTOR = 4
_SNAP_FRACTION = 0.05

GridKind = Literal["exact", "orthogonal"]


@dataclass(frozen=True)
class Grid:
    """The decoded stack on a regular grid: array, affine ``(i, j, k, 1)`` -> LPS mm, whether it
    was resampled, and for an exact grid the grid slice holding each frame's own pixels."""

    array: np.ndarray
    affine: np.ndarray
    resampled: bool
    frame_slices: tuple[int, ...] | None


@dataclass(frozen=True)
class Stack:
    """The frames ordered along the slice normal, and the directions of the grid."""

    frames: list[Frame]
    d: np.ndarray  # each frame's position along the normal (mm)
    row_cos: np.ndarray
    col_cos: np.ndarray
    normal: np.ndarray


def order_frames(frames: list[Frame], warnings: list[str]) -> Stack:
    """Sort the frames along the normal of the first one's orientation and drop exact duplicates
    (same position and pixels, recorded in ``warnings``); two different frames at one position
    raise :class:`SeriesError`."""
    # sort along the normal
    ref = frames[0]
    row_cos = ref.iop[:3] / np.linalg.norm(ref.iop[:3])
    col_cos = ref.iop[3:] / np.linalg.norm(ref.iop[3:])
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError("row and column cosines are parallel", path=ref.path, tag="ImageOrientationPatient")
    normal /= np.linalg.norm(normal)
    frames.sort(key=lambda fr: float(normal @ fr.ipp))
    d = np.array([normal @ fr.ipp for fr in frames])

    # duplicates
    kept = [frames[0]]
    kept_d = [d[0]]
    for fr, dist in zip(frames[1:], d[1:]):
        prev = kept[-1]
        if abs(dist - kept_d[-1]) <= _MIN_GAP_MM and np.linalg.norm(fr.ipp - prev.ipp) <= 0.1:
            if same_pixels(prev, fr):
                warn(warnings, f"{fr.label()}: duplicate of {prev.label()} (same position and pixels), dropped")
                continue
            raise SeriesError(
                f"two frames at position {np.round(fr.ipp, 3).tolist()} with different pixel data: "
                f"{prev.label()} and {fr.label()} (two acquisitions mixed in one series?)",
                path=fr.path, tag="ImagePositionPatient",
            )
        kept.append(fr)
        kept_d.append(dist)
    frames = kept
    d = np.array(kept_d)
    if len(frames) < 2:
        raise SeriesError("all frames share one position: a volume needs at least 2 slices", path=frames[0].path)
    return Stack(frames, d, row_cos, col_cos, normal)


def regular_grid(
    vol: np.ndarray, stack: Stack, pixel_spacing: tuple[float, float], warnings: list[str],
    kind: GridKind = "orthogonal",
) -> Grid:
    """The decoded stack on a regular grid of ``kind`` (see the module docstring); what was
    corrected is recorded in ``warnings``."""
    _check_gaps(stack)
    if kind == "exact":
        grid = _exact_grid(vol, stack, pixel_spacing, warnings)
        if grid is not None:
            return grid
    arr, affine, resampled = _orthogonal_grid(vol, stack, pixel_spacing, warnings)
    return Grid(arr, affine, resampled, None if resampled else tuple(range(len(stack.frames))))


def _check_gaps(stack: Stack) -> None:
    frames, gaps = stack.frames, np.diff(stack.d)
    if np.any(gaps <= _MIN_GAP_MM):
        k = int(np.argmax(gaps <= _MIN_GAP_MM))
        raise SeriesError(
            f"{frames[k].label()} and {frames[k + 1].label()} lie in the same plane at different in-plane "
            "positions (two acquisitions mixed in one series?)",
            path=frames[k + 1].path, tag="ImagePositionPatient",
        )


def _exact_grid(
    vol: np.ndarray, stack: Stack, pixel_spacing: tuple[float, float], warnings: list[str]
) -> Grid | None:
    """The exact grid, or ``None`` when the in-plane offsets of the slices do not lie on one
    line (no shear explains them: the orthogonal grid takes over)."""
    frames, d, normal, row_cos, col_cos = stack.frames, stack.d, stack.normal, stack.row_cos, stack.col_cos
    dr, dc = pixel_spacing
    rel = np.array([fr.ipp - frames[0].ipp for fr in frames])
    dd = d - d[0]
    inplane = rel - np.outer(dd, normal)
    shear = inplane[-1] / dd[-1]  # in-plane mm per mm along the normal
    inplane_tol = max(_MIN_GAP_MM, 0.01 * min(dr, dc))
    if np.max(np.linalg.norm(inplane - np.outer(dd, shear), axis=1)) > inplane_tol:
        return None
    tilted = bool(np.linalg.norm(shear) * dd[-1] > inplane_tol)
    gaps = np.diff(d)
    median_gap = float(np.median(gaps))
    uneven = bool(np.max(np.abs(gaps - median_gap)) > max(_MIN_GAP_MM, _REL_GAP * median_gap))
    if tilted:
        angle = np.degrees(np.arctan(np.linalg.norm(shear)))
        tilt_tag = frames[0].header.get("GantryDetectorTilt", "")
        warn(
            warnings,
            f"gantry tilt / sheared stack: about {angle:.1f} deg (GantryDetectorTilt says {tilt_tag or 'nothing'}); "
            "kept as a sheared grid (slice axis along the slice positions), no pixel resampled",
        )
    direction = normal + shear  # grid step per mm along the normal
    if not uneven:
        step = dd[-1] / (len(frames) - 1)
        affine = _affine(frames[0].ipp, row_cos, col_cos, dr, dc, direction * step)
        return Grid(vol, affine, False, tuple(range(len(frames))))
    step, slots = _snap_step(dd, float(gaps.min()), len(frames))
    err = float(np.max(np.abs(dd - slots * step)))
    out = _fill_between(vol, slots)
    collided = len(np.unique(slots)) < len(slots)
    warn(
        warnings,
        f"uneven slice spacing: gaps {gaps.min():.3f} to {gaps.max():.3f} mm; grid step {step:.3f} mm with every "
        f"original slice on a grid slice (moved at most {err:.3f} mm along the normal), the slices between "
        "them interpolated linearly"
        + ("; slices closer than the step share a grid slice" if collided else ""),
    )
    affine = _affine(frames[0].ipp, row_cos, col_cos, dr, dc, direction * step)
    return Grid(out, affine, True, tuple(int(v) for v in slots))


def _snap_step(dd: np.ndarray, min_gap: float, n: int) -> tuple[float, np.ndarray]:
    """``(step, slots)``: a slice step for positions ``dd`` (mm from the first slice) and the grid
    slice of each position.  The largest step no longer than the smallest gap (so no two slices
    share a grid slice) that puts every slice within a twentieth of a step of a grid slice; when
    there is none, the step among the candidates that moves the slices least.  Never more than
    ``_MAX_SLICE_FACTOR`` times the original slice count."""
    floor = dd[-1] / (_MAX_SLICE_FACTOR * n)
    median_gap = float(np.median(np.diff(dd)))
    cands = sorted({g / m for g in (median_gap, min_gap) for m in range(1, 13)}, reverse=True)
    cands = [c for c in cands if c <= min_gap * (1 + 1e-9) and c >= floor] or [max(min_gap, floor)]
    best, best_err = cands[0], np.inf
    for c in cands:
        err = float(np.max(np.abs(dd / c - np.rint(dd / c)))) * c
        if err <= max(_MIN_GAP_MM, _SNAP_FRACTION * c):
            best = c
            break
        if err < best_err - 1e-9:
            best, best_err = c, err
    return best, np.rint(dd / best).astype(np.int64)


def _fill_between(vol: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """A stack of ``slots[-1] + 1`` slices: original slice ``k`` unmodified at ``slots[k]``, the
    slices between two originals interpolated linearly between them."""
    out = np.empty((int(slots[-1]) + 1,) + vol.shape[1:], dtype=vol.dtype)
    for k in range(len(slots) - 1):
        a, b = int(slots[k]), int(slots[k + 1])
        for m in range(a + 1, b):
            w = (m - a) / (b - a)
            sl = vol[k].astype(np.float32) * (1 - w) + vol[k + 1].astype(np.float32) * w
            out[m] = np.rint(sl) if vol.dtype.kind == "i" else sl
    for k in range(len(slots)):  # originals last: where two share a slot, the later one is kept
        out[int(slots[k])] = vol[k]
    return out


def _affine(
    origin: np.ndarray, row_cos: np.ndarray, col_cos: np.ndarray, dr: float, dc: float, step: np.ndarray
) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = row_cos * dc
    affine[:3, 1] = col_cos * dr
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return affine


def _orthogonal_grid(
    vol: np.ndarray, stack: Stack, pixel_spacing: tuple[float, float], warnings: list[str]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(volume, affine, resampled)``: the decoded stack on a regular grid (tilt and uneven gaps
    resampled, recorded in ``warnings``) and its affine ``(i, j, k, 1)`` -> LPS mm.

    The tilt correction works in place; resampling along the normal (uneven spacing) briefly
    holds the input and the output stack."""
    frames, d, normal, row_cos, col_cos = stack.frames, stack.d, stack.normal, stack.row_cos, stack.col_cos
    dr, dc = pixel_spacing
    gaps = np.diff(d)
    median_gap = float(np.median(gaps))
    tol = max(_MIN_GAP_MM, _REL_GAP * median_gap)
    rel = np.array([fr.ipp - frames[0].ipp for fr in frames])
    inplane = rel - np.outer(d - d[0], normal)
    off_r = inplane @ col_cos  # mm along the column cosine (row index direction)
    off_c = inplane @ row_cos  # mm along the row cosine (column index direction)
    inplane_tol = max(_MIN_GAP_MM, 0.01 * min(dr, dc))
    tilted = bool(np.max(np.hypot(off_r, off_c)) > inplane_tol)
    uneven = bool(np.max(np.abs(gaps - median_gap)) > tol)
    resampled = tilted or uneven
    fill = float(vol.min())
    if tilted:
        tilt_tag = frames[0].header.get("GantryDetectorTilt", "")
        angle = np.degrees(np.arctan2(np.max(np.hypot(off_r, off_c)), d[-1] - d[0]))
        _shift_inplane(vol, np.stack([off_r / dr, off_c / dc], axis=1), fill)
        warn(
            warnings,
            f"gantry tilt / sheared stack: slice positions deviate up to {np.max(np.hypot(off_r, off_c)):.2f} mm "
            f"from the slice normal (about {angle:.1f} deg; GantryDetectorTilt says {tilt_tag or 'nothing'}); "
            "slices shifted in-plane onto an orthogonal grid",
        )
    if uneven:
        warn(
            warnings,
            f"uneven slice spacing: gaps {gaps.min():.3f} to {gaps.max():.3f} mm; resampled by linear "
            f"interpolation along the slice normal to the median gap {median_gap:.3f} mm",
        )
        vol = _resample_normal(vol, d, median_gap)

    affine = np.eye(4)
    affine[:3, 0] = row_cos * dc
    affine[:3, 1] = col_cos * dr
    if resampled:
        affine[:3, 2] = normal * median_gap
    else:
        affine[:3, 2] = (frames[-1].ipp - frames[0].ipp) / (len(frames) - 1)
    affine[:3, 3] = frames[0].ipp
    return vol, affine, resampled


def _shift_inplane(vol: np.ndarray, shifts: np.ndarray, fill: float) -> None:
    """Shift slice k by ``shifts[k]`` = (rows, cols) pixels in place (linear interpolation)."""
    from scipy import ndimage

    for k in range(vol.shape[0]):
        dr, dc = shifts[k]
        if abs(dr) < 1e-6 and abs(dc) < 1e-6:
            continue
        sl = ndimage.shift(vol[k].astype(np.float32), (dr, dc), order=1, mode="constant", cval=fill)
        vol[k] = np.rint(sl) if vol.dtype.kind == "i" else sl


def _resample_normal(vol: np.ndarray, d: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation of slices at normal coordinates ``d`` onto a regular grid from d[0]."""
    n_new = int(np.floor((d[-1] - d[0]) / spacing + 1e-3)) + 1
    out = np.empty((n_new,) + vol.shape[1:], dtype=vol.dtype)
    for m in range(n_new):
        t = d[0] + m * spacing
        hi = int(np.searchsorted(d, t, side="left"))
        hi = min(max(hi, 1), len(d) - 1)
        lo = hi - 1
        w = (t - d[lo]) / (d[hi] - d[lo])
        w = min(max(w, 0.0), 1.0)
        if w < 1e-6:
            out[m] = vol[lo]
        elif w > 1 - 1e-6:
            out[m] = vol[hi]
        else:
            sl = vol[lo].astype(np.float32) * (1 - w) + vol[hi].astype(np.float32) * w
            out[m] = np.rint(sl) if vol.dtype.kind == "i" else sl
    return out
