"""Series facts: what routing rules are evaluated against for one series (the attributes of a
representative instance, plus counts and geometry computed over the whole series), built from
DICOM headers or from the rule tags the store keeps, with the same values from either.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from node.dicom_values import tags_from_dataset
from node.errors import InputError
from node.routing.conditions import MISSING, as_number

#: fact names usable in rules, with a one-line description
FACT_FIELDS: dict[str, str] = {
    "instance_count": "number of instances in the series",
    "slice_thickness": "SliceThickness of the representative instance (mm)",
    "slice_spacing": "median distance between slice positions along the normal (mm)",
    "orientation": "axial | coronal | sagittal | oblique (from ImageOrientationPatient)",
    "gantry_tilt": "true when the slice stack is tilted (geometry > 0.5 deg or GantryDetectorTilt != 0)",
    "gantry_tilt_deg": "tilt angle in degrees",
    "modality": "Modality of the series",
}
#: association fields usable in rules
ASSOCIATION_FIELDS: dict[str, str] = {
    "calling_ae": "AE title of the sending application",
    "called_ae": "AE title the sender addressed (this node)",
}

#: geometric tilt above this angle (degrees) counts as gantry tilt
TILT_THRESHOLD_DEG = 0.5
#: a slice normal within this angle (degrees) of a patient axis names the plane
ORIENTATION_TOLERANCE_DEG = 30.0


def _vec(value: Any, n: int) -> np.ndarray | None:
    if value is None or value is MISSING:
        return None
    if isinstance(value, str):
        value = value.split("\\")
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _normal(iop: np.ndarray) -> np.ndarray | None:
    n = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-6 else None


def classify_orientation(iop: Any) -> str | None:
    """``axial`` / ``coronal`` / ``sagittal`` / ``oblique`` for an ImageOrientationPatient."""
    v = _vec(iop, 6)
    if v is None:
        return None
    n = _normal(v)
    if n is None:
        return None
    axis = int(np.argmax(np.abs(n)))
    if abs(n[axis]) < math.cos(math.radians(ORIENTATION_TOLERANCE_DEG)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class SeriesFacts:
    """Everything a routing rule can test about one series.

    Use :meth:`get` with a DICOM keyword, a fact name (:data:`FACT_FIELDS`) or an
    association field (:data:`ASSOCIATION_FIELDS`); absent values are ``MISSING``.
    """

    tags: dict[str, Any]
    """Attributes of the representative instance (first by position)."""
    instance_count: int
    slice_thickness: float | None = None
    slice_spacing: float | None = None
    orientation: str | None = None
    gantry_tilt: bool | None = None
    gantry_tilt_deg: float | None = None
    modality: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    source: str = ""
    """Where the facts came from (folder, store), for messages."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def series_instance_uid(self) -> str:
        return str(self.tags.get("SeriesInstanceUID") or "")

    def get(self, name: str) -> Any:
        """Value of a fact, association field or DICOM keyword; ``MISSING`` if absent."""
        if name in FACT_FIELDS or name in ASSOCIATION_FIELDS:
            value = getattr(self, name)
            return MISSING if value is None else value
        if name in self.extra:
            return self.extra[name]
        return self.tags.get(name, MISSING)

    def summary(self) -> dict[str, Any]:
        """The computed facts (for display)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "series_description": self.tags.get("SeriesDescription"),
            "instance_count": self.instance_count,
            "slice_thickness": self.slice_thickness,
            "slice_spacing": self.slice_spacing,
            "orientation": self.orientation,
            "gantry_tilt": self.gantry_tilt,
            "gantry_tilt_deg": self.gantry_tilt_deg,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
        }

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_tag_dicts(
        cls,
        instances: Sequence[Mapping[str, Any]],
        calling_ae: str | None = None,
        called_ae: str | None = None,
        *,
        source: str = "",
    ) -> "SeriesFacts":
        """Build from per-instance dicts ``keyword -> plain value``.

        ``ImagePositionPatient`` / ``ImageOrientationPatient`` may be lists of
        numbers or of numeric strings (or a backslash-joined string).
        """
        if not instances:
            raise InputError("no instances to compute series facts from", path=source or None)
        items = [dict(i) for i in instances]

        # distinct instances
        seen: set[str] = set()
        unique: list[dict[str, Any]] = []
        for it in items:
            uid = str(it.get("SOPInstanceUID") or "")
            if uid:
                if uid in seen:
                    continue
                seen.add(uid)
            unique.append(it)

        ref_iop = None
        for it in unique:
            ref_iop = _vec(it.get("ImageOrientationPatient"), 6)
            if ref_iop is not None:
                break
        normal = _normal(ref_iop) if ref_iop is not None else None

        def inst_no(it: Mapping[str, Any]) -> float:
            n = as_number(it.get("InstanceNumber"))
            return n if n is not None else math.inf

        positioned: list[tuple[float, float, np.ndarray, dict[str, Any]]] = []
        unpositioned: list[dict[str, Any]] = []
        for it in unique:
            ipp = _vec(it.get("ImagePositionPatient"), 3)
            if ipp is not None and normal is not None:
                positioned.append((float(ipp @ normal), inst_no(it), ipp, it))
            else:
                unpositioned.append(it)
        positioned.sort(key=lambda t: (t[0], t[1]))
        unpositioned.sort(key=inst_no)
        ordered = [t[3] for t in positioned] + unpositioned
        rep = ordered[0]

        spacing = None
        tilt_deg = None
        if len(positioned) >= 2 and normal is not None:
            dists = np.array([t[0] for t in positioned])
            gaps = np.diff(dists)
            gaps = gaps[gaps > 1e-3]  # repeated positions (multiple phases) are not gaps
            if gaps.size:
                spacing = float(np.median(gaps))
            step = positioned[-1][2] - positioned[0][2]
            length = float(np.linalg.norm(step))
            if length > 1e-3:
                cosang = min(1.0, abs(float(step @ normal)) / length)
                tilt_deg = math.degrees(math.acos(cosang))
        gdt = as_number(rep.get("GantryDetectorTilt"))
        tilt_flag: bool | None = None
        if tilt_deg is not None:
            tilt_flag = tilt_deg > TILT_THRESHOLD_DEG
        if gdt is not None and abs(gdt) > 1e-3:
            tilt_flag = True
            if tilt_deg is None or tilt_deg <= TILT_THRESHOLD_DEG:
                tilt_deg = abs(gdt)
        elif tilt_flag is None and gdt is not None:
            tilt_flag = False
            tilt_deg = 0.0
        if tilt_deg is not None:
            tilt_deg = round(tilt_deg, 3)

        modality = rep.get("Modality")
        return cls(
            tags=rep,
            instance_count=len(unique),
            slice_thickness=as_number(rep.get("SliceThickness")),
            slice_spacing=round(spacing, 4) if spacing is not None else None,
            orientation=classify_orientation(rep.get("ImageOrientationPatient")),
            gantry_tilt=tilt_flag,
            gantry_tilt_deg=tilt_deg,
            modality=str(modality).strip() if modality not in (None, "") else None,
            calling_ae=calling_ae.strip() if calling_ae else None,
            called_ae=called_ae.strip() if called_ae else None,
            source=source,
        )

    @classmethod
    def from_datasets(
        cls,
        datasets: Iterable[Any],
        calling_ae: str | None = None,
        called_ae: str | None = None,
        *,
        source: str = "",
    ) -> "SeriesFacts":
        """Build from pydicom datasets (headers are enough) of one series."""
        return cls.from_tag_dicts(
            [tags_from_dataset(ds, keywords=None) for ds in datasets], calling_ae, called_ae, source=source
        )


def _iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterable[Path]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif path.is_file():
            yield path
        else:
            raise InputError("no such file or folder", path=path)


def facts_from_paths(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    calling_ae: str | None = None,
    called_ae: str | None = None,
) -> list[SeriesFacts]:
    """Read DICOM headers from files/folders (recursively) and build facts per series.

    Files that are not DICOM are skipped.  Series are grouped by
    SeriesInstanceUID (an empty UID is one group of its own) and returned in the
    order they were first seen.  Raises :class:`InputError` if nothing readable
    was found.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in _iter_files(paths):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SOPClassUID" not in ds and "Modality" not in ds and "SeriesInstanceUID" not in ds:
            continue  # a DICOMDIR or similar
        tags = tags_from_dataset(ds, keywords=None)
        groups.setdefault(str(tags.get("SeriesInstanceUID") or ""), []).append(tags)
    if not groups:
        raise InputError("no DICOM files found", path=", ".join(str(p) for p in paths))
    source = ", ".join(str(p) for p in paths)
    return [
        SeriesFacts.from_tag_dicts(items, calling_ae, called_ae, source=source)
        for items in groups.values()
    ]
