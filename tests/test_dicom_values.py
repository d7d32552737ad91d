"""DICOM values as the rules see them (node/dicom_values.py): one conversion for the store and the headers."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DA, IS, DSfloat, PersonName

from node.dicom_values import RULE_TAGS, element_value, json_value, rule_visible, tags_from_dataset
from node.router import series_facts
from node.routing import SeriesFacts, facts_from_paths, parse_rules
from node.spool import Spool
from node.store import Store

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"


def test_json_value():
    assert json_value(DSfloat("1.25")) == 1.25 and type(json_value(DSfloat("1.25"))) is float
    assert json_value(IS("3")) == 3 and type(json_value(IS("3"))) is int
    assert json_value(MultiValue(DSfloat, ["0.5", "0.75"])) == [0.5, 0.75]
    assert json_value(PersonName("Doe^John")) == "Doe^John"
    assert json_value(DA("20240101")) == "20240101"  # a date object (datetime_conversion): its DICOM string
    assert type(json_value(UID("1.2.3"))) is str
    assert json_value(None) is None and json_value(True) is True and json_value("") == ""
    assert json_value(b"CT ") == "CT" and json_value(b"ORIGINAL\\PRIMARY\x00") == ["ORIGINAL", "PRIMARY"]
    assert json_value(b"caf\xe9") == "caf\ufffd"


def test_element_value_reads_bytes_with_the_dictionary_vr():
    # a sender wrote these with a binary VR: read as their dictionary VR says
    assert element_value(DataElement(0x00080060, "OB", b"CT")) == "CT"
    assert element_value(DataElement(0x00080008, "OB", b"ORIGINAL\\PRIMARY ")) == ["ORIGINAL", "PRIMARY"]
    assert element_value(DataElement(0x00180050, "OB", b"1.25")) == 1.25
    assert element_value(DataElement(0x00280010, "OB", b"\x00\x02")) == 512
    assert element_value(DataElement(0x00280010, "OB", b"\x00\x02"), little_endian=False) == 2
    assert element_value(DataElement(0x00180060, "DS", None)) == ""  # present, empty


def test_what_the_rules_see():
    assert rule_visible("Modality") and rule_visible("PatientName") and rule_visible("ImagePositionPatient")
    for kw in ("ReferencedImageSequence", "PixelData", "OverlayData", "RedPaletteColorLookupTableData",
               "NoSuchKeyword", ""):
        assert not rule_visible(kw), kw
    assert all(rule_visible(kw) for kw in RULE_TAGS)
    ds = Dataset()
    ds.Modality = "CT"
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.add_new(0x00091010, "LO", "ACME 1.0")  # private: rules name attributes by keyword
    ds.add_new(0x00091011, "UN", b"secret")
    ds.add_new(0x60003000, "OW", b"\x00\x01")  # OverlayData
    ds.PatientName = "Doe^John"
    assert tags_from_dataset(ds, keywords=None) == {"Modality": "CT", "PatientName": "Doe^John"}
    ds.PatientBirthDate = "19700101"
    # default: RULE_TAGS, what the store keeps (PatientName for the console's search; not the birth date)
    assert tags_from_dataset(ds) == {"Modality": "CT", "PatientName": "Doe^John"}
    assert tags_from_dataset(ds, ["PatientName", "ReferencedImageSequence", "Rows"]) == {"PatientName": "Doe^John"}


# ------------------------------------------- routing facts: stored tags == file headers

RULES = """
rules:
  - name: ct
    match:
      Modality: CT
      ImageType: {regex: "^ORIGINAL\\\\\\\\PRIMARY\\\\\\\\AXIAL$"}
      SliceThickness: {range: [1.2, 1.3]}
      SeriesNumber: 3
      StudyDate: "20240101"
      KVP: {not_empty: false}
      SeriesDescription: {exists: true}
      orientation: axial
      slice_spacing: {min: 0.9, max: 1.1}
      gantry_tilt: false
    profile: bones
    stop: false
  - name: empty-description
    match:
      SeriesDescription: {not_empty: true}
    profile: bones
"""


def _instance(i: int) -> bytes:
    """Instance ``i`` of a 4-slice axial series, written with the awkward values a sender may send."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{SERIES}.{i}"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.add(DataElement(0x00080060, "OB", b"CT"))  # Modality with a binary VR: bytes when read
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # multi-value
    ds.PatientName = "Doe^John"  # PersonName
    ds.PatientID = "P1"
    ds.SliceThickness = "1.25"  # DS
    ds.SeriesNumber = "3"  # IS
    ds.InstanceNumber = str(4 - i)
    ds.StudyDate = "20240101"  # DA
    ds.StudyTime = "101500.5"  # TM
    ds.SeriesDescription = ""  # empty text
    ds.add(DataElement(0x00180060, "DS", None))  # KVP: empty number
    ds.GantryDetectorTilt = "0"
    ds.ReferencedImageSequence = Sequence([Dataset()])  # a sequence: seen by neither
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = ["-100", "-100", f"{-50 + i}"]
    ds.Rows = ds.Columns = 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if i % 2 else ImplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_routing_facts_from_stored_tags_equal_facts_from_file_headers(tmp_path: Path):
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    paths = []
    for i in range(4):
        p = spool.path_for(STUDY, SERIES, f"{SERIES}.{i}")
        spool.write(p, _instance(i))
        paths.append(p)
    assert isinstance(dcmread(paths[1]).Modality, bytes)  # the case both sources must agree on
    store = Store(tmp_path / "node.db")
    try:
        assert spool.rescan(store, called_ae="DICOMNODE") == 4  # indexed as the receiver does
        series = store.get_series(SERIES)
        assert series is not None
        from_headers = series_facts(store, series)  # the router: spool file headers
        (from_paths,) = facts_from_paths(spool.spool_dir, None, "DICOMNODE")  # `rules test FOLDER`
        for p in paths:
            p.write_bytes(b"gone")  # unreadable: the router falls back on the stored tags
        from_store = series_facts(store, series)
        stored = [dict(i.tags, SOPInstanceUID=i.sop_instance_uid, SeriesInstanceUID=i.series_uid)
                  for i in store.series_instances(SERIES)]
    finally:
        store.close()
    assert all(json.loads(json.dumps(t)) == t for t in stored)  # what the store keeps is plain JSON

    summary = from_headers.summary()
    assert summary == from_store.summary() == from_paths.summary()
    assert summary["modality"] == "CT" and summary["instance_count"] == 4
    assert summary["orientation"] == "axial" and summary["slice_spacing"] == 1.0 and summary["gantry_tilt"] is False
    for kw in RULE_TAGS:
        assert from_headers.get(kw) == from_store.get(kw) == from_paths.get(kw), kw
    assert from_store.get("ImageType") == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert from_store.get("SliceThickness") == 1.25 and from_store.get("SeriesNumber") == 3
    assert from_store.get("StudyDate") == "20240101" and from_store.get("StudyTime") == "101500.5"
    assert from_store.get("SeriesDescription") == from_store.get("KVP") == ""
    assert from_headers.get("PatientName") == "Doe^John"  # headers: every visible keyword
    assert "ReferencedImageSequence" not in from_headers.tags
    assert from_headers.tags["SOPInstanceUID"] == from_store.tags["SOPInstanceUID"] == f"{SERIES}.0"

    rules = parse_rules(RULES)
    decisions = [rules.route(f) for f in (from_headers, from_store, from_paths)]
    assert [r.name for r in decisions[0].matched] == ["ct"], decisions[0].explain()
    explained = [d.explain() for d in decisions]
    assert explained[0] == explained[1] == explained[2]


@pytest.mark.parametrize("datetime_conversion", [False, True])
def test_stored_tags_and_headers_agree_for_every_value_kind(datetime_conversion: bool, monkeypatch):
    """PersonName, multi-values, DS/IS, dates, empty values and sequences: the tags a rule sees from a
    header equal what the store keeps (after its JSON round trip), whichever keywords are kept."""
    monkeypatch.setattr(pydicom_config, "datetime_conversion", datetime_conversion)
    ds = dcmread(BytesIO(_instance(1)))
    kept = (*RULE_TAGS, "PatientName", "ReferencedImageSequence", "OtherPatientIDs")
    headers = tags_from_dataset(ds, keywords=None)
    stored = json.loads(json.dumps(tags_from_dataset(ds, kept)))
    assert stored == {k: v for k, v in headers.items() if k in kept}
    assert stored["PatientName"] == "Doe^John" and stored["Modality"] == "CT" and stored["StudyDate"] == "20240101"
    assert "ReferencedImageSequence" not in headers and "OtherPatientIDs" not in headers
    # the store's rows add the UIDs it keeps in columns, as the router and `rules test UID` do
    one = SeriesFacts.from_tag_dicts([dict(stored, SeriesInstanceUID=SERIES, SOPInstanceUID=f"{SERIES}.1")])
    other = SeriesFacts.from_tag_dicts([headers])
    assert one.summary() == other.summary() and all(one.get(k) == other.get(k) for k in kept)
