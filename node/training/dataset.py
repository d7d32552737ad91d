"""Export received series and their DICOM SEG annotations as an nnU-Net raw dataset
(``dicom-node dataset export``); what is written and when a pair is refused: :func:`export_dataset`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from node.errors import InputError, NodeError
from node.pipeline.seg import SEGMENTATION_STORAGE, read_seg_masks, source_key
from node.pipeline.series.find import find_series
from node.pipeline.series.load import load_series
from node.pipeline.volume import Volume

log = logging.getLogger(__name__)

_SEG_CLASSES = (SEGMENTATION_STORAGE, "1.2.840.10008.5.1.4.1.1.66.7")


@dataclass
class ExportResult:
    folder: Path
    exported: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


def parse_label_mapping(items: Sequence[str]) -> dict[str, list[str]]:
    """``["pancreas=pancreas,pancreas tumour", "tumour=pancreas tumour"]`` -> ``{name: [segment labels]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"label mapping {item!r}: expected NAME=SEGMENT LABEL[,SEGMENT LABEL...]")
        name, segs = item.split("=", 1)
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "background":
            raise InputError(f"label mapping {item!r}: NAME must be letters, digits, _ (not 'background')")
        out[name] = [s.strip() for s in segs.split(",") if s.strip()]
    return out


def _norm(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "segment"


def _seg_files(groups: dict[str, list[Path]]) -> tuple[dict[str, list[Path]], list[tuple[Path, pydicom.Dataset]]]:
    images: dict[str, list[Path]] = {}
    segs: list[tuple[Path, pydicom.Dataset]] = []
    for uid, files in groups.items():
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        if str(head.get("SOPClassUID", "")) in _SEG_CLASSES:
            segs.extend((f, pydicom.dcmread(f, stop_before_pixels=True)) for f in files)
        else:
            images[uid] = files
    return images, segs


def _referenced_series(seg: pydicom.Dataset) -> str | None:
    for item in seg.get("ReferencedSeriesSequence", []):
        return str(item.SeriesInstanceUID)
    return None


def check_geometry(volume: Volume, seg: pydicom.Dataset) -> str | None:
    """Why ``seg`` cannot be laid on ``volume``'s grid, or None."""
    if volume.resampled:
        return "the image series was resampled (tilt or uneven spacing); SEG frames are not on the volume grid"
    if str(seg.get("FrameOfReferenceUID", "")) != str(volume.info.frame_of_reference_uid or ""):
        return (f"FrameOfReferenceUID differs (SEG {seg.get('FrameOfReferenceUID')}, "
                f"image {volume.info.frame_of_reference_uid})")
    fr = volume.frames[0]
    if (int(seg.Rows), int(seg.Columns)) != (fr.rows, fr.columns):
        return f"matrix differs (SEG {seg.Rows}x{seg.Columns}, image {fr.rows}x{fr.columns})"
    shared = seg.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    pm = shared.get("PixelMeasuresSequence")
    if pm and "PixelSpacing" in pm[0]:
        sp = [float(v) for v in pm[0].PixelSpacing]
        if not np.allclose(sp, fr.pixel_spacing, atol=1e-3):
            return f"pixel spacing differs (SEG {sp}, image {list(fr.pixel_spacing)})"
    po = shared.get("PlaneOrientationSequence")
    if po and "ImageOrientationPatient" in po[0]:
        iop = [float(v) for v in po[0].ImageOrientationPatient]
        if not np.allclose(iop, fr.orientation, atol=1e-4):
            return "image orientation differs"
    return None


def seg_label_volumes(volume: Volume, seg_path: Path) -> dict[str, np.ndarray]:
    """``{SegmentLabel: bool mask on the volume grid}``; InputError when a frame is not in the series."""
    per_frame = read_seg_masks(seg_path)
    keys = [source_key(f) for f in volume.frames]
    index = {k: n for n, k in enumerate(keys)}
    out = {}
    for label, frames in per_frame.items():
        m = np.zeros(volume.shape, dtype=bool)
        for key, mask in frames.items():
            if key not in index:
                if mask.any():
                    raise InputError(f"SEG frame references {key}, which is not an image of the series")
                continue
            m[index[key]] = mask
        out[label] = m
    return out


def export_dataset(inputs: Sequence[str | Path], out_dir: str | Path, *, dataset_id: int, name: str,
                   mapping: dict[str, list[str]] | None = None, orientation: str = "LPS") -> ExportResult:
    """Write the nnU-Net raw dataset.

    Input: folders of DICOM (e.g. the node's spool, or a PACS export) holding CT series and
    DICOM SEG instances that reference them (a radiologist's corrections sent back to the
    node, or any annotation tool's output).  Output::

        <out>/Dataset<ID>_<Name>/imagesTr/<case>_0000.nii.gz
                                /labelsTr/<case>.nii.gz
                                /dataset.json      (channel CT, labels = the stated mapping)
                                /inventory.csv     (every pair: exported or refused, and why)

    Images are written through SimpleITK from the node's volume, stored in ``orientation`` (axis
    codes, default ``LPS``: an axial head-first-supine series as the node holds it; brought there
    by axis flips and permutations only, whatever the series' own orientation) with direction,
    origin and spacing from the volume affine; ``dataset.json`` says ``input_orientation``, which
    nnU-Net copies into the trained model folder and the nnU-Net backend reads, so training and
    inference see the same axes.  A pair is refused when its
    geometry does not match (:func:`check_geometry`, :func:`seg_label_volumes`): another Frame of
    Reference, matrix size, pixel spacing or orientation, SEG frames that reference images not in
    the series, or a series that had to be resampled (gantry tilt, uneven spacing: the SEG frames
    then do not lie on the volume grid).
    """
    from node.pipeline.orientation import check_codes, to_orientation
    from node.training.nnunet import dataset_name, write_case_nifti, write_dataset_json

    try:
        orientation = check_codes(orientation)
    except ValueError as exc:
        raise InputError(str(exc), tag="orientation") from None

    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise InputError(f"dataset name {name!r}: letters, digits and _ only")
    if not 1 <= dataset_id <= 999:
        raise InputError(f"dataset id {dataset_id}: must be 1..999")
    folder = Path(out_dir) / dataset_name(dataset_id, name)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    images, segs = _seg_files(find_series(inputs))
    if not segs:
        raise InputError("no DICOM SEG instances found in the input", path=", ".join(str(p) for p in inputs))

    # label mapping: stated, or one label per distinct segment label (in order of appearance)
    if mapping is None:
        mapping = {}
        for _, ds in segs:
            for item in ds.SegmentSequence:
                lab = str(item.get("SegmentLabel", ""))
                key = _norm(lab)
                if lab and key not in mapping:
                    mapping[key] = [lab]
    label_ids = {"background": 0, **{n: i for i, n in enumerate(mapping, start=1)}}
    result = ExportResult(folder, labels=label_ids)
    rows = []
    cache: dict[str, Volume] = {}
    for n, (seg_path, seg) in enumerate(sorted(segs, key=lambda s: str(s[0]))):
        case = f"case_{n:04d}"
        src_uid = _referenced_series(seg)
        row = {"case": case, "seg_file": str(seg_path), "source_series": src_uid or "", "status": "refused",
               "reason": "", "size_ijk": "", "spacing_mm_ijk": "", "labels_present": ""}
        try:
            if not src_uid or src_uid not in images:
                raise InputError(f"referenced series {src_uid or '(none)'} is not in the input")
            if src_uid not in cache:
                cache[src_uid] = load_series(images[src_uid], require_modality="CT")
            vol = cache[src_uid]
            why = check_geometry(vol, seg)
            if why:
                raise InputError(f"geometry does not match: {why}")
            masks = seg_label_volumes(vol, seg_path)
            label_map = np.zeros(vol.shape, dtype=np.uint8)
            present = []
            for lname, seg_labels in mapping.items():
                hit = [s for s in seg_labels if s in masks]
                for s in hit:
                    label_map[masks[s]] = label_ids[lname]
                if hit and any(masks[s].any() for s in hit):
                    present.append(lname)
            if not present:
                raise InputError(f"no segment matches the label mapping (segments: {', '.join(masks)})")
            img_o = to_orientation(np.clip(np.rint(vol.array), -32768, 32767).astype(np.int16), vol.affine, orientation)
            lab_o = to_orientation(label_map, vol.affine, orientation)
            d = img_o.affine[:3, :3] / np.asarray(img_o.spacing)[None, :]
            write_case_nifti(folder / "imagesTr" / f"{case}_0000.nii.gz", img_o.array, img_o.spacing, img_o.affine[:3, 3], d)
            write_case_nifti(folder / "labelsTr" / f"{case}.nii.gz", lab_o.array, lab_o.spacing, lab_o.affine[:3, 3], d)
            row.update(status="exported", size_ijk="x".join(str(s) for s in vol.shape[::-1]),
                       spacing_mm_ijk="x".join(f"{s:.3f}" for s in vol.spacing), labels_present=";".join(present))
            result.exported.append(case)
        except NodeError as exc:
            row["reason"] = str(exc)
            result.refused.append((str(seg_path), str(exc)))
            log.warning("dataset export: refused %s: %s", seg_path, exc)
        rows.append(row)
    write_dataset_json(folder, label_ids, len(result.exported), input_orientation=orientation)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["label_mapping"] = {k: v for k, v in mapping.items()}
    meta["description"] = "exported by dicom-node dataset export (label_mapping: dataset label -> DICOM SEG segment labels)"
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    with open(folder / "inventory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
    return result
