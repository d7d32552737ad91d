"""The image frames of a series' headers (single-frame instances and Enhanced CT frames), the
ones that form the volume (no localizers, one orientation), and their consistency.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.errors import SeriesError
from node.pipeline.series.header import RawPixels

log = logging.getLogger(__name__)

#: Multi-frame CT SOP classes whose geometry lives in the functional groups.
ENHANCED_CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}

_ORIENT_TOL = 1e-3  # on direction cosines


@dataclass
class Frame:
    path: Path
    frame_number: int | None  # 1-based inside a multi-frame object
    header: Dataset
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    ts: str
    localizer: bool = False
    raw: RawPixels | None = None  # set when the frame can be read straight from the file

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])

    def label(self) -> str:
        return f"{self.path}" + (f" frame {self.frame_number}" if self.frame_number else "")


def _floats(value: Any, n: int, path: Path, tag: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"unreadable value {value!r} ({exc})", path=path, tag=tag) from None
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise SeriesError(f"expected {n} numbers, got {value!r}", path=path, tag=tag)
    return arr


def _lookup(groups: list[Dataset | None], seq: str, tag: str) -> Any:
    for g in groups:
        if g is None:
            continue
        s = g.get(seq)
        if s and len(s) and tag in s[0] and s[0][tag].value not in (None, ""):
            return s[0][tag].value
    return None


def _rescale(value: Any, default: float, path: Path, tag: str) -> float:
    if value is None or value == "":
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SeriesError(f"unreadable value {value!r}", path=path, tag=tag) from None
    if not np.isfinite(v):
        raise SeriesError(f"not a finite number: {value!r}", path=path, tag=tag)
    return v


def _is_localizer(ds: Dataset) -> bool:
    it = ds.get("ImageType")
    if it is None:
        return False
    values = [it] if isinstance(it, str) else list(it)
    return "LOCALIZER" in [str(v).strip().upper() for v in values]


def frames_of(path: Path, ds: Dataset) -> list[Frame]:
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    for tag in ("Rows", "Columns"):
        if tag not in ds or ds[tag].value in (None, ""):
            raise SeriesError("missing (not an image?)", path=path, tag=tag)
    rows, cols = int(ds.Rows), int(ds.Columns)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if str(ds.get("SOPClassUID", "")) in ENHANCED_CT_CLASSES or "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence")
        shared0 = shared[0] if shared else None
        per = ds.get("PerFrameFunctionalGroupsSequence")
        if per is not None and len(per) != nframes:
            raise SeriesError(
                f"{len(per)} items for {nframes} frames", path=path, tag="PerFrameFunctionalGroupsSequence"
            )
        out = []
        for i in range(nframes):
            groups = [per[i] if per else None, shared0]
            ipp = _lookup(groups, "PlanePositionSequence", "ImagePositionPatient")
            iop = _lookup(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _lookup(groups, "PixelMeasuresSequence", "PixelSpacing")
            for tag, val in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop), ("PixelSpacing", ps)):
                if val is None:
                    raise SeriesError(f"missing for frame {i + 1} (functional groups)", path=path, tag=tag)
            slope = _lookup(groups, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _lookup(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            ftype = _lookup(groups, "CTImageFrameTypeSequence", "FrameType")
            loc = ftype is not None and "LOCALIZER" in [str(v).upper() for v in ftype]
            out.append(
                Frame(
                    path, i + 1, ds,
                    _floats(ipp, 3, path, "ImagePositionPatient"),
                    _floats(iop, 6, path, "ImageOrientationPatient"),
                    tuple(_floats(ps, 2, path, "PixelSpacing")),
                    rows, cols,
                    _rescale(slope if slope is not None else ds.get("RescaleSlope"), 1.0, path, "RescaleSlope"),
                    _rescale(inter if inter is not None else ds.get("RescaleIntercept"), 0.0, path, "RescaleIntercept"),
                    ts, loc or _is_localizer(ds),
                )
            )
        return out
    if nframes != 1:
        raise SeriesError(f"{nframes} frames without per-frame geometry", path=path, tag="NumberOfFrames")
    localizer = _is_localizer(ds)
    vals: dict[str, Any] = {}
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        v = ds.get(tag)
        if v is None or v == "" or (hasattr(v, "__len__") and len(v) == 0):
            if localizer:  # a localizer may lack geometry; it is dropped anyway
                vals[tag] = None
                continue
            raise SeriesError("missing", path=path, tag=tag)
        vals[tag] = v
    if localizer and any(v is None for v in vals.values()):
        return [Frame(path, None, ds, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), (1.0, 1.0), rows, cols, 1.0, 0.0, ts, True)]
    return [
        Frame(
            path, None, ds,
            _floats(vals["ImagePositionPatient"], 3, path, "ImagePositionPatient"),
            _floats(vals["ImageOrientationPatient"], 6, path, "ImageOrientationPatient"),
            tuple(_floats(vals["PixelSpacing"], 2, path, "PixelSpacing")),
            rows, cols,
            _rescale(ds.get("RescaleSlope"), 1.0, path, "RescaleSlope"),
            _rescale(ds.get("RescaleIntercept"), 0.0, path, "RescaleIntercept"),
            ts, localizer,
        )
    ]


def warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    log.warning("%s", message)


def image_frames(
    headers: list[tuple[Path, Dataset]], raw_of: dict[int, RawPixels | None], warnings: list[str]
) -> list[Frame]:
    """The image frames of the series' headers: localizers dropped, and frames whose orientation
    differs from the majority's dropped (both recorded in ``warnings``); at least two are left."""
    frames: list[Frame] = []
    for path, ds in headers:
        try:
            new = frames_of(path, ds)
            for fr in new:
                fr.raw = raw_of[id(ds)]
            frames.extend(new)
        except SeriesError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed values that pydicom only notices on access
            raise SeriesError(f"malformed image header ({type(exc).__name__}: {exc})", path=path) from None
    kept = []
    for fr in frames:
        if fr.localizer:
            warn(warnings, f"{fr.label()}: LOCALIZER image dropped")
        else:
            kept.append(fr)
    frames = kept
    if frames:
        # cluster orientations (max cosine difference _ORIENT_TOL), keep the biggest cluster
        reps: list[np.ndarray] = []
        cluster: list[int] = []
        for fr in frames:
            for n, rep in enumerate(reps):
                if np.max(np.abs(fr.iop - rep)) <= _ORIENT_TOL:
                    cluster.append(n)
                    break
            else:
                reps.append(fr.iop)
                cluster.append(len(reps) - 1)
        major = Counter(cluster).most_common(1)[0][0]
        kept = []
        for fr, n in zip(frames, cluster):
            if n == major:
                kept.append(fr)
            else:
                warn(
                    warnings,
                    f"{fr.label()}: ImageOrientationPatient {np.round(fr.iop, 4).tolist()} differs from the "
                    f"series' majority orientation, frame dropped",
                )
        frames = kept
    if len(frames) < 2:
        where = frames[0].path if frames else headers[0][0]
        raise SeriesError(f"{len(frames)} image frame(s): a volume needs at least 2 slices", path=where)
    return frames


def check_consistency(frames: list[Frame], headers: list[tuple[Path, Dataset]]) -> tuple[float, float]:
    """Raise :class:`SeriesError` unless the frames share their size, pixel spacing and frame of
    reference; returns the (positive) PixelSpacing ``(rows, columns)`` mm of the majority."""
    ref = frames[0]
    size_major = Counter((fr.rows, fr.cols) for fr in frames).most_common(1)[0][0]
    for fr in frames:
        if (fr.rows, fr.cols) != size_major:
            raise SeriesError(
                f"Rows/Columns {fr.rows}x{fr.cols} differ from the series' {size_major[0]}x{size_major[1]}",
                path=fr.path, tag="Rows" if fr.rows != size_major[0] else "Columns",
            )
    sp_major = Counter(fr.spacing for fr in frames).most_common(1)[0][0]
    for fr in frames:
        if not np.allclose(fr.spacing, sp_major, rtol=1e-3, atol=1e-4):
            raise SeriesError(
                f"PixelSpacing {list(fr.spacing)} differs from the series' {list(sp_major)}", path=fr.path, tag="PixelSpacing"
            )
    if min(sp_major) <= 0:
        raise SeriesError(f"PixelSpacing {list(sp_major)} is not positive", path=ref.path, tag="PixelSpacing")
    used = {id(fr.header) for fr in frames}  # a set: a membership test per header, not a scan of the frames
    fors = Counter(str(ds.get("FrameOfReferenceUID", "") or "") for _, ds in headers if id(ds) in used)
    if len(fors) > 1:
        bad = next(fr.path for fr in frames if str(fr.header.get("FrameOfReferenceUID", "") or "") != fors.most_common(1)[0][0])
        raise SeriesError(
            f"mixed FrameOfReferenceUID in one series: {', '.join(u or '(empty)' for u in fors)}",
            path=bad, tag="FrameOfReferenceUID",
        )
    return sp_major
