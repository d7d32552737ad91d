"""The measurements report: a DICOM Comprehensive 3D SR, TID 1500 (Measurement Report).

One measurement group per tissue (TID 1411, volumetric ROI) that references the tissue's
segment in the job's SEG and the source series, with its volume in mL from the voxels and from
the closed mesh, and the HU mean and standard deviation inside it; the algorithm
identification names the backend, the software version and the profile.  With the same
tracking identifier, a planar group (TID 1410) gives the tissue's outline and area on the slice
where it is largest: viewers that draw SR measurements on images (OHIF) list a finding only
when it has an image region, and show the tracked finding's measurements with it.  Read it back with :func:`read_measurements`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.durable import atomic_open
from node.errors import InputError
from node.pipeline.outputs.common import (
    MANUFACTURER,
    FrameMasks,
    derived_uid,
    first_source,
    series_number,
)
from node.pipeline.volume import Volume

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

UNIT_ML = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
UNIT_MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
UNIT_HU = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
#: CID 7474: the volume from the voxel count
METHOD_VOXELS = codes.DCM.SumOfSegmentedVoxelMethodForVolume
#: no standard code for the volume enclosed by a closed surface mesh: a private one (99 scheme)
METHOD_MESH = hd.sr.CodedConcept("MESHVOL", "99DCMNODE", "Closed surface mesh method for volume")
PROCEDURE_CT = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")


@dataclass(frozen=True)
class TissueMeasurement:
    """What the SR says about one tissue (one segment of the SEG)."""

    tissue: str
    segment_number: int
    label: str  #: the segment label, e.g. ``"bones cortical"``
    category: tuple[str, str, str]  #: (value, scheme, meaning)
    type: tuple[str, str, str]
    voxels: int
    volume_ml_voxels: float
    volume_ml_mesh: float | None  #: None when no mesh was made
    hu_mean: float | None  #: None for an empty tissue
    hu_std: float | None


def hu_statistics(array: np.ndarray, mask: np.ndarray) -> tuple[float | None, float | None]:
    """(mean, population standard deviation) of ``array`` inside ``mask``; (None, None) when empty."""
    values = array[mask]
    if values.size == 0:
        return None, None
    v = values.astype(np.float64, copy=False)
    mean = float(v.mean())
    return mean, float(np.sqrt(max(0.0, float((v * v).mean()) - mean * mean)))


def tissue_measurements(volume: Volume, masks: dict[str, np.ndarray], profile: Any,
                        report_tissues: dict[str, dict[str, Any]], seg: Dataset) -> list[TissueMeasurement]:
    """One :class:`TissueMeasurement` per profile tissue, matched to the SEG's segments by label.

    Volumes come from the pipeline's ``report["tissues"]`` (so the SR says what report.json
    says); the HU statistics are computed here on the volume the masks were made on.
    """
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    out = []
    for t in profile.result_tissues:
        label = f"{profile.name} {t.name}"
        if label not in numbers:
            raise InputError(f"the SEG has no segment {label!r} (has {sorted(numbers)})", tag="SegmentLabel")
        info = report_tissues.get(t.name, {})
        mean, std = hu_statistics(volume.array, masks[t.name])
        mesh_ml = info.get("volume_ml_mesh")
        out.append(TissueMeasurement(
            tissue=t.name, segment_number=numbers[label], label=label,
            category=(t.category.value, t.category.scheme, t.category.meaning),
            type=(t.type.value, t.type.scheme, t.type.meaning),
            voxels=int(info.get("voxels", int(np.count_nonzero(masks[t.name])))),
            volume_ml_voxels=float(info.get("volume_ml_voxels", 0.0)),
            volume_ml_mesh=None if mesh_ml is None else float(mesh_ml),
            hu_mean=mean, hu_std=std,
        ))
    return out


def _outline(frame_mask: np.ndarray) -> np.ndarray | None:
    """The largest outer contour of one frame's mask as a closed (column, row) polyline, or None."""
    contours, _ = cv2.findContours(frame_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float32)
    if len(c) < 3:
        return None
    # pixel centres: DICOM SCOORD image coordinates have (0.5, 0.5) at the first pixel's centre
    c = c + 0.5
    return np.vstack([c, c[:1]])


@dataclass(frozen=True)
class _Outline:
    region: hd.sr.ImageRegion
    area_mm2: float


def _largest_slice_outline(volume: Volume, frame_masks: np.ndarray) -> _Outline | None:
    """The tissue's outline on the source frame where it covers most pixels, and its area there."""
    areas = frame_masks.reshape(frame_masks.shape[0], -1).sum(axis=1)
    if not areas.any():
        return None
    n = int(np.argmax(areas))
    poly = _outline(frame_masks[n])
    if poly is None:
        return None
    frame = volume.frames[n]
    src = next((d for d in volume.info.source_datasets if str(d.SOPInstanceUID) == frame.sop_instance_uid), None)
    if src is None:
        return None
    image = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(src.SOPClassUID), referenced_sop_instance_uid=str(src.SOPInstanceUID),
        referenced_frame_numbers=[int(frame.frame_number)] if frame.frame_number is not None else None,
    )
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=poly, source_image=image)
    return _Outline(region, float(areas[n]) * frame.pixel_spacing[0] * frame.pixel_spacing[1])


def write_measurement_sr(
    volume: Volume,
    measurements: list[TissueMeasurement],
    seg: Dataset,
    out_path: Path,
    *,
    frame_masks: FrameMasks | None = None,
    masks: dict[str, np.ndarray] | None = None,
    profile_name: str,
    backend: str,
    backend_display_name: str,
    software_version: str,
    series_instance_uid: str | None = None,
    series_description: str | None = None,
) -> Dataset:
    """Write the TID 1500 measurement report for ``measurements`` to ``out_path`` (atomically).

    Args:
        volume: the volume the masks were made on (source headers, frames).
        measurements: from :func:`tissue_measurements`.
        seg: the job's SEG (its SOP instance and segment numbers are referenced).
        frame_masks / masks: the masks on the source frames (or on the volume, mapped here) for
            the outline each measurement is inferred from; neither: no outlines.
        profile_name / backend / backend_display_name / software_version: the algorithm.
        series_instance_uid: the SR's series (derived from the SEG's when not given); the SOP
            instance UID is derived from it.
        series_description: default ``"SR <profile> measurements"``.

    Returns:
        The written dataset.
    """
    if not measurements:
        raise ValueError("write_measurement_sr needs at least one tissue")
    src = first_source(volume)
    src_series = str(src.SeriesInstanceUID)
    series_uid = series_instance_uid or derived_uid(str(seg.SeriesInstanceUID), "measurements SR")
    algorithm = hd.sr.AlgorithmIdentification(
        name=backend_display_name, version=software_version,
        parameters=[f"profile={profile_name}", f"backend={backend}"],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(MANUFACTURER, "device"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=f"{backend_display_name} {software_version}",
        ),
    )
    groups: list[Any] = []
    planar: list[Any] = []
    for m in measurements:
        outline = None
        if frame_masks is not None and m.tissue in frame_masks.names:
            outline = _largest_slice_outline(volume, frame_masks.get(m.tissue))
        elif masks is not None and m.tissue in masks:
            outline = _largest_slice_outline(volume, volume.mask_on_frames(np.asarray(masks[m.tissue], dtype=bool)))
        tracking = hd.sr.TrackingIdentifier(uid=derived_uid(series_uid, "tracking", m.tissue), identifier=m.label)
        finding = hd.sr.CodedConcept(m.type[0], m.type[1], m.type[2])
        category = hd.sr.CodedConcept(m.category[0], m.category[1], m.category[2])
        items = [hd.sr.Measurement(name=codes.SCT.Volume, value=m.volume_ml_voxels, unit=UNIT_ML,
                                   method=METHOD_VOXELS, algorithm_id=algorithm)]
        if m.volume_ml_mesh is not None:
            items.append(hd.sr.Measurement(name=codes.SCT.Volume, value=m.volume_ml_mesh, unit=UNIT_ML,
                                           method=METHOD_MESH, algorithm_id=algorithm))
        if m.hu_mean is not None and m.hu_std is not None:
            # CID 7469 (generic intensity measurements) in HU, as 3D Slicer's reports say them: a viewer
            # that shows the concept name (OHIF) then reads "Mean" and "Standard Deviation"
            for name, value in ((codes.SCT.Mean, m.hu_mean), (codes.SCT.StandardDeviation, m.hu_std)):
                items.append(hd.sr.Measurement(name=name, value=round(value, 2), unit=UNIT_HU,
                                               algorithm_id=algorithm))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=m.segment_number,
                source_series=hd.sr.SourceSeriesForSegmentation(src_series),
            ),
            finding_type=finding, finding_category=category, algorithm_id=algorithm, measurements=items,
        ))
        if outline is not None:
            # the same finding (same tracking UID) on its largest slice: a viewer that draws SR
            # measurements on images lists the tissue's measurements with this outline
            planar.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_region=outline.region,
                finding_type=finding, finding_category=category, algorithm_id=algorithm,
                measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=round(outline.area_mm2, 1),
                                                unit=UNIT_MM2, algorithm_id=algorithm)],
            ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CT,
        imaging_measurements=[*groups, *planar],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.info.source_datasets],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number(volume, 800),
        sop_instance_uid=derived_uid(series_uid, "SR instance 1"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        record_evidence=True,
    )
    sr.SeriesDescription = (series_description or f"SR {profile_name} measurements")[:64]
    sr.SoftwareVersions = software_version
    with atomic_open(Path(out_path)) as fh:
        sr.save_as(fh, enforce_file_format=True)
    return sr


@dataclass(frozen=True)
class ReadMeasurement:
    """One tissue as read back from the SR."""

    label: str  #: tracking identifier (the segment label)
    segment_number: int | None
    values: dict[str, float]  #: "volume_ml_voxels", "volume_ml_mesh", "hu_mean", "hu_std"


def read_measurements(path_or_ds: str | Path | Dataset) -> dict[str, ReadMeasurement]:
    """The SR's measurement groups by tracking identifier, read with highdicom's parser."""
    import pydicom

    ds = path_or_ds if isinstance(path_or_ds, Dataset) else pydicom.dcmread(path_or_ds)
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    out: dict[str, ReadMeasurement] = {}
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)  # what Comprehensive3DSR.from_dataset gives for TID 1500
    groups = content.get_volumetric_roi_measurement_groups()
    for g in groups:
        label = str(g.tracking_identifier)
        seg_ref = g.referenced_segment
        seg_num = _segment_number(seg_ref)
        values: dict[str, float] = {}
        for m in g.get_measurements():
            if m.name == codes.SCT.Volume:
                method = m.method
                key = "volume_ml_mesh" if method is not None and method.value == METHOD_MESH.value else "volume_ml_voxels"
            elif m.name == codes.SCT.Mean:
                key = "hu_mean"
            elif m.name == codes.SCT.StandardDeviation:
                key = "hu_std"
            else:
                continue
            values[key] = float(m.value)
        out[label] = ReadMeasurement(label, seg_num, values)
    return out



def _segment_number(ref: Any) -> int | None:
    """The segment number a parsed ReferencedSegment content item names (None when absent)."""
    numbers = list(ref.referenced_segment_numbers or []) if ref is not None else []
    return int(numbers[0]) if numbers else None
