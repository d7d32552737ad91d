"""The in-memory volume every backend works on (:class:`Volume`) and its link back to the source
frames.  Conventions used everywhere in ``node.pipeline``:

* ``Volume.array`` is indexed ``[k, j, i]`` = ``[slice, row, column]`` (C order, so it maps
  without copying onto VTK/ITK images whose x axis is the DICOM column);
* ``Volume.affine`` maps ``(i, j, k, 1)`` to DICOM LPS mm: column 0 is the row cosine
  (IOP[0:3]) times the column spacing, column 1 the column cosine (IOP[3:6]) times the row
  spacing, column 2 the slice step;
* ``Volume.frames`` are the *original* frames: :meth:`Volume.mask_on_frames` maps a mask back
  onto them: the grid slice holding a frame's own pixels where the grid has one
  (``frame_slices``), otherwise every pixel's centre looked up in the grid (nearest neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SourceFrame:
    """One original image frame (a single-frame instance or one frame of a multi-frame one)."""

    path: Path | None
    """File the frame was read from (``None`` when built in memory)."""
    frame_number: int | None
    """1-based frame number inside a multi-frame instance, ``None`` for single-frame."""
    sop_instance_uid: str
    position: np.ndarray
    """ImagePositionPatient (LPS mm) of the first transmitted pixel."""
    orientation: np.ndarray
    """ImageOrientationPatient: row cosine (3) followed by column cosine (3)."""
    pixel_spacing: tuple[float, float]
    """(spacing between rows, spacing between columns) in mm, as DICOM PixelSpacing."""
    rows: int
    columns: int

    def pixel_to_patient(self) -> np.ndarray:
        """4x4 matrix mapping ``(column, row, 0, 1)`` of this frame to LPS mm."""
        row_cos = np.asarray(self.orientation[:3], dtype=float)
        col_cos = np.asarray(self.orientation[3:], dtype=float)
        m = np.eye(4)
        m[:3, 0] = row_cos * self.pixel_spacing[1]
        m[:3, 1] = col_cos * self.pixel_spacing[0]
        m[:3, 2] = np.cross(row_cos, col_cos)
        m[:3, 3] = np.asarray(self.position, dtype=float)
        return m


@dataclass
class SeriesInfo:
    """Identity and descriptive tags of the series a volume came from."""

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    series_description: str = ""
    series_number: int | None = None
    contrast_applied: bool = False
    """True when the header says a contrast agent was given (ContrastBolusAgent etc.)."""
    source_datasets: list[Any] = field(default_factory=list)
    """pydicom Datasets (headers, pixel data removed) of the source instances, in frame order;
    a multi-frame source appears once.  Used to reference the source in the DICOM SEG."""


@dataclass
class Volume:
    """A CT volume in Hounsfield units on a regular grid, with its geometry and provenance."""

    array: np.ndarray
    affine: np.ndarray
    info: SeriesInfo
    frames: list[SourceFrame]
    resampled: bool = False
    warnings: list[str] = field(default_factory=list)
    frame_slices: tuple[int, ...] | None = None
    """For each frame (in ``frames`` order) the grid slice that holds its pixels unmodified, voxel
    for pixel (an exact grid, see :mod:`node.pipeline.series.geometry`); ``None`` when the grid
    does not hold the frames' pixels (orthogonal resampling, a working grid)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``(i, j, k)`` = (column step, row step, slice step)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def grid_factors(self, grid_mm: float) -> tuple[int, int, int]:
        """Integer block factors ``(fk, fj, fi)`` that bring the voxel size closest to ``grid_mm``
        (never below the native size: an axis already coarser keeps factor 1)."""
        si, sj, sk = self.spacing
        return max(1, int(round(grid_mm / sk))), max(1, int(round(grid_mm / sj))), max(1, int(round(grid_mm / si)))

    def downsampled(self, factors: tuple[int, int, int]) -> "Volume":
        """A coarser volume: HU averaged over ``fk x fj x fi`` blocks (partial edge blocks
        averaged over what they hold), affine scaled to the block centres.

        The original frames are kept and the result is marked ``resampled``, so
        :meth:`mask_on_frames` maps masks computed on it back onto every source frame.
        """
        fk, fj, fi = (int(f) for f in factors)
        if (fk, fj, fi) == (1, 1, 1):
            return self
        a = self.array
        nk, nj, ni = (-(-n // f) for n, f in zip(a.shape, (fk, fj, fi)))
        acc = np.zeros((nk, nj, ni), np.float32)
        cnt = np.zeros((nk, nj, ni), np.float32)
        # sum shifted strided views: no full-size float copy of the volume
        for dk in range(fk):
            for dj in range(fj):
                for di in range(fi):
                    part = a[dk::fk, dj::fj, di::fi]
                    acc[: part.shape[0], : part.shape[1], : part.shape[2]] += part
                    cnt[: part.shape[0], : part.shape[1], : part.shape[2]] += 1
        acc /= cnt
        out = np.rint(acc).astype(np.int16) if a.dtype == np.int16 else acc
        scale = np.diag([fi, fj, fk, 1.0])
        scale[:3, 3] = [(fi - 1) / 2.0, (fj - 1) / 2.0, (fk - 1) / 2.0]
        return Volume(
            out,
            self.affine @ scale,
            self.info,
            self.frames,
            resampled=True,
            warnings=list(self.warnings),
        )

    def mask_on_frames(self, mask: np.ndarray) -> np.ndarray:
        """Map a boolean mask on the volume grid onto the original frames.

        Returns an array ``(len(frames), rows, columns)`` of bools, frame order as
        ``self.frames``.  Where the grid holds the frames' own pixels (``frame_slices``) this
        is the grid slice of each frame; otherwise every source pixel's centre is looked up in the volume
        (nearest neighbour), so tilted or unevenly spaced frames get exactly the labels
        that lie at their pixels in patient space.
        """
        if mask.shape != self.array.shape:
            raise ValueError(f"mask shape {mask.shape} != volume shape {self.array.shape}")
        if self.frame_slices is not None:
            # the grid holds every frame's own pixels: the frame's mask is that grid slice
            return np.take(mask.astype(bool, copy=False), list(self.frame_slices), axis=0)
        if not self.resampled and len(self.frames) == mask.shape[0]:
            return mask.astype(bool, copy=False)
        inv = np.linalg.inv(self.affine)
        nk, nj, ni = mask.shape
        maps = [_separable_map(inv @ fr.pixel_to_patient(), fr.rows, fr.columns) for fr in self.frames]
        seps = [m for m in maps if m is not None]
        if len(seps) == len(maps):
            first = seps[0]
            if all(np.array_equal(m[1], first[1]) and np.array_equal(m[2], first[2]) for m in seps):
                # frame axes along the grid axes with one row/column map for every frame
                # (block-downsampled or evenly resampled stacks): three gathers for the lot
                return _gather(mask, np.array([m[0] for m in seps]), first[1], first[2])
        out = np.zeros((len(self.frames), self.frames[0].rows, self.frames[0].columns), dtype=bool)
        for n, fr in enumerate(self.frames):
            sep = maps[n]
            if sep is not None:
                out[n] = _gather(mask, np.array([sep[0]]), sep[1], sep[2])[0]
                continue
            m = inv @ fr.pixel_to_patient()  # (i, j, k) of the frame's pixels: m @ (column, row, 0, 1)
            jj, ii = np.mgrid[0 : fr.rows, 0 : fr.columns]
            pix = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
            ijk = np.rint(m @ pix)[:3].astype(np.int64)
            ok = (ijk[0] >= 0) & (ijk[0] < ni) & (ijk[1] >= 0) & (ijk[1] < nj) & (ijk[2] >= 0) & (ijk[2] < nk)
            vals = np.zeros(ii.size, dtype=bool)
            vals[ok] = mask[ijk[2, ok], ijk[1, ok], ijk[0, ok]]
            out[n] = vals.reshape(fr.rows, fr.columns)
        return out


def _separable_map(m: np.ndarray, rows: int, columns: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """For a frame whose pixel -> grid-index matrix ``m`` keeps the axes apart (i from the
    column only, j from the row only, constant k), the nearest grid slice and the row and
    column index maps; ``None`` otherwise.  Out-of-grid indices are -1."""
    if max(abs(m[0, 1]), abs(m[1, 0]), abs(m[2, 0]), abs(m[2, 1])) > 1e-6:
        return None
    k = int(np.rint(m[2, 3]))
    ii = np.rint(m[0, 0] * np.arange(columns) + m[0, 3]).astype(np.int64)
    jj = np.rint(m[1, 1] * np.arange(rows) + m[1, 3]).astype(np.int64)
    return k, jj, ii


def _gather(mask: np.ndarray, ks: np.ndarray, jj: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """``out[n, r, c] = mask[ks[n], jj[r], ii[c]]``, False where an index is outside the mask."""
    nk, nj, ni = mask.shape
    out = np.zeros((len(ks), len(jj), len(ii)), dtype=bool)
    okk, okj, oki = (ks >= 0) & (ks < nk), (jj >= 0) & (jj < nj), (ii >= 0) & (ii < ni)
    if not (okk.any() and okj.any() and oki.any()):
        return out
    part = np.take(mask, ks[okk], axis=0)
    part = np.take(part, jj[okj], axis=1)
    part = np.take(part, ii[oki], axis=2)
    if okk.all() and okj.all() and oki.all():
        return part
    # the index maps are monotonic, so the in-grid entries form one contiguous run per axis
    runs = []
    for ok in (okk, okj, oki):
        idx = np.flatnonzero(ok)
        runs.append(slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == idx.size else idx)
    if all(isinstance(r, slice) for r in runs):
        out[tuple(runs)] = part
    else:
        out[np.ix_(okk, okj, oki)] = part
    return out
