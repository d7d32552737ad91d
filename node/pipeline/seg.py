"""DICOM SEG output (and read-back) for tissue masks on a :class:`~node.pipeline.volume.Volume`:
one BINARY Segmentation instance per call, in the source study, in a new series, one segment
per :class:`SegmentSpec`, its frames on the *original* source frames (also for series that
were resampled to build the volume).  Write times: ``bench/README.md``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.durable import atomic_open
from node.errors import InputError
from node.pipeline.conform import conform_patient_study, describe
from node.pipeline.volume import SourceFrame, Volume

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

CodeTuple = tuple[str, str, str]
"""(code value, coding scheme designator, code meaning)."""

# Segmented property categories (DICOM CID 7150) and types (CID 7166 / CID 7154 ...).
CATEGORY_TISSUE: CodeTuple = ("85756007", "SCT", "Tissue")
CATEGORY_ANATOMICAL_STRUCTURE: CodeTuple = ("91723000", "SCT", "Anatomical Structure")
TYPE_BONE: CodeTuple = ("3138006", "SCT", "Bone")
TYPE_MUSCLE: CodeTuple = ("91727004", "SCT", "Muscle")
TYPE_FAT: CodeTuple = ("55603005", "SCT", "Fat")
TYPE_SOFT_TISSUE: CodeTuple = ("87784001", "SCT", "Soft tissue")
TYPE_BLOOD: CodeTuple = ("87612001", "SCT", "Blood")
TYPE_LIVER: CodeTuple = ("10200004", "SCT", "Liver")
TYPE_SPLEEN: CodeTuple = ("78961009", "SCT", "Spleen")
TYPE_KIDNEY: CodeTuple = ("64033007", "SCT", "Kidney")

# Algorithm families (DICOM CID 7162).  HU thresholding has no exact entry; intensity
# thresholding is an analysis of the value histogram, so that is the default here.
ALGORITHM_FAMILY_THRESHOLD: Code = codes.cid7162.HistogramAnalysis
ALGORITHM_FAMILY_AI: Code = codes.cid7162.ArtificialIntelligence

SourceKey = Union[str, tuple[str, int]]
"""Key of one source frame: the SOPInstanceUID for single-frame instances,
``(SOPInstanceUID, frame number)`` for frames of a multi-frame instance."""


@dataclass
class SegmentSpec:
    """One segment of a DICOM SEG: what it is, how it looks, and its mask.

    Attributes:
        label: SegmentLabel shown by viewers, e.g. ``"bones cortical"`` (max 64 chars).
        tissue: the tissue / structure name in the node's vocabulary (e.g. ``"bone"``).
        description: free-text SegmentDescription; ``tissue`` is used when empty.
        color: display colour ``(r, g, b)`` 0..255 (sRGB), stored as CIELab.
        category: SegmentedPropertyCategoryCodeSequence as ``(value, scheme, meaning)``,
            e.g. :data:`CATEGORY_TISSUE` or :data:`CATEGORY_ANATOMICAL_STRUCTURE`.
        type: SegmentedPropertyTypeCodeSequence as ``(value, scheme, meaning)``,
            e.g. :data:`TYPE_BONE`, :data:`TYPE_LIVER`.
        mask: boolean array on the volume grid, shape ``volume.shape`` ``[k, j, i]``.
    """

    label: str
    tissue: str
    description: str
    color: tuple[int, int, int]
    category: CodeTuple
    type: CodeTuple
    mask: np.ndarray


def source_key(frame: SourceFrame) -> SourceKey:
    """The :data:`SourceKey` :func:`read_seg_masks` uses for a volume's source frame."""
    if frame.frame_number is None:
        return frame.sop_instance_uid
    return (frame.sop_instance_uid, int(frame.frame_number))


# --------------------------------------------------------------------------- writing


def _code(t: CodeTuple, what: str) -> hd.sr.CodedConcept:
    if len(t) != 3 or not all(isinstance(x, str) and x for x in t):
        raise ValueError(f"{what} must be (code value, scheme designator, meaning), got {t!r}")
    return hd.sr.CodedConcept(value=t[0], scheme_designator=t[1], meaning=t[2])


def _color(rgb: tuple[int, int, int], label: str) -> hd.color.CIELabColor:
    if len(rgb) != 3 or not all(0 <= float(c) <= 255 for c in rgb):
        raise ValueError(f"segment {label!r}: color must be (r, g, b) in 0..255, got {rgb!r}")
    return hd.color.CIELabColor.from_rgb(*(float(c) for c in rgb))


_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                  "FrameOfReferenceUID")


def _shallow_copy(ds: Dataset) -> Dataset:
    """A new Dataset with its own element dict (``copy.copy`` would share it)."""
    new = Dataset()
    for elem in ds:
        new.add(elem)
    return new


def _frame_of_reference(srcs: list[Dataset], volume: Volume) -> str:
    """The source series' FrameOfReferenceUID; where the source has none (Type 1 in a CT image,
    yet missing in real archives), one derived from its Study and Series Instance UIDs: the
    same for every SEG of that series, logged."""
    have = {str(d.get("FrameOfReferenceUID", "") or "").strip() for d in srcs} - {""}
    if len(have) == 1:
        return have.pop()
    if have:  # several: left to the consistency check below
        return str(srcs[0].get("FrameOfReferenceUID", "") or "")
    if volume.info.frame_of_reference_uid:
        return volume.info.frame_of_reference_uid
    study = str(srcs[0].get("StudyInstanceUID", "") or "")
    series = str(srcs[0].get("SeriesInstanceUID", "") or "")
    uid = str(pydicom.uid.generate_uid(entropy_srcs=[study, series, "frame of reference"]))
    log.warning("DICOM SEG: source repaired: the series has no FrameOfReferenceUID; the SEG uses %s, derived "
                "from its Study and Series Instance UIDs", uid)
    return uid


def _check_sources(volume: Volume) -> list[Dataset]:
    """Validate the source headers and return them (copied only where patched)."""
    srcs = list(volume.info.source_datasets)
    if not srcs:
        raise InputError("volume has no source headers (info.source_datasets is empty); "
                         "cannot reference the source series in a DICOM SEG",
                         tag="source_datasets")
    if not volume.frames:
        raise InputError("volume has no source frames; cannot write a DICOM SEG", tag="frames")
    out: list[Dataset] = []
    for_uid = _frame_of_reference(srcs, volume)
    for n, ds in enumerate(srcs):
        where = getattr(ds, "filename", None) or f"source #{n}"
        if str(ds.get("FrameOfReferenceUID", "") or "").strip() != for_uid:
            ds = _shallow_copy(ds)
            ds.FrameOfReferenceUID = for_uid
        for kw in _REQUIRED_UIDS:
            if not str(ds.get(kw, "") or "").strip():
                raise InputError(f"{kw} is missing or empty; a DICOM SEG must reference the "
                                 "source study, series, instances and frame of reference",
                                 path=where, tag=kw)
        for kw in ("Rows", "Columns"):
            if not ds.get(kw):
                raise InputError(f"{kw} is missing", path=where, tag=kw)
        # the patient and study modules highdicom copies into the SEG: made conformant on a
        # copy of the header (only top-level elements change), repairs logged once
        fixed = _shallow_copy(ds)
        repairs = conform_patient_study(fixed)
        if repairs:
            ds = fixed
            if n == 0:
                log.warning("DICOM SEG: patient/study attributes of the source repaired: %s", describe(repairs))
        out.append(ds)
    first = out[0]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        vals = {str(d.get(kw)) for d in out}
        if len(vals) > 1:
            raise InputError(f"source instances disagree on {kw} ({len(vals)} values); "
                             "a DICOM SEG references exactly one source series", tag=kw)
    if volume.info.frame_of_reference_uid and str(srcs[0].get("FrameOfReferenceUID", "") or "") and (
            str(first.FrameOfReferenceUID) != str(volume.info.frame_of_reference_uid)):
        raise InputError("volume FrameOfReferenceUID does not match its source headers",
                         tag="FrameOfReferenceUID")
    return out


def _overlap(masks: list[np.ndarray]) -> bool:
    """True when any two masks share a pixel (cheap pairwise AND with early exit)."""
    if len(masks) < 2:
        return False
    union = masks[0].copy()
    for m in masks[1:]:
        if np.logical_and(union, m).any():
            return True
        union |= m
    return False


def _label_map(masks: list[np.ndarray], dtype: type) -> np.ndarray | None:
    """``s`` where mask ``s`` (1-based) is set, 0 elsewhere; None when two masks overlap.

    One pass over the masks in slabs of about a million voxels (so that the overlap
    test and the labelling work on data still in cache): about half the time of
    :func:`_overlap` followed by ``labels[mask] = s`` per mask.
    """
    shape = masks[0].shape
    labels: np.ndarray = np.zeros(shape, dtype=dtype)
    if labels.size == 0:
        return labels
    step = max(1, (1 << 20) // max(1, int(np.prod(shape[1:]))))
    for k in range(0, shape[0], step):
        lab = labels[k:k + step]
        for s, m in enumerate(masks, start=1):
            mk = m[k:k + step]
            if s > 1 and np.logical_and(lab, mk).any():
                return None
            np.copyto(lab, dtype(s), where=mk)
    return labels


def _frame_arrays(volume: Volume, sources: list[Dataset], masks: list[np.ndarray]
                  ) -> tuple[list[Dataset], np.ndarray]:
    """Order the sources and build the pixel array highdicom wants.

    highdicom pairs ``pixel_array[i]`` with ``source_images[i]`` (single-frame sources) or
    with frame ``i + 1`` of the one multi-frame source.  Disjoint segments are passed as
    a label-map style ``(frames, rows, cols)`` uint8/uint16 array (highdicom then only
    checks the maximum, which is much faster than its overlap test on a stacked array);
    overlapping segments as a stacked ``(frames, rows, cols, segments)`` bool array.
    """
    frames = volume.frames
    multi = [f.frame_number is not None for f in frames]
    rows, cols = frames[0].rows, frames[0].columns
    if any(f.rows != rows or f.columns != cols for f in frames):
        raise InputError("source frames differ in size; a DICOM SEG needs one frame matrix",
                         tag="Rows")
    by_uid = {str(d.SOPInstanceUID): d for d in sources}

    if all(multi):
        uids = {f.sop_instance_uid for f in frames}
        if len(uids) != 1 or len(sources) != 1:
            raise InputError("series made of several multi-frame instances: a DICOM SEG "
                             "can reference only one multi-frame source image",
                             tag="NumberOfFrames")
        src = sources[0]
        if str(src.SOPInstanceUID) not in uids:
            raise InputError("volume frames do not belong to the source multi-frame instance",
                             tag="SOPInstanceUID")
        n_frames = int(src.get("NumberOfFrames", 0) or 0)
        numbers = [f.frame_number for f in frames if f.frame_number is not None]  # every frame's: all(multi)
        if n_frames < max(numbers):
            raise InputError(f"frame numbers exceed NumberOfFrames ({n_frames})",
                             tag="NumberOfFrames")
        ordered = [src]
        index: np.ndarray | slice = np.array([n - 1 for n in numbers])
    elif any(multi):
        raise InputError("series mixes single-frame and multi-frame instances; "
                         "not supported for DICOM SEG output", tag="NumberOfFrames")
    else:
        ordered = []
        for f in frames:
            ds = by_uid.get(f.sop_instance_uid)
            if ds is None:
                raise InputError(f"frame {f.sop_instance_uid} has no source header",
                                 tag="SOPInstanceUID")
            ordered.append(ds)
        if len(by_uid) != len(frames):
            raise InputError(f"{len(frames)} frames but {len(by_uid)} distinct source "
                             "instances", tag="SOPInstanceUID")
        n_frames = len(frames)
        index = slice(None)

    dtype = np.uint8 if len(masks) < 256 else np.uint16
    labels = _label_map(masks, dtype)
    if labels is None:  # overlapping segments
        arr = np.zeros((n_frames, rows, cols, len(masks)), dtype=bool)
        for s, m in enumerate(masks):
            arr[index, :, :, s] = m
    else:
        if isinstance(index, slice):
            arr = labels
        else:
            arr = np.zeros((n_frames, rows, cols), dtype=dtype)
            arr[index] = labels
    return ordered, arr


class _Segmentation(hd.seg.Segmentation):
    """highdicom Segmentation with a fast overlap test for stacked boolean arrays.

    highdicom tests overlap with ``pixel_array.sum(axis=-1)``, a full-size integer temporary
    (slow and large on a 400-slice series, figures in bench/README.md); a pairwise AND gives the
    same answer.  Anything other than a stacked bool numpy array goes through highdicom's own check.
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray | hd.Volume,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray | hd.Volume, hd.seg.SegmentsOverlapValues]:
        if (isinstance(pixel_array, np.ndarray) and pixel_array.dtype == np.bool_
                and pixel_array.ndim == 4
                and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
                and pixel_array.shape[-1] == len(segment_numbers)):
            masks = [pixel_array[..., s] for s in range(pixel_array.shape[-1])]
            overlap = (hd.seg.SegmentsOverlapValues.YES if _overlap(masks)
                       else hd.seg.SegmentsOverlapValues.NO)
            return pixel_array, overlap
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers,
                                                   segmentation_type, dtype)


def warm_up() -> bool:
    """Load highdicom's DICOM standard tables now (JSON, once per process).

    highdicom loads them lazily when the first SEG is built; the pipeline calls this in a
    background thread while it segments, so that cost is off the SEG's own path.  Uses
    highdicom's internal loaders, so it only tries: returns whether the tables are loaded.
    """
    try:
        from highdicom import _standard_utils as standard

        standard.get_sop_class_iod_map()
        standard.get_iod_module_map()
        standard.get_module_attribute_map()
        return True
    except Exception:  # an optimisation only; write_seg loads them itself
        log.debug("highdicom standard tables not preloaded", exc_info=True)
        return False


def _default_series_number(volume: Volume) -> int:
    n = volume.info.series_number
    if n is None:
        try:
            n = int(volume.info.source_datasets[0].get("SeriesNumber") or 0)
        except (TypeError, ValueError, IndexError):
            n = 0
    return 900 + (int(n) % 100)


def write_seg(
    volume: Volume,
    segments: list[SegmentSpec],
    out_path: Path,
    *,
    algorithm_name: str = "dicom-node HU",
    algorithm_version: str,
    algorithm_family: Code | hd.sr.CodedConcept = ALGORITHM_FAMILY_THRESHOLD,
    series_number: int | None = None,
    series_description: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "dicom-node",
    content_label: str = "SEGMENTATION",
) -> Dataset:
    """Write one BINARY DICOM SEG for ``segments`` of ``volume`` to ``out_path``, atomically.

    The instance (SOP class 1.2.840.10008.5.1.4.1.1.66.4) shares the source Frame of Reference
    and references every source instance (ReferencedSeriesSequence, and per frame
    DerivationImageSequence/SourceImageSequence with ReferencedFrameNumber for multi-frame
    sources); the masks are mapped onto the source frames with :meth:`Volume.mask_on_frames`.
    A segment with no voxels keeps its SegmentSequence item (segment numbers stay stable and a
    reader sees the tissue was looked for) without frames; empty frames are omitted, and when
    every segment is empty highdicom encodes all (zero) frames, which is valid too.  Disjoint
    segments go to highdicom as one label-map style array, overlapping ones as a stacked array
    with a fast overlap test (:class:`_Segmentation`).

    Args:
        volume: the volume the masks were computed on; its ``info.source_datasets`` and
            ``frames`` identify the source instances/frames.
        segments: one :class:`SegmentSpec` per tissue; segment numbers are 1.. in order.
            Empty masks are allowed (segment kept without frames, warning logged).
        out_path: destination file; written to a temp file in the same folder, fsynced,
            then ``os.replace``\\ d into place.
        algorithm_name / algorithm_version / algorithm_family: SegmentationAlgorithm
            identification (type AUTOMATIC); family from DICOM CID 7162.
        series_number: defaults to ``900 + source SeriesNumber % 100``.
        series_description: defaults to ``"SEG <source description>"``.
        series_instance_uid: defaults to a new UID; must differ from the source series.
        sop_instance_uid: defaults to one derived from ``series_instance_uid`` when that is
            given (a re-run of the same job writes the same instance, so a PACS that already
            has it stores it once), else a new UID.
        manufacturer: Manufacturer (and ManufacturerModelName).
        content_label: ContentLabel (DICOM CS: upper case, max 16 chars).

    Returns:
        The written dataset (including PixelData).

    Raises:
        InputError: the source headers lack what a SEG needs (UIDs, frame of reference,
            consistent frames).
        ValueError: bad arguments (no segments, mask shape, colour, codes, labels).
    """
    if not segments:
        raise ValueError("write_seg needs at least one segment")
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    if len(content_label) > 16 or content_label != content_label.upper():
        raise ValueError(f"content_label must be upper case, max 16 chars: {content_label!r}")
    sources = _check_sources(volume)
    src_series = str(sources[0].SeriesInstanceUID)
    if series_instance_uid is not None and str(series_instance_uid) == src_series:
        raise ValueError("series_instance_uid must differ from the source series")

    descriptions = []
    frame_masks = []
    for n, spec in enumerate(segments, start=1):
        if not spec.label or len(spec.label) > 64:
            raise ValueError(f"segment {n}: label must be 1..64 characters: {spec.label!r}")
        mask = np.asarray(spec.mask)
        if mask.shape != volume.shape:
            raise ValueError(f"segment {spec.label!r}: mask shape {mask.shape} "
                             f"!= volume shape {volume.shape}")
        fm = volume.mask_on_frames(mask.astype(bool, copy=False))
        if not fm.any():
            log.warning("DICOM SEG: segment %d %r is empty; kept without frames", n, spec.label)
        frame_masks.append(fm)
        desc = hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=spec.label,
            segmented_property_category=_code(spec.category, f"segment {spec.label!r} category"),
            segmented_property_type=_code(spec.type, f"segment {spec.label!r} type"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm_name, family=algorithm_family, version=algorithm_version),
            display_color=_color(spec.color, spec.label),
        )
        text = (spec.description or spec.tissue or "").strip()
        if text:
            desc.SegmentDescription = text[:1024]
        descriptions.append(desc)

    ordered, pixel_array = _frame_arrays(volume, sources, frame_masks)
    del frame_masks

    if series_description is None:
        base = str(volume.info.series_description or ordered[0].get("SeriesDescription", "")
                   or "").strip()
        series_description = f"SEG {base}".strip()
    series_description = series_description[:64]

    seg = _Segmentation(
        source_images=ordered,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=str(series_instance_uid or hd.UID()),
        series_number=int(series_number if series_number is not None
                          else _default_series_number(volume)),
        sop_instance_uid=str(sop_instance_uid or (
            pydicom.uid.generate_uid(entropy_srcs=[str(series_instance_uid), "SEG instance 1"])
            if series_instance_uid else hd.UID())),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer,
        software_versions=algorithm_version,
        device_serial_number="0",
        content_label=content_label,
        content_description=series_description or None,
        omit_empty_frames=True,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if series_description:
        seg.SeriesDescription = series_description
    repairs = conform_patient_study(seg)  # what the copy itself needs (a character set)
    if repairs:
        log.warning("DICOM SEG: %s", describe(repairs))
    _atomic_write(seg, Path(out_path))
    return seg


def _atomic_write(ds: Dataset, out_path: Path) -> None:
    with atomic_open(out_path) as fh:
        ds.save_as(fh, enforce_file_format=True)


# --------------------------------------------------------------------------- reading


def read_seg_masks(path_or_ds: str | os.PathLike[str] | Dataset
                   ) -> dict[str, dict[SourceKey, np.ndarray]]:
    """Read a BINARY/FRACTIONAL DICOM SEG back into per-segment masks per source frame.

    Returns ``{SegmentLabel: {source key: bool mask (rows, columns)}}`` where the source key
    is the referenced SOPInstanceUID (single-frame sources) or ``(SOPInstanceUID, frame
    number)`` (multi-frame sources), see :func:`source_key`.  Every label has an entry for
    every source key known to the SEG: all instances in ReferencedSeriesSequence that are
    referenced as single-frame, plus every (instance, frame) any SEG frame derives from;
    source frames without a SEG frame for that segment (omitted empty frames) are all False.
    Frames without a source reference are ignored.  Duplicate labels get ``" #<number>"``
    appended.
    """
    ds = path_or_ds if isinstance(path_or_ds, Dataset) else pydicom.dcmread(path_or_ds)
    if str(ds.SOPClassUID) not in (SEGMENTATION_STORAGE, "1.2.840.10008.5.1.4.1.1.66.7"):
        raise InputError(f"not a Segmentation instance (SOPClassUID {ds.SOPClassUID})",
                         tag="SOPClassUID")
    rows, cols = int(ds.Rows), int(ds.Columns)
    labels: dict[int, str] = {}
    for item in ds.SegmentSequence:
        num = int(item.SegmentNumber)
        label = str(item.get("SegmentLabel", "") or f"segment {num}")
        if label in labels.values():
            label = f"{label} #{num}"
        labels[num] = label

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = ds.pixel_array if "PixelData" in ds else np.zeros((0, rows, cols), np.uint8)
    pixels = np.asarray(pixels).reshape(n_frames, rows, cols)
    threshold = 0
    if str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        threshold = int(ds.get("MaximumFractionalValue", 255)) // 2

    # All source keys known to the SEG.
    keys: list[SourceKey] = []
    seen: set[Any] = set()
    frame_refs: list[tuple[int | None, SourceKey | None]] = []
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for fg in ds.get("PerFrameFunctionalGroupsSequence", []):
        seg_id = fg.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence")
        seg_num = int(seg_id[0].ReferencedSegmentNumber) if seg_id else None
        key: SourceKey | None = None
        for der in fg.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                uid = str(src.ReferencedSOPInstanceUID)
                fn = src.get("ReferencedFrameNumber")
                if fn is not None and not isinstance(fn, (int, str)):
                    fn = list(fn)[0] if len(fn) else None
                key = uid if fn in (None, "") else (uid, int(fn))
                break
            if key is not None:
                break
        frame_refs.append((seg_num, key))
        if key is not None and key not in seen:
            seen.add(key)
            keys.append(key)
    multi_uids = {k[0] for k in keys if isinstance(k, tuple)}
    for series in ds.get("ReferencedSeriesSequence", []):
        for inst in series.get("ReferencedInstanceSequence", []):
            uid = str(inst.ReferencedSOPInstanceUID)
            if uid not in multi_uids and uid not in seen:
                seen.add(uid)
                keys.append(uid)

    out: dict[str, dict[SourceKey, np.ndarray]] = {
        label: {k: np.zeros((rows, cols), dtype=bool) for k in keys} for label in labels.values()
    }
    for idx, (seg_num, key) in enumerate(frame_refs):
        if seg_num is None or key is None or seg_num not in labels:
            continue
        if idx >= pixels.shape[0]:
            break
        out[labels[seg_num]][key] |= pixels[idx] > threshold
    return out
