"""The series' identity from its headers: the identifying UIDs present (or filled, offline
only), one series of one study, and whether contrast was applied.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.errors import SeriesError

log = logging.getLogger(__name__)

_IDENTITY_TAGS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
_NO_CONTRAST = {"", "NONE", "NO", "N", "NIL", "0", "FALSE", "WITHOUT", "NATIVE", "PLAIN", "NON"}


def _empty(ds: Dataset, tag: str) -> bool:
    v = ds.get(tag)
    return v is None or str(v).strip() == ""


def check_identity(
    headers: list[tuple[Path, Dataset]], fill: bool, warnings: list[str]
) -> None:
    missing: dict[str, list[Path]] = {}
    for path, ds in headers:
        for tag in _IDENTITY_TAGS:
            if _empty(ds, tag):
                missing.setdefault(tag, []).append(path)
    if not missing:
        return
    tags = [t for t in _IDENTITY_TAGS if t in missing]
    first = missing[tags[0]][0]
    nfiles = len({p for t in tags for p in missing[t]})
    verb = "is" if len(tags) == 1 else "are"
    if not fill:
        raise SeriesError(
            f"{', '.join(tags)} {verb} empty in {nfiles} of {len(headers)} file(s); "
            "refusing to invent identities (fill_missing_uids=True is an offline-only opt-in)",
            path=first, tag=tags[0],
        )
    study_uid = generate_uid() if "StudyInstanceUID" in missing else None
    series_uid = generate_uid() if "SeriesInstanceUID" in missing else None
    for path, ds in headers:
        meta = getattr(ds, "file_meta", None)
        if _empty(ds, "SOPClassUID"):
            v = meta.get("MediaStorageSOPClassUID") if meta is not None else None
            if not v:
                raise SeriesError("empty, and the file meta header has no MediaStorageSOPClassUID", path=path, tag="SOPClassUID")
            ds.SOPClassUID = v
        if _empty(ds, "SOPInstanceUID"):
            v = meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
            ds.SOPInstanceUID = v if v else generate_uid()
        if _empty(ds, "StudyInstanceUID"):
            ds.StudyInstanceUID = study_uid
        if _empty(ds, "SeriesInstanceUID"):
            ds.SeriesInstanceUID = series_uid
    msg = (
        f"{', '.join(tags)} {verb} empty in {nfiles} file(s): filled (SOP class/instance from the file meta "
        f"header, new StudyInstanceUID {study_uid or '-'}, new SeriesInstanceUID {series_uid or '-'})"
    )
    warnings.append(msg)
    log.warning("%s: %s", first, msg)


def check_one_series(headers: list[tuple[Path, Dataset]]) -> None:
    """Raise :class:`SeriesError` unless every file has the same SeriesInstanceUID and StudyInstanceUID."""
    series = Counter(str(ds.SeriesInstanceUID) for _, ds in headers)
    if len(series) > 1:
        desc = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common())
        other = next(p for p, ds in headers if str(ds.SeriesInstanceUID) != series.most_common(1)[0][0])
        raise SeriesError(f"files of more than one series given: {desc}", path=other, tag="SeriesInstanceUID")
    studies = Counter(str(ds.StudyInstanceUID) for _, ds in headers)
    if len(studies) > 1:
        other = next(p for p, ds in headers if str(ds.StudyInstanceUID) != studies.most_common(1)[0][0])
        raise SeriesError(f"one series in {len(studies)} studies: {', '.join(studies)}", path=other, tag="StudyInstanceUID")


def contrast_applied(ds: Dataset) -> bool:
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip().upper()
    if agent:
        return agent not in _NO_CONTRAST
    route = str(ds.get("ContrastBolusRoute", "") or "").strip().upper()
    if route and route not in _NO_CONTRAST:
        return True
    for tag in ("ContrastBolusVolume", "ContrastBolusTotalDose"):
        try:
            if float(ds.get(tag) or 0) > 0:
                return True
        except (TypeError, ValueError):
            pass
    seq = ds.get("ContrastBolusAgentSequence")
    return bool(seq and len(seq))
