"""Up-front checks of the values the pipeline (and the SEG it writes) will read from a series' headers.

Run before anything is decoded or allocated, so that bad input fails at once as a
:class:`SeriesError` naming the file and the tag, instead of failing late (writing the SEG, after
segmentation) or as a transient error (an allocation for 65535 x 65535 pixels):

* numbers (DS/IS) the pipeline or the SEG parse: spacing, thickness, position, orientation,
  rescale, image size;
* the image size against the pixel bytes the file can hold (uncompressed transfer syntaxes), and
  a ceiling on Rows and Columns.

Dates, times and names are not checked here: the pipeline computes nothing from them, and the
SEG's Patient and Study modules are made conformant from whatever the source holds
(:mod:`node.pipeline.conform`: an invalid value is left out and the repair logged), so a
malformed birth date does not stop a segmentation; share paths sanitise every field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pydicom.dataset import Dataset

from node.errors import SeriesError

__all__ = ["validate_headers", "MAX_SIDE"]

#: larger Rows or Columns is not a CT image (and would allocate gigabytes)
MAX_SIDE = 16384

_NUMBERS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "NumberOfFrames",
            "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImagePositionPatient",
            "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept", "InstanceNumber", "SeriesNumber")
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _raw(ds: Dataset, kw: str) -> str:
    """The element's value as text, without converting it (a bad number must not raise here)."""
    try:
        elem = ds.get_item(kw)
    except (KeyError, ValueError):
        return ""
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    return str(value or "").strip()


def _number_problem(ds: Dataset, kw: str) -> str | None:
    try:
        value: Any = ds.get(kw)
        items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in items:
            if v is None or v == "":
                continue
            f = float(v)
            if f != f or f in (float("inf"), float("-inf")):
                raise ValueError("not finite")
    except (ValueError, TypeError, OverflowError):
        shown = _raw(ds, kw)
        return f"{shown[:40]!r} is not a number"
    return None


def validate_headers(headers: Sequence[tuple[Path, Dataset]]) -> None:
    """Raise :class:`SeriesError` (file and tag) for the first value the pipeline could not use."""
    for path, ds in headers:
        for kw in _NUMBERS:
            if kw in ds:
                problem = _number_problem(ds, kw)
                if problem:
                    raise SeriesError(problem, path=path, tag=kw)
        _check_size(path, ds)


def _check_size(path: Path, ds: Dataset) -> None:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        return  # image_frames names what is missing
    rows, cols = int(rows), int(cols)
    for kw, n in (("Rows", rows), ("Columns", cols)):
        if not 1 <= n <= MAX_SIDE:
            raise SeriesError(f"{n} is not an image size this node processes (1..{MAX_SIDE})", path=path, tag=kw)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts not in _NATIVE:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    need = (rows * cols * frames * spp * bits + 7) // 8
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size < need:
        raise SeriesError(
            f"Rows {rows} x Columns {cols} x frames {frames} x SamplesPerPixel {spp} x BitsAllocated {bits} need "
            f"{need} bytes of pixel data, the file has {size} bytes in all: truncated or a wrong image size",
            path=path, tag="PixelData",
        )
