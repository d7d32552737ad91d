"""One file's DICOM header, parsed once up to the pixel data, with the location of its
uncompressed 16-bit pixels where reading them straight from the file gives exactly pydicom's
``pixel_array`` (see ``tests/test_series_native.py``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from node.logsafe import log_context


#: Native syntaxes whose PixelData value lies in the file unchanged (not deflated): a frame
#: of these is read straight from its offset (see :func:`_raw_pixels`), not via pydicom.
_RAW_SYNTAXES = {
    "1.2.840.10008.1.2": (True, True),  # (implicit VR, little endian)
    "1.2.840.10008.1.2.1": (False, True),
    "1.2.840.10008.1.2.2": (False, False),
}


@dataclass(frozen=True)
class RawPixels:
    """Where a file's uncompressed 16-bit PixelData lies and how pydicom interprets it.

    Only built when reading the bytes directly is exactly what ``pixel_array`` returns
    (one sample, MONOCHROME, BitsAllocated 16, defined length of exactly
    NumberOfFrames x Rows x Columns x 2 bytes); anything else is decoded by pydicom.
    """

    offset: int  # file offset of the first byte of the PixelData value
    dtype: str  # numpy dtype with the file's byte order, e.g. "<i2", ">u2"
    shift: int  # BitsAllocated - BitsStored: pydicom's unused-bit correction


@dataclass(frozen=True)
class Header:
    """A file's header (no pixel data), its raw pixel location, and the file's stat when read."""

    ds: Dataset
    raw: RawPixels | None
    stat: tuple[int, int, int]  # (st_ino, st_size, st_mtime_ns): reused only for the same file

    def fresh(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_ino, st.st_size, st.st_mtime_ns) == self.stat


def _raw_pixels(fh: Any, ds: Dataset) -> RawPixels | None:
    """Locate the PixelData value at ``fh``'s position (just after a ``stop_before_pixels`` read).

    Returns None whenever pydicom should decode the frame itself: another transfer
    syntax or pixel layout, another pixel data element, an undefined or unexpected length.
    """
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    encoding = _RAW_SYNTAXES.get(ts)
    # pydicom may have detected an encoding other than the declared one: leave that to it
    if encoding is None or tuple(ds.original_encoding) != encoding:
        return None
    implicit, little = encoding
    if (
        ds.get("SamplesPerPixel") != 1
        or ds.get("BitsAllocated") != 16
        or ds.get("PixelRepresentation") not in (0, 1)
        or str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    bits_stored = ds.get("BitsStored")
    if not isinstance(bits_stored, int) or not 1 <= bits_stored <= 16:
        return None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1 or nframes < 1:
        return None
    order = "<" if little else ">"
    head = fh.read(8)
    if len(head) != 8 or struct.unpack(order + "HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if implicit:
        (length,) = struct.unpack(order + "L", head[4:])
    else:
        if head[4:6] not in (b"OW", b"OB"):
            return None
        more = fh.read(4)
        if len(more) != 4:
            return None
        (length,) = struct.unpack(order + "L", more)
    if length != nframes * rows * cols * 2:  # also rules out undefined length (encapsulated)
        return None
    return RawPixels(offset=fh.tell(), dtype=order + "ui"[ds.PixelRepresentation] + "2", shift=16 - bits_stored)


def read_header(path: Path) -> Header:
    """Parse a file's header up to the pixel data (as ``stop_before_pixels``) and locate its pixels."""
    with open(path, "rb") as fh, log_context(str(path)):  # pydicom's warnings name no file
        st = os.fstat(fh.fileno())
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=False)
        try:
            raw = _raw_pixels(fh, ds)
        except Exception:  # noqa: BLE001 - malformed values: pydicom's decoder will report them
            raw = None
    return Header(ds, raw, (st.st_ino, st.st_size, st.st_mtime_ns))
