"""Meshes as DICOM objects: Encapsulated STL (the 3D model IOD, SOP class 1.2.840.10008.5.1.4.1.1.104.3).

One instance per tissue mesh, all in one series (modality M3D) of the source study, in the source
Frame of Reference: the node's STL files are in patient coordinates (LPS, mm), which is what the
IOD's Frame of Reference and its measurement units (mm) say.  The STL bytes go in unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from node.durable import atomic_open
from node.pipeline.outputs.common import (
    MANUFACTURER,
    copy_patient_study,
    derived_uid,
    first_source,
    now_da_tm,
    series_number,
)
from node.pipeline.volume import Volume

ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"


@dataclass(frozen=True)
class MeshObject:
    """One mesh to encapsulate."""

    stl: Path
    title: str  #: DocumentTitle, e.g. ``"bones cortical"``


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def write_encapsulated_stl(
    volume: Volume,
    meshes: list[MeshObject],
    out_dir: Path,
    *,
    series_instance_uid: str | None = None,
    series_description: str = "",
    software_version: str,
    name_prefix: str = "",
) -> list[Path]:
    """One Encapsulated STL instance per mesh in ``out_dir`` (``<prefix><n>_<title>.dcm``, atomically).

    Args:
        volume: gives the source headers (patient, study, Frame of Reference, referenced instances).
        meshes: STL files (binary STL in LPS mm, as :func:`node.pipeline.mesh.files.write_stl` writes).
        series_instance_uid: the M3D series (a new UID when not given); instance UIDs derive from it.
        series_description: the series' description.
        software_version: SoftwareVersions of the equipment that made the model.
    """
    src = first_source(volume)
    if not volume.info.frame_of_reference_uid:
        raise ValueError("the source has no Frame of Reference: an Encapsulated STL needs one")
    series_uid = series_instance_uid or derived_uid()
    date, time = now_da_tm()
    out: list[Path] = []
    for n, mesh in enumerate(meshes, start=1):
        data = Path(mesh.stl).read_bytes()
        ds = Dataset()
        ds.SpecificCharacterSet = src.get("SpecificCharacterSet", "ISO_IR 100") or "ISO_IR 100"
        copy_patient_study(src, ds)
        ds.SOPClassUID = ENCAPSULATED_STL
        ds.SOPInstanceUID = derived_uid(series_uid, "STL", str(n), mesh.title)
        # Encapsulated Document Series
        ds.Modality = "M3D"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number(volume, 600)
        if series_description:
            ds.SeriesDescription = series_description[:64]
        # Frame of Reference: the source's (the STL is in its patient coordinates)
        ds.FrameOfReferenceUID = volume.info.frame_of_reference_uid
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "") or ""
        # General and Enhanced General Equipment
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MANUFACTURER
        ds.DeviceSerialNumber = "0"
        ds.SoftwareVersions = software_version
        # Manufacturing 3D Model: coordinates in millimetres
        ds.MeasurementUnitsCodeSequence = [_code("mm", "UCUM", "millimeter")]
        # Encapsulated Document
        ds.InstanceNumber = n
        ds.ContentDate, ds.ContentTime = date, time
        ds.AcquisitionDateTime = ""
        ds.BurnedInAnnotation = "NO"
        ds.RecognizableVisualFeatures = "NO"
        ds.DocumentTitle = mesh.title[:64]
        ds.ConceptNameCodeSequence = []
        ds.MIMETypeOfEncapsulatedDocument = "model/stl"
        if len(data) % 2:
            data += b"\x00"  # OB is even length; EncapsulatedDocumentLength keeps the STL's own size
            ds.EncapsulatedDocumentLength = len(data) - 1
        else:
            ds.EncapsulatedDocumentLength = len(data)
        ds.EncapsulatedDocument = data
        # the instances the model was derived from, and (Common Instance Reference) their series
        ds.SourceInstanceSequence = [_ref(d) for d in volume.info.source_datasets]
        series_ref = Dataset()
        series_ref.SeriesInstanceUID = src.SeriesInstanceUID
        series_ref.ReferencedInstanceSequence = [_ref(d) for d in volume.info.source_datasets]
        ds.ReferencedSeriesSequence = [series_ref]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_STL)
        meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in mesh.title)
        path = Path(out_dir) / f"{name_prefix}{n:02d}_{safe}.dcm"
        with atomic_open(path) as fh:
            ds.save_as(fh, enforce_file_format=True)
        out.append(path)
    return out


def _ref(src: Dataset) -> Dataset:
    r = Dataset()
    r.ReferencedSOPClassUID = src.SOPClassUID
    r.ReferencedSOPInstanceUID = src.SOPInstanceUID
    return r
