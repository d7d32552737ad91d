"""The Patient and Study modules of an object the node derives (the DICOM SEG) made conformant
whatever the source images hold: valid values are copied as they are, invalid ones left out
(Type 3, 1C) or emptied (Type 2), missing Type 2 attributes added empty, and an optional module
whose Type 1 attributes are unusable dropped whole.  Nothing is invented: the only value ever
filled in is DeidentificationMethod, which the standard requires once the source says
PatientIdentityRemoved YES, and it says only that the source did not state the method.
Every repair is returned as a line for the log.
"""

from __future__ import annotations

import datetime as _dt
import functools
import re

from pydicom import config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VM, keyword_for_tag
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
_OPTIONAL_MODULES = ("clinical-trial-subject", "clinical-trial-study")
# what may stand in a CS attribute of these modules (PS3.3 enumerated values)
_ENUMS = {
    "PatientSex": {"M", "F", "O"},
    "PatientIdentityRemoved": {"YES", "NO"},
    "QualityControlSubject": {"YES", "NO"},
    "SmokingStatus": {"YES", "NO", "UNKNOWN"},
    "PatientSexNeutered": {"ALTERED", "UNALTERED"},
    "ResponsiblePersonRole": None,  # defined terms: any valid CS
}
_TEXT_VRS = {"LT", "ST", "UT"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")  # ESC (\x1b) starts a code extension
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # LT/ST/UT: CR, LF, FF, TAB allowed
NOT_STATED = "not stated in the source images"


@functools.lru_cache(maxsize=1)
def _attributes() -> dict[str, tuple[str, str]]:
    """``{keyword: (type, module)}`` of the root attributes of the Patient and Study modules."""
    from highdicom._standard_utils import get_module_attribute_map

    amap = get_module_attribute_map()
    out: dict[str, tuple[str, str]] = {}
    for module in _MODULES:
        for item in amap[module]:
            if not item["path"]:
                out[str(item["keyword"])] = (str(item["type"]), module)
    return out


def _bad_date(v: str) -> bool:
    try:
        _dt.datetime.strptime(v, "%Y%m%d")
        return False
    except ValueError:
        return True


def _texts(elem: DataElement | RawDataElement) -> list[str]:
    """The element's values as the text a file holds (raw bytes decoded as Latin-1, padding
    stripped), so that values pydicom cannot even convert are judged too."""
    value = elem.value
    if isinstance(value, bytes):
        text = value.decode("latin-1", "replace")
        text = text.rstrip("\x00 ") if elem.VR not in _TEXT_VRS else text.rstrip("\x00")
        parts = [text] if elem.VR in _TEXT_VRS else text.split("\\")
    elif isinstance(value, (list, tuple, MultiValue)):
        parts = [str(v) for v in value]
    else:
        parts = [] if value is None else [str(value)]
    if elem.VR not in _TEXT_VRS and elem.VR != "PN":
        parts = [p.strip() for p in parts]
    return [p for p in parts if p != ""]


def _problem(elem: DataElement | RawDataElement, ascii_only: bool = False) -> str | None:
    """Why the value of a non-sequence element is invalid, or ``None`` (``ascii_only``: no
    character set declared, so bytes beyond ASCII cannot be read)."""
    kw = keyword_for_tag(elem.tag)
    if ascii_only and isinstance(elem.value, bytes) and any(b > 127 for b in elem.value):
        return "characters beyond ASCII and no SpecificCharacterSet to read them with"
    values = _texts(elem)
    vm = dictionary_VM(elem.tag) if kw else "1-n"
    if vm == "1" and len(values) > 1:
        return f"{len(values)} values where one is allowed"
    for s in values:
        try:
            validate_value(str(elem.VR), s, config.RAISE)
        except (ValueError, TypeError) as exc:
            return str(exc).split(". Please")[0]
        if elem.VR == "PN" and any(len(c) > 64 for g in s.split("=") for c in g.split("^")):
            return "a name component longer than 64 characters"
        if elem.VR == "TM" and not re.fullmatch(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?", s):
            return f"not a time: {s!r}"
        if elem.VR in ("PN", "LO", "SH", "CS", "LT", "ST", "UT", "UC", "AS", "DA", "TM", "DS", "IS"):
            bad = _CONTROL_TEXT if elem.VR in _TEXT_VRS else _CONTROL
            if bad.search(s):
                return "control characters"
        if elem.VR == "DA" and _bad_date(s):
            return f"not a calendar date: {s!r}"
        if elem.VR == "PN" and s.count("=") > 2:
            return "more than three component groups"
        allowed = _ENUMS.get(kw, None)
        if allowed is not None and s not in allowed:
            return f"{s!r} is not one of {'/'.join(sorted(allowed))}"
    return None


def _sequence_problem(seq: Sequence, ascii_only: bool) -> str | None:
    for item in seq:
        for tag in list(item.keys()):
            if tag.is_private:
                continue
            elem = item.get_item(tag)
            if elem is None:
                continue
            if elem.VR == "SQ":
                why = _sequence_problem(item[tag].value, ascii_only)
            else:
                why = _problem(elem, ascii_only)
            if why:
                return f"{keyword_for_tag(elem.tag) or elem.tag}: {why}"
    return None


def _empty(elem: DataElement | RawDataElement) -> bool:
    if elem.VR == "SQ":
        return elem.value is None or len(elem.value) == 0
    return not _texts(elem)


def conform_patient_study(ds: Dataset) -> list[str]:
    """Repair the Patient and Study module attributes of ``ds`` in place; return what was done."""
    attrs = _attributes()
    repairs: list[str] = []
    ascii_only = str(ds.get("SpecificCharacterSet", "") or "") in ("", "ISO_IR 6")

    def drop(kw: str, why: str) -> None:
        del ds[kw]
        repairs.append(f"{kw} left out: {why}")

    def empty(kw: str, why: str) -> None:
        tag = Tag(kw)
        vr = ds.get_item(tag).VR
        ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else "")
        repairs.append(f"{kw} emptied: {why}")

    for kw, (typ, _module) in attrs.items():
        if kw not in ds or kw == "StudyInstanceUID":
            continue
        elem = ds.get_item(Tag(kw))  # raw where not yet converted: converting may fail
        if elem.VR == "SQ":
            why = _sequence_problem(ds[kw].value, ascii_only)
        else:
            why = _problem(elem, ascii_only)
        if why is None and typ in ("1", "1C") and _empty(elem):
            why = "empty, where the standard wants a value when present"
        if why is None:
            continue
        if typ.startswith("2"):
            empty(kw, why)
        else:
            drop(kw, why)

    # optional modules whose Type 1 attributes are gone: the whole module goes
    for module in _OPTIONAL_MODULES:
        members = [kw for kw, (_t, m) in attrs.items() if m == module]
        present = [kw for kw in members if kw in ds]
        required = [kw for kw in members if attrs[kw][0] == "1"]
        if present and any(kw not in ds for kw in required):
            for kw in present:
                del ds[kw]
            repairs.append(f"{module} module left out: its Type 1 attributes "
                           f"({', '.join(required)}) are missing or invalid in the source")

    # conditions
    if _text(ds, "PatientIdentityRemoved") == "YES" and not (
        _text(ds, "DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = NOT_STATED
        repairs[:] = [r for r in repairs if not r.startswith("DeidentificationMethod ")]
        repairs.append(f"DeidentificationMethod set to {NOT_STATED!r}: the source says PatientIdentityRemoved "
                       "YES without a method, which the standard requires")
    dates_alt = [kw for kw in ("PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar")
                 if kw in ds]
    if dates_alt and "PatientAlternativeCalendar" not in ds:
        for kw in dates_alt:
            drop(kw, "no (valid) PatientAlternativeCalendar")
    if "PatientAlternativeCalendar" in ds and not dates_alt:
        drop("PatientAlternativeCalendar", "no alternative calendar date")

    # Type 2 attributes are present, empty if need be
    for kw, (typ, module) in attrs.items():
        if typ == "2" and module in ("patient", "general-study") and kw not in ds:
            setattr(ds, kw, "")
            repairs.append(f"{kw} added empty (Type 2, missing in the source)")

    # text beyond ASCII needs a character set that can carry it
    if _non_ascii(ds) and str(ds.get("SpecificCharacterSet", "") or "") in ("", "ISO_IR 6"):
        ds.SpecificCharacterSet = "ISO_IR 192"
        repairs.append("SpecificCharacterSet set to ISO_IR 192 (UTF-8): the copied names and texts are not ASCII")
    return repairs


def _text(ds: Dataset, kw: str) -> str:
    elem = ds.get_item(Tag(kw)) if kw in ds else None
    return "\\".join(_texts(elem)) if elem is not None else ""


def _non_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if any(_non_ascii(item) for item in elem.value):
                return True
        elif elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC") and elem.value is not None:
            if any(ord(ch) > 127 for ch in str(elem.value)):
                return True
    return False


def describe(repairs: list[str]) -> str:
    """One log line for a list of repairs."""
    return "; ".join(repairs)

