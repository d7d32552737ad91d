"""Per-slice checks of what the node sends back against the original images: the SEG frame of
every source slice against that slice's own pixels in a HU range, and each mesh's cross-section
with every source image plane against that image's SEG frame."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

from node.pipeline.seg import read_seg_masks


@dataclass(frozen=True)
class Slice:
    """One original single-frame image: its HU pixels and the map (column, row, 0, 1) -> LPS."""

    uid: str
    hu: np.ndarray
    pixel_to_patient: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        return self.pixel_to_patient[:3, 2]


def read_slices(files: list[Path]) -> list[Slice]:
    """The single-frame CT images among ``files`` (localizers left out), in no particular order."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        if "LOCALIZER" in [str(v) for v in ds.get("ImageType", [])]:
            continue
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        m = np.eye(4)
        m[:3, 0] = iop[:3] * dc
        m[:3, 1] = iop[3:] * dr
        m[:3, 2] = np.cross(iop[:3], iop[3:])
        m[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
        out.append(Slice(str(ds.SOPInstanceUID), hu, m))
    return out


def _body_2d(hu: np.ndarray, threshold: float = -400.0) -> np.ndarray:
    """Inside the patient on one slice: the largest component above ``threshold``, holes filled,
    less a pixel at its outline (where the node's body mask has its own rules: table, cushions;
    for the recall only)."""
    lab, n = ndimage.label(hu > threshold)
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = ndimage.sum_labels(np.ones(hu.shape), lab, index=np.arange(1, n + 1))
    return ndimage.binary_erosion(ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes))))


@dataclass(frozen=True)
class SliceScore:
    uid: str
    position: float  # along the slice normal, mm
    precision: float
    recall: float
    seg_pixels: int
    ref_pixels: int


def threshold_agreement(
    seg_path: Path, segment: str, slices: list[Slice], hu_range: tuple[float, float], *,
    min_pixels: int | None = None,
) -> list[SliceScore]:
    """Per original slice: the SEG frame of ``segment`` against the slice's own pixels in
    ``hu_range``: precision against all of them, recall against those inside the patient.  Specks the profile removes
    are ignored for the recall: the profile keeps or drops whole 3-D components, so an in-range
    2-D component the SEG does not touch at all was dropped with its component (a SEG shifted
    off it shows in the precision); with ``min_pixels`` such a component counts anyway when it
    holds that many pixels."""
    frames = read_seg_masks(seg_path)[segment]
    scores = []
    for s in slices:
        seg = frames[s.uid]
        inr = (s.hu >= hu_range[0]) & (s.hu <= hu_range[1])
        lab, n = ndimage.label(inr & _body_2d(s.hu), structure=np.ones((3, 3)))
        keep = np.zeros(n + 1, bool)
        if n:
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
            if min_pixels is not None:
                keep[1:] = sizes[1:] >= min_pixels
            keep[np.unique(lab[seg])] = True
            keep[0] = False
        ref = keep[lab]
        tp = int((seg & inr).sum())
        prec = tp / seg.sum() if seg.any() else 1.0
        rec = int((seg & ref).sum()) / ref.sum() if ref.any() else 1.0
        scores.append(SliceScore(s.uid, float(s.normal @ s.pixel_to_patient[:3, 3]), prec, rec,
                                 int(seg.sum()), int(ref.sum())))
    return sorted(scores, key=lambda x: x.position)


def mesh_section(mesh: Any, s: Slice) -> np.ndarray:
    """The cross-section of ``mesh`` (a trimesh) with the plane of image ``s``, filled (even-odd),
    on its pixels."""
    from skimage.draw import polygon

    out = np.zeros(s.hu.shape, bool)
    sec = mesh.section(plane_origin=s.pixel_to_patient[:3, 3], plane_normal=s.normal)
    if sec is None:
        return out
    inv = np.linalg.inv(s.pixel_to_patient)
    for loop in sec.discrete:
        pts = np.c_[loop, np.ones(len(loop))] @ inv.T  # (column, row, ~0, 1)
        rr, cc = polygon(pts[:, 1], pts[:, 0], shape=out.shape)
        part = np.zeros(out.shape, bool)
        part[rr, cc] = True
        out ^= part
    return out


def section_dice(seg_path: Path, segment: str, mesh_path: Path, slices: list[Slice]) -> list[tuple[float, float]]:
    """``(position, Dice)`` per original slice between the mesh cross-section and the SEG frame
    (slices where both are empty are left out)."""
    import trimesh

    frames = read_seg_masks(seg_path)[segment]
    mesh = trimesh.load_mesh(str(mesh_path), process=False)
    out = []
    for s in slices:
        seg = frames[s.uid]
        sec = mesh_section(mesh, s)
        total = int(seg.sum() + sec.sum())
        if total == 0:
            continue
        out.append((float(s.normal @ s.pixel_to_patient[:3, 3]), 2 * int((seg & sec).sum()) / total))
    return sorted(out)


#: a second profile of threshold tissues, in the lung: HU ranges with small-part removal and an
#: opening (what the lungs profile was before it learnt its anatomy: issue 12)
_MESH = {"smoothing": "windowed_sinc", "iterations": 20, "pass_band": 0.03, "decimate": 0.5}
PARENCHYMA = {
    "name": "parenchyma", "description": "lung by HU ranges (geometry test)", "model_type": "hu_based",
    "tissues": [
        {"name": "tissue", "description": "Lung tissue", "color": [197, 165, 145], "hu": [-500, -100],
         "morphology": [{"op": "remove_small", "min_ml": 1}], "mesh": _MESH,
         "category": {"value": "91723000", "meaning": "Anatomical Structure"},
         "type": {"value": "39607008", "meaning": "Lung"}},
        {"name": "airways", "description": "Air inside the lungs and airways", "color": [182, 228, 255],
         "hu": [-1000, -600], "morphology": [{"op": "opening", "radius_mm": 1}, {"op": "remove_small", "min_ml": 5}],
         "mesh": _MESH, "category": {"value": "91723000", "meaning": "Anatomical Structure"},
         "type": {"value": "89187006", "meaning": "Airway structure"}},
    ],
}
