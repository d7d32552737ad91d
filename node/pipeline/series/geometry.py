"""The volume's geometry from ImagePositionPatient / ImageOrientationPatient / PixelSpacing only
(never SliceThickness, InstanceNumber, SliceLocation or GantryDetectorTilt): frames ordered along
the slice normal, duplicates dropped, gantry tilt and uneven spacing resampled onto a regular
grid as dcm2niix does, and the affine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.errors import SeriesError
from node.pipeline.series.decode import same_pixels
from node.pipeline.series.frames import Frame, warn

_MIN_GAP_MM = 0.01
_REL_GAP = 0.01


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
    vol: np.ndarray, stack: Stack, pixel_spacing: tuple[float, float], warnings: list[str]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(volume, affine, resampled)``: the decoded stack on a regular grid (tilt and uneven gaps
    resampled, recorded in ``warnings``) and its affine ``(i, j, k, 1)`` -> LPS mm.

    The tilt correction works in place; resampling along the normal (uneven spacing) briefly
    holds the input and the output stack."""
    frames, d, normal, row_cos, col_cos = stack.frames, stack.d, stack.normal, stack.row_cos, stack.col_cos
    dr, dc = pixel_spacing
    gaps = np.diff(d)
    if np.any(gaps <= _MIN_GAP_MM):
        k = int(np.argmax(gaps <= _MIN_GAP_MM))
        raise SeriesError(
            f"{frames[k].label()} and {frames[k + 1].label()} lie in the same plane at different in-plane "
            "positions (two acquisitions mixed in one series?)",
            path=frames[k + 1].path, tag="ImagePositionPatient",
        )
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
