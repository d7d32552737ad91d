"""The overlay series: every source slice with the tissues burned in, for viewers without SEG.

Each source frame becomes one single-frame **Secondary Capture Image** (1.2.840.10008.5.1.4.1.1.7),
RGB, in the source study, in a series of its own.  Why SC: every PACS and viewer stores and shows
it, and it is what readers expect of an image that carries burned-in annotations; the colour
multi-frame SC IODs would put 400 slices into one object that many viewers page through as frames
rather than scroll with the CT.  Each slice carries the geometry of its source frame (Frame of
Reference, ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness as
standard extended attributes of the SC IOD, PatientOrientation as the IOD asks), so viewers that
link series by position scroll it in sync with the CT, and references its source image.

The picture: the slice in a soft-tissue window (the source's own first window when it has one),
each tissue in its profile colour as a translucent fill with a solid edge (``fill``) or as a solid
outline only (``outline``), a legend of the tissues, and a banner "NOT FOR DIAGNOSIS" across the
top.  Pixels are stored JPEG baseline (quality 90, 4:2:2, YBR_FULL_422) or uncompressed RGB; the
C-STORE sender decompresses for a peer that refuses JPEG.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

from node.durable import fsync_dir
from node.pipeline.outputs.common import (
    MANUFACTURER,
    FrameMasks,
    copy_patient_study,
    derived_uid,
    first_source,
    now_da_tm,
    series_number,
)
from node.pipeline.outputs.options import OverlayStyle
from node.pipeline.volume import Volume

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BANNER_TEXT = "NOT FOR DIAGNOSIS"
DEFAULT_STYLE = OverlayStyle()
DEFAULT_WINDOW = (40.0, 400.0)  #: (centre, width) HU: soft tissue


@dataclass(frozen=True)
class OverlayTissue:
    """One tissue drawn on the overlay."""

    name: str  #: the tissue (its mask in the :class:`FrameMasks`)
    color: tuple[int, int, int]  #: sRGB
    label: str = ""  #: in the legend; default the name

    @property
    def legend(self) -> str:
        return self.label or self.name


# --------------------------------------------------------------------------- pixels


def _window(src: Dataset, style: OverlayStyle) -> tuple[float, float]:
    if style.window is not None:
        return style.window
    try:
        c, w = src.get("WindowCenter"), src.get("WindowWidth")
        if c is not None and w is not None:
            c = float(c[0] if isinstance(c, (list, tuple)) or type(c).__name__ == "MultiValue" else c)
            w = float(w[0] if isinstance(w, (list, tuple)) or type(w).__name__ == "MultiValue" else w)
            if w > 1:
                return c, w
    except (TypeError, ValueError):
        pass
    return DEFAULT_WINDOW


def hu_on_frame(volume: Volume, n: int) -> np.ndarray:
    """The HU of source frame ``n`` (rows, columns): the volume's slice when the volume is on the
    source frames, else sampled from the volume at the frame's pixel centres (nearest voxel;
    -1024 outside), as :meth:`Volume.mask_on_frames` does for masks."""
    if not volume.resampled and len(volume.frames) == volume.shape[0]:
        return volume.array[n]
    fr = volume.frames[n]
    m = np.linalg.inv(volume.affine) @ fr.pixel_to_patient()
    jj, ii = np.mgrid[0 : fr.rows, 0 : fr.columns]
    ijk = np.rint(m[:3, 0, None] * ii.ravel() + m[:3, 1, None] * jj.ravel() + m[:3, 3, None]).astype(np.int64)
    nk, nj, ni = volume.shape
    ok = (ijk[0] >= 0) & (ijk[0] < ni) & (ijk[1] >= 0) & (ijk[1] < nj) & (ijk[2] >= 0) & (ijk[2] < nk)
    out = np.full(ii.size, -1024, dtype=volume.array.dtype)
    out[ok] = volume.array[ijk[2, ok], ijk[1, ok], ijk[0, ok]]
    return out.reshape(fr.rows, fr.columns)


class _Painter:
    """Renders slices: window, tissues, and the legend and banner (drawn once, pasted on each)."""

    def __init__(self, rows: int, cols: int, tissues: Sequence[OverlayTissue], style: OverlayStyle,
                 window: tuple[float, float], title: str) -> None:
        self.style = style
        self.colors = [np.array(t.color, dtype=np.float32) for t in tissues]
        c, w = window
        self.lo, self.scale = c - w / 2.0, 255.0 / w
        self._lut = self._window_lut()
        s = max(rows, cols) / 512.0  # text and lines scale with the matrix
        self.edge = max(1, round((2.0 if style.mode == "outline" else 1.0) * s))
        font, fs, th = cv2.FONT_HERSHEY_SIMPLEX, 0.5 * s, max(1, round(s))
        # banner: full width, dark red, white bold text
        bh = round(24 * s)
        self.banner = np.zeros((bh, cols, 3), np.uint8)
        self.banner[:] = (150, 0, 0)
        text = f"{BANNER_TEXT} - {title}" if title else BANNER_TEXT
        (tw, tht), _ = cv2.getTextSize(text, font, fs * 1.1, th + 1)
        if tw > cols - 8:
            text = BANNER_TEXT
            (tw, tht), _ = cv2.getTextSize(text, font, fs * 1.1, th + 1)
        cv2.putText(self.banner, text, (max(4, (cols - tw) // 2), (bh + tht) // 2), font, fs * 1.1,
                    (255, 255, 255), th + 1, cv2.LINE_AA)
        # legend: bottom left, a swatch and the name per tissue on a dark translucent box
        line = round(18 * s)
        sw = round(12 * s)
        names = [t.legend for t in tissues]
        width = max((cv2.getTextSize(n, font, fs, th)[0][0] for n in names), default=0) + sw + int(16 * s)
        height = line * len(names) + int(8 * s)
        self.legend = np.zeros((height, min(width, cols), 3), np.uint8)
        self.legend_alpha = np.full((height, min(width, cols), 1), 0.7, np.float32)
        for k, (n, t) in enumerate(zip(names, tissues)):
            y0 = int(4 * s) + k * line
            cv2.rectangle(self.legend, (int(4 * s), y0 + (line - sw) // 2),
                          (int(4 * s) + sw, y0 + (line - sw) // 2 + sw), tuple(int(v) for v in t.color), -1)
            cv2.putText(self.legend, n, (int(4 * s) + sw + int(6 * s), y0 + line - int(5 * s)), font, fs,
                        (255, 255, 255), th, cv2.LINE_AA)
            self.legend_alpha[y0: y0 + line, int(4 * s): int(4 * s) + sw + 1] = 1.0
        self.legend_at = (rows - height - int(6 * s), int(6 * s))
        self.kernel = np.ones((3, 3), np.uint8)
        self.layers = [np.full((rows, cols, 3), c.astype(np.uint8), np.uint8) for c in self.colors]  # colour images

    def gray(self, hu: np.ndarray) -> np.ndarray:
        """The slice in the window, 0..255."""
        if hu.dtype == np.int16:  # a lookup table over every int16 value: one gather per pixel
            return self._lut[hu.view(np.uint16) ^ 0x8000]
        g = (hu.astype(np.float32) - self.lo) * self.scale
        return np.clip(g, 0, 255, out=g).astype(np.uint8)

    def _window_lut(self) -> np.ndarray:
        # index = int16 value + 32768 (the sign bit flipped)
        values = np.arange(-32768, 32768, dtype=np.float32)
        g = np.clip((values - self.lo) * self.scale, 0, 255)
        return g.astype(np.uint8)

    def render(self, hu: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
        """RGB ``(rows, columns, 3)`` uint8 of one slice with ``masks`` (bool, one per tissue)."""
        rgb = cv2.cvtColor(self.gray(hu), cv2.COLOR_GRAY2RGB)
        a = float(self.style.opacity)
        # whole-image OpenCV operations with a mask: ~5x faster than numpy boolean indexing
        for mask, layer in zip(masks, self.layers):
            m8 = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
            if not cv2.countNonZero(m8):
                continue
            if self.style.mode == "fill":
                cv2.copyTo(cv2.addWeighted(rgb, 1.0 - a, layer, a, 0.0), m8, rgb)
            edge = cv2.subtract(m8, cv2.erode(m8, self.kernel, iterations=self.edge))
            cv2.copyTo(layer, edge, rgb)
        bh = self.banner.shape[0]
        rgb[:bh] = self.banner
        y, x = self.legend_at
        h, w = self.legend.shape[:2]
        if y >= bh and x + w <= rgb.shape[1]:
            part = rgb[y: y + h, x: x + w].astype(np.float32)
            rgb[y: y + h, x: x + w] = (part + (self.legend - part) * self.legend_alpha + 0.5).astype(np.uint8)
        return rgb

    def reserved(self, rows: int, cols: int) -> np.ndarray:
        """Where the banner and legend are drawn (bool, rows x columns): no tissue shows there."""
        out = np.zeros((rows, cols), bool)
        out[: self.banner.shape[0]] = True
        y, x = self.legend_at
        h, w = self.legend.shape[:2]
        out[y: y + h, x: x + w] = True
        return out


# --------------------------------------------------------------------------- objects


def _orientation_letters(v: np.ndarray) -> str:
    """DICOM PatientOrientation letters of a direction (LPS), main axis first (up to 2)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    out = ""
    for axis in np.argsort(-np.abs(v))[:2]:
        if abs(v[axis]) > 0.25:
            out += letters[axis][0 if v[axis] > 0 else 1] if axis < 2 else letters[2][0 if v[axis] > 0 else 1]
    return out or "L"


def _slice_dataset(src_frame_ds: Dataset, template: Dataset, n: int, frame_index: int, volume: Volume,
                   series_uid: str, rgb: np.ndarray, style: OverlayStyle) -> Dataset:
    fr = volume.frames[frame_index]
    ds = Dataset()
    for elem in template:
        ds.add(elem)  # shared: patient, study, series, equipment (elements are not modified per slice)
    sop_uid = derived_uid(series_uid, "overlay", fr.sop_instance_uid, str(fr.frame_number or 0))
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = n
    ds.PatientOrientation = [_orientation_letters(fr.orientation[:3]), _orientation_letters(fr.orientation[3:])]
    ds.ImagePositionPatient = [float(f"{v:.6f}") for v in fr.position]
    ds.ImageOrientationPatient = [float(f"{v:.8f}") for v in fr.orientation]
    ds.PixelSpacing = [float(fr.pixel_spacing[0]), float(fr.pixel_spacing[1])]
    for kw in ("SliceThickness", "SliceLocation", "AcquisitionNumber"):
        if kw in src_frame_ds and src_frame_ds[kw].value not in (None, ""):
            setattr(ds, kw, src_frame_ds[kw].value)
    ref = Dataset()
    ref.ReferencedSOPClassUID = src_frame_ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = fr.sop_instance_uid
    if fr.frame_number is not None:
        ref.ReferencedFrameNumber = int(fr.frame_number)
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    ref.PurposeOfReferenceCodeSequence = [purpose]
    ds.SourceImageSequence = [ref]
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    if style.jpeg:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [
            cv2.IMWRITE_JPEG_QUALITY, int(style.jpeg_quality),
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
        ])
        if not ok:
            raise RuntimeError("JPEG encoding of an overlay slice failed")
        data = buf.tobytes()
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = round(rgb.nbytes / max(1, len(data)), 2)
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = np.ascontiguousarray(rgb).tobytes()
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def overlay_series_description(template: str, fields: Mapping[str, object]) -> str:
    """``template`` with ``{profile}``, ``{SeriesDescription}``, ``{SeriesNumber}``, ``{mode}`` filled
    (unknown fields left as they are), cut to 64 characters."""

    class _Keep(dict[str, object]):
        def __missing__(self, key: str) -> str:
            return "{" + key + "}"

    return " ".join(template.format_map(_Keep(fields)).split())[:64]


def write_overlay_series(
    volume: Volume,
    frame_masks: FrameMasks,
    tissues: Sequence[OverlayTissue],
    out_dir: Path,
    *,
    pixels: Volume | None = None,
    style: OverlayStyle = DEFAULT_STYLE,
    series_instance_uid: str | None = None,
    series_description: str = "OVERLAY {profile} {SeriesDescription}",
    profile_name: str = "",
    software_version: str = "",
    workers: int = 2,
) -> list[Path]:
    """Write the overlay series into the folder ``out_dir`` (replaced whole, atomically).

    Args:
        volume: the volume the masks were made on (source headers and frames).
        frame_masks: the tissue masks on the source frames (:class:`FrameMasks`), by tissue name.
        tissues: what to draw, in legend order; names must be in ``frame_masks``.
        pixels: the volume on the source frames (the native one when the masks were made on a
            coarser working grid); default ``volume``.
        style: fill or outline, opacity, window, JPEG.
        series_instance_uid: the overlay series (a new UID when not given); instance UIDs are
            derived from it and the source frame.
        series_description: template, see :func:`overlay_series_description`.

    Returns:
        The files, in source frame order (``<out_dir>/<nnnn>.dcm``).
    """
    src0 = first_source(volume)
    by_uid = {str(d.SOPInstanceUID): d for d in volume.info.source_datasets}
    pix = pixels if pixels is not None else volume
    if len(pix.frames) != len(volume.frames):
        raise ValueError("pixels volume has other source frames than the masks' volume")
    fr0 = volume.frames[0]
    series_uid = series_instance_uid or derived_uid()
    painter = _Painter(fr0.rows, fr0.columns, tissues, style, _window(src0, style), profile_name)
    masks = [frame_masks.get(t.name) for t in tissues]

    template = Dataset()
    copy_patient_study(src0, template)
    template.SOPClassUID = SECONDARY_CAPTURE
    template.Modality = "OT"
    for kw in ("BodyPartExamined", "Laterality"):
        if src0.get(kw):
            setattr(template, kw, src0.get(kw))
    # Laterality (Type 2C) is needed unless the image says its laterality: a CT series is not
    # of one side, so the overlay says "unpaired" unless the source names a side
    template.ImageLaterality = str(src0.get("Laterality") or src0.get("ImageLaterality") or "U")
    template.SeriesInstanceUID = series_uid
    template.SeriesNumber = series_number(volume, 700)
    template.SeriesDescription = overlay_series_description(series_description, {
        "profile": profile_name, "SeriesDescription": volume.info.series_description or "",
        "SeriesNumber": volume.info.series_number or "", "mode": style.mode,
    })
    if volume.info.frame_of_reference_uid:
        template.FrameOfReferenceUID = volume.info.frame_of_reference_uid
        template.PositionReferenceIndicator = src0.get("PositionReferenceIndicator", "") or ""
    template.Manufacturer = MANUFACTURER
    template.ConversionType = "WSD"
    template.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    template.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
    template.SecondaryCaptureDeviceSoftwareVersions = software_version or "0"
    template.SoftwareVersions = software_version or "0"
    template.ImageType = ["DERIVED", "SECONDARY"]
    template.DerivationDescription = (f"{profile_name} tissues burned in ({style.mode}) over the source slice; "
                                      f"{BANNER_TEXT}")[:1024]
    template.BurnedInAnnotation = "YES"
    template.RecognizableVisualFeatures = "NO"
    template.ContentDate, template.ContentTime = now_da_tm()
    template.SpecificCharacterSet = src0.get("SpecificCharacterSet", "ISO_IR 100") or "ISO_IR 100"

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def one(n: int) -> Path:
        fr = volume.frames[n]
        rgb = painter.render(hu_on_frame(pix, n), [m[n] for m in masks])
        ds = _slice_dataset(by_uid.get(fr.sop_instance_uid, src0), template, n + 1, n, volume, series_uid, rgb,
                            style)
        path = tmp / f"{n + 1:04d}.dcm"
        with open(path, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        return path

    try:
        # rendering and JPEG coding release the GIL: two threads fill two cores
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="overlay") as pool:
            names = [p.name for p in pool.map(one, range(len(volume.frames)))]
        fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / n for n in names]


def read_overlay_rgb(path: str | Path) -> np.ndarray:
    """The RGB pixels of one overlay slice, decoded (``(rows, columns, 3)`` uint8; pydicom converts
    JPEG's YBR to RGB)."""
    return np.asarray(pydicom.dcmread(path).pixel_array, dtype=np.uint8)
