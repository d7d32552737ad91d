"""Write realistic DICOM CT series from a NIfTI volume (test and benchmark tooling).

:func:`write_series` makes a single-frame (or one Enhanced multi-frame) CT series with consistent
geometry, fresh UIDs and the attributes ``dciodvfy`` asks for, with the quirks of real PACS
traffic on request: gantry tilt, uneven spacing or any gaps, patient positions HFP/FFS/FFP, coronal,
sagittal or slightly oblique planes, numbering against the normal, shuffled files, a localizer, every common
transfer syntax.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
    generate_uid,
)

TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-extended": JPEGExtended12Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-lossless-57": JPEGLossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-ls-near": JPEGLSNearLossless,
    "j2k": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "rle": RLELossless,
}
"""Names accepted by ``transfer_syntax`` and the UID each one writes."""

LOSSY = {"jpeg-baseline", "jpeg-extended", "jpeg-ls-near", "j2k-lossy"}

_DCMCJPEG_FLAGS = {
    "jpeg-baseline": ["+eb"],
    "jpeg-extended": ["+ee"],
    "jpeg-lossless": ["+e1"],
    "jpeg-lossless-57": ["+el", "+sv", "1"],
}

_BASELINE_WINDOW = (-1000.0, 1000.0)

# what highdicom's LegacyConvertedEnhancedCTImage can encode
_ENHANCED_SYNTAXES = {"explicit", "implicit", "j2k", "jpeg-ls", "rle"}


def _load_input(volume_hu: np.ndarray | str | Path, affine: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Return (data, affine) in closest-canonical RAS orientation."""
    import nibabel as nib

    if isinstance(volume_hu, (str, Path)):
        img = nib.load(str(volume_hu))
    else:
        arr = np.asarray(volume_hu)
        if arr.ndim != 3:
            raise ValueError(f"volume must be 3-D, got shape {arr.shape}")
        img = nib.Nifti1Image(arr, np.eye(4) if affine is None else np.asarray(affine, dtype=float))
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data, np.asarray(img.affine, dtype=float)


def _resample(data: np.ndarray, aff: np.ndarray, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resample canonical (x, y, z) data to ``size`` = (rows, cols, slices), same field of view."""
    from scipy import ndimage

    rows, cols, slices = size
    new_shape = (cols, rows, slices)  # x = DICOM columns, y = DICOM rows
    old = np.array(data.shape, dtype=float)
    new = np.array(new_shape, dtype=float)
    out = ndimage.zoom(data, new / old, order=1, mode="nearest", grid_mode=True).astype(np.float32)
    scale = old / new
    new_aff = aff.copy()
    new_aff[:3, :3] = aff[:3, :3] * scale[None, :]
    # voxel centre u of the new grid sits at old index (u + 0.5) * scale - 0.5
    new_aff[:3, 3] = aff[:3, :3] @ (0.5 * scale - 0.5) + aff[:3, 3]
    return out, new_aff


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _ds_str(v: float) -> str:
    """A DS value string of at most 16 characters."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    if len(s) > 16:
        s = f"{v:.8g}"
    return s


def _base_dataset(
    *,
    modality: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    series_description: str,
    series_number: int,
    patient_name: str,
    patient_id: str,
    study_description: str,
    accession_number: str,
    now: _dt.datetime,
    patient_position: str = "HFS",
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.AcquisitionDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = now.strftime("%H%M%S")
    ds.SeriesTime = ds.StudyTime
    ds.AcquisitionTime = ds.StudyTime
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "node synth_series"
    ds.ManufacturerModelName = "synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
    if modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "B30f"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = "10"
        ds.RepetitionTime = "500"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
    ds.PatientPosition = patient_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    if modality == "CT":
        ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _finish(ds: Dataset, ts_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ts_uid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NODE_SYNTH"
    ds.file_meta = meta


def _store(ds: Dataset, hu: np.ndarray, ts: str) -> None:
    """Put ``hu`` (rows, cols) into ``ds`` as pixel data for transfer syntax name ``ts``."""
    if ts == "jpeg-baseline":
        lo, hi = _BASELINE_WINDOW
        slope = (hi - lo) / 255.0
        stored = np.clip(np.rint((hu - lo) / slope), 0, 255).astype(np.uint8)
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.RescaleSlope = _ds_str(slope)
        ds.RescaleIntercept = _ds_str(lo)
    else:
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"


def _write(ds: Dataset, path: Path, ts: str) -> None:
    """Write ``ds`` (native pixel data) to ``path`` with the named transfer syntax.

    Encoders found in this environment (learned while writing this module):

    * pydicom's own encoders cover RLE Lossless (the native RLE encoder; pylibjpeg-rle
      only decodes), JPEG 2000 lossless/lossy (pylibjpeg-openjpeg) and JPEG-LS
      lossless/near-lossless (pyjpegls is installed; ``jls_error`` sets NEAR).
      Deflated Explicit VR Little Endian is written by pydicom itself when the file
      meta TransferSyntaxUID says so.
    * pydicom cannot *encode* any of the ISO 10918 JPEG processes; DCMTK's
      ``dcmcjpeg`` does: ``+eb`` baseline (8-bit only), ``+ee`` extended (12-bit),
      ``+el`` lossless process 14 (.57, we pass ``+sv 1``) and ``+e1`` lossless
      SV1 (.70).  ``dcmcjpls`` is the fallback for JPEG-LS when pyjpegls is missing.
    * ``dcmcjpeg`` keeps the SOPInstanceUID unless asked otherwise (it only changes it for
      lossy processes when ``+ud`` is given), so the UIDs written here survive.
    * A compression ratio (``j2k_cr``) is a poor knob for small test images (what it lost
      on a 64x64 slice: bench/README.md), so ``j2k-lossy`` asks for a PSNR (55 dB on the
      12-bit range, ~7 HU RMS).
    """
    if ts in ("explicit", "implicit", "deflate"):
        _finish(ds, TRANSFER_SYNTAXES[ts])
        ds.save_as(path, enforce_file_format=True, implicit_vr=(ts == "implicit"), little_endian=True)
        return
    if ts in _DCMCJPEG_FLAGS:
        if shutil.which("dcmcjpeg") is None:
            raise RuntimeError("dcmcjpeg (DCMTK) is needed for the JPEG transfer syntaxes")
        _finish(ds, ExplicitVRLittleEndian)
        tmp = path.with_suffix(".tmp.dcm")
        ds.save_as(tmp, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", *_DCMCJPEG_FLAGS[ts], str(tmp), str(path)], check=True, capture_output=True)
        tmp.unlink()
        return
    uid = TRANSFER_SYNTAXES[ts]
    _finish(ds, ExplicitVRLittleEndian)
    kwargs: dict = {"generate_instance_uid": False}
    if ts == "jpeg-ls-near":
        kwargs["jls_error"] = 2
    if ts == "j2k-lossy":
        kwargs["j2k_psnr"] = [55.0]  # ~7 HU RMS on the 12-bit range
    try:
        ds.compress(uid, **kwargs)
    except (RuntimeError, ImportError):
        if ts.startswith("jpeg-ls") and shutil.which("dcmcjpls"):
            tmp = path.with_suffix(".tmp.dcm")
            ds.save_as(tmp, enforce_file_format=True)
            flags = ["+ee"] if ts == "jpeg-ls-near" else ["+el"]
            subprocess.run(["dcmcjpls", *flags, str(tmp), str(path)], check=True, capture_output=True)
            tmp.unlink()
            return
        raise
    ds.save_as(path, enforce_file_format=True)


_POSITIONS = {"HFS": (1, 1), "HFP": (-1, -1), "FFS": (-1, 1), "FFP": (1, -1)}


def _planes(
    stack: np.ndarray, origin: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: tuple[float, float, float], position: str, plane: str, oblique_deg: float,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], np.ndarray]]:
    """Image planes ``(ipp, row_cos, col_cos, (column spacing, row spacing), pixels)`` through the
    LPS-aligned ``stack`` (``[k, r, c]`` along ``axes`` with ``spacing``), for a patient position,
    a primary plane and an oblique angle, covering the whole volume."""
    from scipy import ndimage

    if position not in _POSITIONS:
        raise ValueError(f"patient_position must be one of {', '.join(_POSITIONS)}, got {position!r}")
    x, y, z = np.eye(3)
    if plane == "axial":
        row, col = x.copy(), y.copy()
        sx, sy = _POSITIONS[position]
        row, col = row * sx, col * sy
    elif plane == "coronal":
        row, col = x.copy(), -z
    elif plane == "sagittal":
        row, col = y.copy(), -z
    else:
        raise ValueError(f"plane must be axial, coronal or sagittal, got {plane!r}")
    if oblique_deg:
        t = np.deg2rad(oblique_deg)
        normal0 = np.cross(row, col)
        col = np.cos(t) * col + np.sin(t) * normal0  # rotate about the row direction
    normal = np.cross(row, col)
    ax = np.stack(axes)  # rows: the stack's i (column), j (row), k (slice) directions in LPS
    sp = np.array(spacing)
    # output spacing: the source spacing of the closest source axis
    out_sp = [float(sp[int(np.argmax(np.abs(ax @ d)))]) for d in (row, col, normal)]
    nk, nr, nc = stack.shape
    corners = np.array([origin + ax[0] * sp[0] * c + ax[1] * sp[1] * r + ax[2] * sp[2] * k
                        for k in (0, nk - 1) for r in (0, nr - 1) for c in (0, nc - 1)])
    lo = [float(np.min(corners @ d)) for d in (row, col, normal)]
    hi = [float(np.max(corners @ d)) for d in (row, col, normal)]
    counts = [int(np.floor((h - lo_) / s + 1e-6)) + 1 for lo_, h, s in zip(lo, hi, out_sp)]
    jj, ii = np.mgrid[0: counts[1], 0: counts[0]].astype(np.float64)
    out = []
    for m in range(counts[2]):
        ipp = row * lo[0] + col * lo[1] + normal * (lo[2] + m * out_sp[2])
        pts = ipp[:, None, None] + row[:, None, None] * out_sp[0] * ii + col[:, None, None] * out_sp[1] * jj
        rel = pts - origin[:, None, None]
        idx = [np.tensordot(ax[a], rel, axes=1) / sp[a] for a in (2, 1, 0)]
        img = ndimage.map_coordinates(stack, idx, order=1, cval=-1024.0)
        out.append((ipp, row, col, (out_sp[0], out_sp[1]), img.astype(np.float32)))
    return out


def write_series(
    volume_hu: np.ndarray | str | Path,
    out_dir: str | Path,
    *,
    affine: np.ndarray | None = None,
    size: tuple[int, int, int] | None = None,
    tilt_deg: float = 0.0,
    uneven: bool = False,
    gaps_mm: Sequence[float] | None = None,
    patient_position: str = "HFS",
    plane: str = "axial",
    oblique_deg: float = 0.0,
    against_normal: bool = False,
    shuffle: bool = False,
    localizer: bool = False,
    transfer_syntax: str = "explicit",
    enhanced: bool = False,
    modality: str = "CT",
    series_description: str = "synthetic CT",
    series_number: int = 1,
    patient_name: str = "SYNTH^PATIENT",
    patient_id: str = "SYNTH0001",
    study_description: str = "synthetic study",
    accession_number: str = "SYN0001",
    study_instance_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write a DICOM series made from a HU volume and return the written files.

    Geometry: the NIfTI is brought to the closest canonical RAS orientation; DICOM columns run
    toward patient Left (NIfTI i reversed), rows toward Posterior (NIfTI j reversed), slices
    toward Superior (NIfTI k), so the slice normal cross(row, col) is +z (LPS) and the IPP of
    slice k is the LPS position of NIfTI voxel (nx-1, ny-1, k).

    Pixel storage: unsigned 12-bit, RescaleIntercept -1024, RescaleSlope 1, so HU are clipped
    to [-1024, 3071] (what most scanners do).  ``jpeg-baseline`` needs 8-bit samples: it stores
    a windowed 8-bit image (window -1000..1000 HU, so RescaleSlope = 2000/255, a non-integral
    slope).  How each transfer syntax is encoded: :func:`_write`.

    Enhanced CT (``enhanced=True``): highdicom's ``LegacyConvertedEnhancedCTImage`` builds the
    multi-frame object from the single-frame datasets (SOP class 1.2.840.10008.5.1.4.1.1.2.2) and
    encodes it itself, but only as explicit/implicit VR LE, JPEG 2000 lossless, JPEG-LS lossless
    or RLE.  It orders the frames by its own rule (here: descending along z, frame 1 = the top
    slice), so readers must sort by PlanePositionSequence, never by frame number.  ``dciodvfy``
    reports one Error on its output ("ReferencedSeriesSequence present but Instance does not
    reference Instances") and warns about ``AXIAL`` in FrameType; the single-frame files written
    here pass without errors or warnings.

    Args:
        volume_hu: NIfTI path, or an array indexed like a NIfTI (i, j, k) whose RAS
            affine is ``affine`` (identity when omitted).
        out_dir: folder to write into (created).
        affine: RAS affine for an array input.
        size: ``(rows, cols, slices)`` to resample to (same field of view), e.g.
            ``(512, 512, 400)``; ``None`` keeps the NIfTI grid.
        tilt_deg: gantry tilt: the column cosine is rotated about the x axis by this
            angle while slice positions keep stepping along z; pixels are sampled from
            the volume on the tilted planes (linear interpolation, -1024 HU outside).
        uneven: drop a few slices so that some gaps are doubled.
        gaps_mm: slice gaps in mm, repeated in turn from the first slice up to the top of the
            volume (e.g. ``[4, 1.08, 7]``): slices at arbitrary positions, sampled from the
            volume by linear interpolation along z (and on the tilted planes with ``tilt_deg``).
        patient_position: ``HFS`` (default), ``HFP``, ``FFS`` or ``FFP``: the image axes as that
            scanner position gives them (HFP: rows toward anterior, columns toward right; FFS:
            columns toward right and the slice normal toward the feet; FFP both), the anatomy
            in patient space unchanged.
        plane: ``axial`` (default), ``coronal`` (IOP 1,0,0 / 0,0,-1) or ``sagittal``
            (0,1,0 / 0,0,-1) primary slices through the same anatomy.
        oblique_deg: rotate the image plane by this angle about the row direction (an IOP
            slightly off the primary plane); pixels sampled by linear interpolation.
        against_normal: InstanceNumber 1 is the last slice along the normal (scanners that
            number from the other end).
        shuffle: random file names order and reversed InstanceNumbers (descending
            along the slice normal), so that nothing but geometry sorts them.
        localizer: add one LOCALIZER image (coronal projection) to the series.
        transfer_syntax: one of :data:`TRANSFER_SYNTAXES`.
        enhanced: write ONE Legacy Converted Enhanced CT multi-frame object instead.
        modality: ``"CT"`` or ``"MR"`` (MR Image Storage, for rejection tests).
        seed: random seed for ``shuffle``.

    Returns:
        Paths of the files written (the localizer last), in slice order unless shuffled.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; choose from {sorted(TRANSFER_SYNTAXES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, aff = _load_input(volume_hu, affine)
    if size is not None:
        data, aff = _resample(data, aff, (int(size[0]), int(size[1]), int(size[2])))
    nx, ny, nz = data.shape
    flip = np.array([-1.0, -1.0, 1.0])
    # LPS-aligned stack L[k, r, c]: column c -> left (-i), row r -> posterior (-j)
    stack = np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))
    del data
    row_cos = _unit(flip * -aff[:3, 0])
    col_cos = _unit(flip * -aff[:3, 1])
    dc = float(np.linalg.norm(aff[:3, 0]))
    dr = float(np.linalg.norm(aff[:3, 1]))
    dz = float(np.linalg.norm(aff[:3, 2]))
    origin = flip * (aff @ np.array([nx - 1, ny - 1, 0, 1.0]))[:3]
    step = flip * aff[:3, 2]

    rng = np.random.default_rng(seed)
    # slice positions as (fractional) indices of the input's z axis
    keep: list[float] = [float(k) for k in range(nz)]
    if uneven and nz >= 6:
        for idx in sorted({nz // 3, (2 * nz) // 3}, reverse=True):
            del keep[idx]
    if gaps_mm:
        if any(g <= 0 for g in gaps_mm):
            raise ValueError(f"gaps_mm must be positive, got {list(gaps_mm)}")
        keep = [0.0]
        while True:
            nxt = keep[-1] + gaps_mm[(len(keep) - 1) % len(gaps_mm)] / dz
            if nxt > nz - 1 + 1e-6:
                break
            keep.append(nxt)

    t = np.deg2rad(tilt_deg)
    if tilt_deg:
        # rotate the column cosine about the x (row) axis
        c, s = np.cos(t), np.sin(t)
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        frame_col = rot @ col_cos
    else:
        frame_col = col_cos
    rows, cols = ny, nx

    now = _dt.datetime.now()
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = generate_uid()
    base = functools.partial(
        _base_dataset, modality=modality, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid,
        series_description=series_description, series_number=series_number,
        patient_name=patient_name, patient_id=patient_id, study_description=study_description,
        accession_number=accession_number, now=now, patient_position=patient_position,
    )
    planes = None
    if patient_position != "HFS" or plane != "axial" or oblique_deg:
        if tilt_deg or gaps_mm or uneven or enhanced:
            raise ValueError("patient_position / plane / oblique_deg do not combine with tilt, gaps, uneven, enhanced")
        planes = _planes(stack, origin, (row_cos, col_cos, _unit(step)), (dc, dr, dz), patient_position, plane,
                         oblique_deg)
        keep = [float(m) for m in range(len(planes))]
    n = len(keep)
    numbers = list(range(n, 0, -1)) if (shuffle or against_normal) else list(range(1, n + 1))
    names = [f"IM{idx + 1:05d}.dcm" for idx in range(n)]
    if shuffle:
        names = [f"{code:08x}.dcm" for code in rng.choice(16**6, size=n, replace=False)]
    datasets: list[Dataset] = []
    for m, k in enumerate(keep):
        p_row, p_col, p_dr, p_dc = row_cos, frame_col, dr, dc
        if planes is not None:
            ipp, p_row, p_col, (p_dc, p_dr), img = planes[m]
        elif tilt_deg or k != int(k):
            from scipy import ndimage

            # slice centre keeps the untilted centre; the plane is tilted around it
            centre = origin + k * step + row_cos * dc * (cols - 1) / 2 + col_cos * dr * (rows - 1) / 2
            ipp = centre - row_cos * dc * (cols - 1) / 2 - frame_col * dr * (rows - 1) / 2
            jj, ii = np.mgrid[0:rows, 0:cols].astype(np.float64)
            pts = ipp[:, None, None] + row_cos[:, None, None] * dc * ii + frame_col[:, None, None] * dr * jj
            rel = pts - origin[:, None, None]
            ci = np.tensordot(row_cos, rel, axes=1) / dc
            ri = np.tensordot(col_cos, rel, axes=1) / dr
            ki = np.tensordot(_unit(step), rel, axes=1) / dz
            img = ndimage.map_coordinates(stack, [ki, ri, ci], order=1, cval=-1024.0)
        else:
            ipp = origin + k * step
            img = stack[int(k)]
        ds = base()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = numbers[m]
        ds.ImagePositionPatient = [_ds_str(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds_str(v) for v in (*p_row, *p_col)]
        ds.PixelSpacing = [_ds_str(p_dr), _ds_str(p_dc)]
        ds.SliceThickness = _ds_str(dz)
        ds.SliceLocation = _ds_str(float(ipp[2]))
        if modality == "CT":
            ds.GantryDetectorTilt = _ds_str(tilt_deg)
        ds.Rows, ds.Columns = img.shape
        if plane != "axial":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        _store(ds, img, "explicit" if enhanced else transfer_syntax)
        datasets.append(ds)

    written: list[Path] = []
    if enhanced:
        from highdicom.legacy import LegacyConvertedEnhancedCTImage

        for ds in datasets:
            _finish(ds, ExplicitVRLittleEndian)
        if transfer_syntax not in _ENHANCED_SYNTAXES:
            raise ValueError(
                f"enhanced=True supports transfer syntaxes {sorted(_ENHANCED_SYNTAXES)}, not {transfer_syntax!r}"
            )
        mf = LegacyConvertedEnhancedCTImage(
            datasets, series_instance_uid=series_uid, series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=1,
            transfer_syntax_uid=TRANSFER_SYNTAXES[transfer_syntax],
        )
        path = out / "ENHANCED.dcm"
        mf.save_as(path, enforce_file_format=True)
        written.append(path)
    else:
        for ds, name in zip(datasets, names):
            path = out / name
            _write(ds, path, transfer_syntax)
            written.append(path)
    if localizer:
        ds = base()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        if "RescaleType" in ds:
            del ds.RescaleType  # dciodvfy: not HU for ORIGINAL LOCALIZER images
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        proj = stack.mean(axis=1)[::-1]  # (z descending, columns): coronal projection
        ds.ImagePositionPatient = [_ds_str(v) for v in origin + (nz - 1) * step]
        ds.ImageOrientationPatient = [_ds_str(v) for v in (*row_cos, 0.0, 0.0, -1.0)]
        ds.PixelSpacing = [_ds_str(dz), _ds_str(dc)]
        ds.SliceThickness = _ds_str(dr * ny)
        ds.Rows, ds.Columns = proj.shape
        _store(ds, proj, "explicit")
        path = out / "LOCALIZER.dcm"
        _finish(ds, ExplicitVRLittleEndian)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m node.tools.synth_series --nifti ct.nii.gz --out dir ...``."""
    p = argparse.ArgumentParser(prog="python -m node.tools.synth_series", description=__doc__.split("\n")[0])
    p.add_argument("--nifti", required=True, help="input NIfTI volume in HU")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", help="ROWSxCOLSxSLICES, e.g. 512x512x400")
    p.add_argument("--tilt", type=float, default=0.0, help="gantry tilt in degrees")
    p.add_argument("--uneven", action="store_true", help="double a few slice gaps")
    p.add_argument("--gaps", help="slice gaps in mm repeated in turn, e.g. 4,1.08,7")
    p.add_argument("--position", default="HFS", choices=sorted(_POSITIONS), help="patient position")
    p.add_argument("--plane", default="axial", choices=["axial", "coronal", "sagittal"], help="primary plane")
    p.add_argument("--oblique", type=float, default=0.0, help="IOP rotated this many degrees off the plane")
    p.add_argument("--against-normal", action="store_true", help="InstanceNumber 1 = last slice along the normal")
    p.add_argument("--shuffle", action="store_true", help="shuffle files, reverse InstanceNumbers")
    p.add_argument("--localizer", action="store_true", help="add a LOCALIZER image")
    p.add_argument("--ts", default="explicit", choices=sorted(TRANSFER_SYNTAXES), help="transfer syntax")
    p.add_argument("--enhanced", action="store_true", help="write one Legacy Converted Enhanced CT object")
    p.add_argument("--modality", default="CT", choices=["CT", "MR"])
    p.add_argument("--series-description", default="synthetic CT")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    size = None
    if a.size:
        try:
            rows, cols, slices = (int(v) for v in a.size.lower().split("x"))  # ValueError unless three integers
            size = (rows, cols, slices)
        except ValueError:
            p.error(f"--size must look like 512x512x400, got {a.size!r}")
    if a.enhanced and a.ts not in _ENHANCED_SYNTAXES:
        p.error(f"--enhanced supports --ts {', '.join(sorted(_ENHANCED_SYNTAXES))}")
    gaps = None
    if a.gaps:
        try:
            gaps = [float(v) for v in a.gaps.split(",")]
        except ValueError:
            p.error(f"--gaps must be comma-separated millimetres, got {a.gaps!r}")
        if any(g <= 0 for g in gaps):
            p.error(f"--gaps must be positive, got {a.gaps!r}")
    if not Path(a.nifti).is_file():
        p.error(f"--nifti {a.nifti}: no such file")
    files = write_series(
        a.nifti, a.out, size=size, tilt_deg=a.tilt, uneven=a.uneven, gaps_mm=gaps,
        patient_position=a.position, plane=a.plane, oblique_deg=a.oblique, against_normal=a.against_normal, shuffle=a.shuffle,
        localizer=a.localizer, transfer_syntax=a.ts, enhanced=a.enhanced, modality=a.modality,
        series_description=a.series_description, seed=a.seed,
    )
    print(f"wrote {len(files)} file(s) ({a.ts}{', enhanced' if a.enhanced else ''}) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
