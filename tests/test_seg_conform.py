"""A SEG valid (dciodvfy: 0 errors) whatever the source's patient and study modules hold
(issue 16, part 3): a corpus of common source defects, each sent through the node's pipeline;
identity never invented, every repair logged."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from node.pipeline.conform import NOT_STATED, conform_patient_study
from node.pipeline.run import run_pipeline
from node.tools.synth_series import write_series

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
SMALL_CT = DATA / "ct-body-3mm-small" / "ct.nii.gz"

pytestmark = pytest.mark.skipif(not SMALL_CT.exists(), reason=f"test data not found under {DATA}")


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Store ``value`` as is, as a file would hold it (pydicom would refuse or fix it)."""
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _deidentified_no_method(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ""
    del ds.PatientBirthDate
    del ds.PatientSex


def _other_patient_ids(ds: Dataset) -> None:
    item = Dataset()
    _raw(item, 0x00100020, "LO", b"X" * 80)  # PatientID of the other id, too long
    ds.OtherPatientIDsSequence = Sequence([item])


def _private(ds: Dataset) -> None:
    ds.add_new(0x00290010, "LO", "ACME 1.0")
    _raw(ds, 0x00291001, "US", b"\x01\x02\x03")  # 3 bytes (4 once padded) where a US is 2
    _raw(ds, 0x00291002, "DS", b"not a number")


def _clinical_trial_empty(ds: Dataset) -> None:
    ds.ClinicalTrialSponsorName = ""
    ds.ClinicalTrialProtocolID = "P1"
    ds.ClinicalTrialSiteID = "S1"


def _latin1_undeclared(ds: Dataset) -> None:
    del ds.SpecificCharacterSet
    _raw(ds, 0x00100010, "PN", "Müller^Jürgen".encode("latin-1"))


def _latin1_declared(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"


def _no_type2_study(ds: Dataset) -> None:
    for kw in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID"):
        delattr(ds, kw)


DEFECTS: dict[str, Callable[[Dataset], object]] = {
    "identity removed, no method, no birth date/sex": _deidentified_no_method,
    "empty Type 1C DeidentificationMethod alone": lambda ds: setattr(ds, "DeidentificationMethod", ""),
    "PatientSex not M/F/O": lambda ds: _raw(ds, 0x00100040, "CS", b"MALE"),
    "PatientName too long": lambda ds: _raw(ds, 0x00100010, "PN", b"D" * 70 + b"^John"),
    "PatientName with control characters": lambda ds: _raw(ds, 0x00100010, "PN", b"Doe^Jo\x07hn"),
    "PatientID too long": lambda ds: _raw(ds, 0x00100020, "LO", b"1234567890" * 7),
    "AccessionNumber too long": lambda ds: _raw(ds, 0x00080050, "SH", b"ACC-12345678901234567"),
    "StudyID two values": lambda ds: _raw(ds, 0x00200010, "SH", b"1\\2"),
    "StudyDate not a date": lambda ds: _raw(ds, 0x00080020, "DA", b"20231345"),
    "StudyDate Feb 30": lambda ds: _raw(ds, 0x00080020, "DA", b"20230230"),
    "StudyTime invalid": lambda ds: _raw(ds, 0x00080030, "TM", b"256199"),
    "PatientBirthDate ISO format": lambda ds: _raw(ds, 0x00100030, "DA", b"1990-01-01"),
    "PatientAge free text": lambda ds: _raw(ds, 0x00101010, "AS", b"45 years"),
    "PatientWeight not a number": lambda ds: _raw(ds, 0x00101030, "DS", b"heavy "),
    "ReferringPhysicianName NUL padded": lambda ds: _raw(ds, 0x00080090, "PN", b"Smith^Ann\x00\x00"),
    "StudyDescription too long": lambda ds: _raw(ds, 0x00081030, "LO", b"S" * 90),
    "non-ASCII name without a character set": _latin1_undeclared,
    "Latin-1 name with its character set": _latin1_declared,
    "Type 2 study attributes missing": _no_type2_study,
    "bad item in OtherPatientIDsSequence": _other_patient_ids,
    "private tags with bad VRs": _private,
    "clinical trial module with empty Type 1": _clinical_trial_empty,
    "FrameOfReferenceUID missing": lambda ds: delattr(ds, "FrameOfReferenceUID"),
}


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]


@pytest.fixture(scope="module")
def clean_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(SMALL_CT, tmp_path_factory.mktemp("clean"), size=(48, 48, 6))


@pytest.mark.parametrize("name", list(DEFECTS))
def test_seg_valid_whatever_the_source_holds(
    tmp_path: Path, clean_series: list[Path], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in clean_series:
        ds = pydicom.dcmread(f)
        DEFECTS[name](ds)
        ds.save_as(src / f.name)
    caplog.set_level(logging.WARNING)
    res = run_pipeline([src], "brain", tmp_path / "out", write_meshes=False, decode_workers=1)
    assert res.seg_path is not None
    errors = _dciodvfy_errors(res.seg_path)
    assert not errors, errors
    seg = pydicom.dcmread(res.seg_path)
    first = pydicom.dcmread(src / clean_series[0].name)
    # identity is copied where valid, never invented
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        got = str(seg.get(kw, "") or "")
        assert got in ("", str(first.get(kw, "") or "").rstrip("\x00 ")), (kw, got)
    assert str(seg.StudyInstanceUID) == str(first.StudyInstanceUID)
    if name == "Latin-1 name with its character set":
        assert str(seg.PatientName) == "Müller^Jürgen"  # valid: copied as it is
    elif name not in ("private tags with bad VRs", "ReferringPhysicianName NUL padded"):  # nothing to repair there
        assert "repaired" in caplog.text, caplog.text


def test_valid_source_copied_unchanged() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.PatientID = "ID1"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "101010.5", "A1"
    ds.ReferringPhysicianName, ds.StudyID, ds.PatientAge = "", "7", "044Y"
    before = {e.keyword: e.value for e in ds}
    assert conform_patient_study(ds) == []
    assert {e.keyword: e.value for e in ds} == before


def test_identity_removed_method_stated_not_invented() -> None:
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ""
    repairs = conform_patient_study(ds)
    assert ds.DeidentificationMethod == NOT_STATED
    assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientBirthDate == ""  # Type 2: empty, not made up
    assert any("DeidentificationMethod" in r for r in repairs)
