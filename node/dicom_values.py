"""DICOM attributes as the routing rules see them: which ones, and their values as plain JSON.

The one conversion used for the rule tags the store keeps per instance and for the spool file
headers the router reads, so a rule sees the same value from either source.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.values import convert_value

__all__ = [
    "HIDDEN_VRS",
    "RULE_TAGS",
    "element_value",
    "json_value",
    "rule_visible",
    "tags_from_dataset",
    "uid_value",
]

#: value representations rules cannot test: sequences and binary data
HIDDEN_VRS: frozenset[str] = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})

#: DICOM keywords the store keeps per instance (``instances.tags`` / ``series.tags``): what the
#: rules see when a series is routed from the store (``rules test SERIES_UID``, or a spool file that
#: cannot be read), and the share path template fields.  Routing on the spool file headers sees every
#: :func:`rule_visible` keyword.  The last four are what the series facts' geometry (slice spacing,
#: orientation, gantry tilt, representative instance) is computed from.
RULE_TAGS: tuple[str, ...] = (
    "Modality",
    "SeriesDescription",
    "ProtocolName",
    "BodyPartExamined",
    "StudyDescription",
    "PatientName",  # the console's patient search (series.search)
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "SliceThickness",
    "ContrastBolusAgent",
    "ConvolutionKernel",
    "KVP",
    "PatientSex",
    "PatientAge",
    "InstitutionName",
    "StationName",
    "SOPClassUID",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "GantryDetectorTilt",
)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _visible_vr(vr: str | None) -> bool:
    return vr is not None and not any(part in HIDDEN_VRS for part in vr.split(" or "))


@lru_cache(maxsize=4096)
def rule_visible(keyword: str) -> bool:
    """Whether rules can test ``keyword``: a DICOM keyword whose dictionary VR is plain-valued
    (not a sequence or binary, nor an ambiguous VR that may be binary such as ``OB or OW``)."""
    tag = tag_for_keyword(keyword) if keyword else None
    return tag is not None and _visible_vr(_dictionary_vr(tag))


def json_value(value: Any) -> Any:
    """A pydicom value as plain JSON: DS -> float, IS and the binary integers -> int, multi-values
    -> lists, PersonName, UID, dates and times -> their DICOM string; ``None`` stays ``None``.

    Bytes (a value pydicom did not convert) are read as text: ASCII, undecodable bytes replaced,
    values split at backslashes, padding (blanks, NUL) removed; :func:`element_value` first tries
    the attribute's dictionary VR, which is what reaches here from a data set.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        parts = [p.strip(" \x00") for p in value.decode("ascii", "replace").split("\\")]
        return parts if len(parts) > 1 else parts[0]
    if isinstance(value, (MultiValue, list, tuple)):
        return [json_value(v) for v in value]
    return str(value)  # PersonName, DA/DT/TM objects, DSdecimal: their DICOM string


def element_value(elem: DataElement, *, little_endian: bool = True) -> Any:
    """The JSON value of a rule-visible element; an empty element is ``""`` (present, blank).

    An element that arrived with another VR than its dictionary one (a sender writing
    ``Modality`` as ``OB`` or ``UN``) holds bytes: they are read with the dictionary VR, as
    pydicom would have read them, so ``Modality: CT`` matches.
    """
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        vr = _dictionary_vr(elem.tag)
        if vr is not None:
            vr = vr.split(" or ")[0]  # an ambiguous "US or SS": its first reading
            raw = RawDataElement(BaseTag(elem.tag), vr, len(value), value, 0, False, little_endian)
            try:
                value = convert_value(vr, raw)
            except Exception:  # noqa: BLE001 - not valid for that VR either: read as text below
                pass
        if value is None:
            return ""
    return json_value(value)


def tags_from_dataset(ds: Any, keywords: Iterable[str] | None = RULE_TAGS) -> dict[str, Any]:
    """``keyword -> JSON value`` of the rule-visible top-level attributes of ``ds`` (a pydicom
    Dataset): those in ``keywords`` (default :data:`RULE_TAGS`, what the store keeps), or every one
    with ``keywords=None`` (what routing on file headers sees).

    Absent attributes are left out, empty ones are ``""`` so rules can tell "empty" from "absent";
    sequences and binary attributes are left out; an attribute that cannot be decoded is skipped.
    """
    encoding = getattr(ds, "original_encoding", (None, None))
    little_endian = encoding[1] is not False
    out: dict[str, Any] = {}
    if keywords is None:
        for tag in list(ds.keys()):
            try:
                elem = ds[tag]
                kw = elem.keyword  # "" for a private attribute: rules name attributes by keyword
                if kw and _visible_vr(_dictionary_vr(elem.tag)):
                    out[kw] = element_value(elem, little_endian=little_endian)
            except Exception:  # noqa: BLE001 - a broken value must not stop indexing or routing
                continue
        return out
    for kw in keywords:
        try:
            if kw not in ds or not rule_visible(kw):
                continue
            out[kw] = element_value(ds[kw], little_endian=little_endian)
        except Exception:  # noqa: BLE001 - a broken value must not stop indexing or routing
            continue
    return out


def uid_value(ds: Any, keyword: str) -> str:
    """The UID in ``ds``'s ``keyword`` as a plain string (padding removed), ``""`` if absent or unreadable."""
    try:
        v = ds.get(keyword)
    except Exception:  # noqa: BLE001 - unreadable reads as absent: pydicom raises assorted errors on a malformed value
        return ""
    return str(v).strip().rstrip("\x00") if v is not None else ""
