"""What the result objects beside the SEG share: identities derived from the job, the source
headers they copy, and the tissue masks on the source frames."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.errors import InputError
from node.pipeline.volume import Volume

#: Manufacturer / model written into every object the node makes (as the SEG does)
MANUFACTURER = "dicom-node"

# Patient and study attributes every object copies from its source (all Type 2 or 1 in the
# Patient and General Study modules; missing ones are written empty).
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def derived_uid(*parts: str) -> str:
    """A UID fixed by ``parts`` (a re-run of the same job writes the same instances, which a
    PACS stores once); a fresh one when no part is given."""
    if not parts:
        return str(pydicom.uid.generate_uid())
    return str(pydicom.uid.generate_uid(entropy_srcs=[str(p) for p in parts]))


def first_source(volume: Volume) -> Dataset:
    """The first source header; :class:`InputError` when the volume has none."""
    if not volume.info.source_datasets:
        raise InputError("volume has no source headers; cannot derive DICOM objects from it",
                         tag="source_datasets")
    return volume.info.source_datasets[0]


def copy_patient_study(src: Dataset, ds: Dataset) -> None:
    """Patient and General Study attributes from ``src`` onto ``ds`` (Type 2 ones present, maybe empty)."""
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw in src and src[kw].value not in (None, ""):
            setattr(ds, kw, src[kw].value)
        elif kw in _TYPE2:
            setattr(ds, kw, "")


def now_da_tm() -> tuple[str, str]:
    """(DA, TM) of now, local time."""
    t = _dt.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


def series_number(volume: Volume, offset: int) -> int:
    """``offset + source SeriesNumber % 100`` (the SEG uses 900 +): each object kind its own hundred."""
    n = volume.info.series_number
    if n is None:
        try:
            n = int(first_source(volume).get("SeriesNumber") or 0)
        except (TypeError, ValueError):
            n = 0
    return offset + (int(n) % 100)


@dataclass(frozen=True)
class FrameMasks:
    """The tissue masks on the source frames, ``(frames, rows, columns)`` bool each, in the
    order of ``volume.frames`` (what the SEG stores; see :meth:`Volume.mask_on_frames`)."""

    names: tuple[str, ...]
    masks: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, volume: Volume, masks: dict[str, np.ndarray], names: list[str] | tuple[str, ...]) -> FrameMasks:
        return cls(tuple(names), tuple(volume.mask_on_frames(np.asarray(masks[n], dtype=bool)) for n in names))

    def get(self, name: str) -> np.ndarray:
        return self.masks[self.names.index(name)]
