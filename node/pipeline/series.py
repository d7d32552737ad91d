"""DICOM series -> :class:`~node.pipeline.volume.Volume`.

* :func:`find_series` reads headers only and groups files by SeriesInstanceUID.
* :func:`load_series` turns the files of ONE series into a HU volume on a regular
  grid, with the affine in DICOM LPS (see ``node.pipeline.volume`` for the
  conventions) and the original frames for mapping masks back.

Geometry is taken from ImagePositionPatient / ImageOrientationPatient /
PixelSpacing only: frames are sorted by their position along the slice normal
``cross(row_cos, col_cos)``; SliceThickness, InstanceNumber, SliceLocation and
GantryDetectorTilt are never used for geometry.  Gantry tilt (position steps not
parallel to the normal) and uneven slice spacing are resampled the way dcm2niix
does it: every slice is shifted in-plane onto an orthogonal grid whose third axis
is the slice normal, then the stack is linearly interpolated along the normal onto
the median gap.  ``Volume.resampled`` is then True and ``Volume.frames`` keeps the
original frames so :meth:`Volume.mask_on_frames` can map a mask back.

Compressed pixel data are decoded in a process pool (chunks of frames per task,
each worker returns the rescaled slices, consumed in order so that little more
than the output volume is held); native (uncompressed) data, and series with fewer
than :data:`PARALLEL_MIN_FRAMES` compressed frames, are decoded in process.  Each file's
header is parsed once: its parse also locates uncompressed 16-bit MONOCHROME pixel data,
which is then read straight from the file (``np.fromfile`` at its offset, with pydicom's
byte order and unused-bit rules; bit-identical to ``pixel_array``, see
``tests/test_series_native.py``) instead of parsing the file again; anything else goes
through pydicom.  :func:`find_series` can hand the headers it parsed to
:func:`load_series` (``header_cache``).  The
volume is int16 when every RescaleSlope/Intercept is integral and the HU fit, else
float32.  Resampling along the normal (uneven spacing) briefly holds the input and
the output stack; the tilt correction works in place.  Every problem with the input is raised as :class:`SeriesError` naming the
file and, where there is one, the tag.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, generate_uid

from node.errors import SeriesError
from node.pipeline.volume import SeriesInfo, SourceFrame, Volume

log = logging.getLogger(__name__)

__all__ = ["find_series", "load_series"]

#: Transfer syntaxes read in-process (no codec needed).
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
}

#: Native syntaxes whose PixelData value lies in the file unchanged (not deflated): a frame
#: of these is read straight from its offset (see :func:`_raw_pixels`), not via pydicom.
_RAW_SYNTAXES = {
    "1.2.840.10008.1.2": (True, True),  # (implicit VR, little endian)
    "1.2.840.10008.1.2.1": (False, True),
    "1.2.840.10008.1.2.2": (False, False),
}


@dataclass(frozen=True)
class _RawPixels:
    """Where a file's uncompressed 16-bit PixelData lies and how pydicom interprets it.

    Only built when reading the bytes directly is exactly what ``pixel_array`` returns
    (one sample, MONOCHROME, BitsAllocated 16, defined length of exactly
    NumberOfFrames x Rows x Columns x 2 bytes); anything else is decoded by pydicom.
    """

    offset: int  # file offset of the first byte of the PixelData value
    dtype: str  # numpy dtype with the file's byte order, e.g. "<i2", ">u2"
    shift: int  # BitsAllocated - BitsStored: pydicom's unused-bit correction


@dataclass(frozen=True)
class _Header:
    """A file's header (no pixel data), its raw pixel location, and the file's stat when read."""

    ds: Dataset
    raw: _RawPixels | None
    stat: tuple[int, int, int]  # (st_ino, st_size, st_mtime_ns): reused only for the same file

    def fresh(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_ino, st.st_size, st.st_mtime_ns) == self.stat


#: Multi-frame CT SOP classes whose geometry lives in the functional groups.
ENHANCED_CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}

_IDENTITY_TAGS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
_NO_CONTRAST = {"", "NONE", "NO", "N", "NIL", "0", "FALSE", "WITHOUT", "NATIVE", "PLAIN", "NON"}

#: Fewer compressed frames than this are decoded in process (a pool costs ~0.5 s to start).
PARALLEL_MIN_FRAMES = 32

# geometry tolerances
_ORIENT_TOL = 1e-3  # on direction cosines
_MIN_GAP_MM = 0.01
_REL_GAP = 0.01


# --------------------------------------------------------------------------- finding


def _iter_files(inputs: Sequence[str | Path]) -> Iterable[Path]:
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    yield Path(root) / name
        elif p.is_file():
            yield p
        else:
            log.warning("%s: no such file or folder, skipped", p)


def _raw_pixels(fh: Any, ds: Dataset) -> _RawPixels | None:
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
    return _RawPixels(offset=fh.tell(), dtype=order + "ui"[ds.PixelRepresentation] + "2", shift=16 - bits_stored)


def _read_header(path: Path) -> _Header:
    """Parse a file's header up to the pixel data (as ``stop_before_pixels``) and locate its pixels."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=False)
        try:
            raw = _raw_pixels(fh, ds)
        except Exception:  # noqa: BLE001 - malformed values: pydicom's decoder will report them
            raw = None
    return _Header(ds, raw, (st.st_ino, st.st_size, st.st_mtime_ns))


def find_series(
    inputs: Sequence[str | Path], *, header_cache: dict[Path, Any] | None = None
) -> dict[str, list[Path]]:
    """Group DICOM image files by SeriesInstanceUID, reading headers only.

    Args:
        inputs: files and/or folders (walked recursively).
        header_cache: if given, filled with ``{path: parsed header}`` for every grouped
            file; pass it on to :func:`load_series` (``header_cache=``) so that it does not
            parse the files a second time.

    Returns:
        ``{SeriesInstanceUID: [files]}``; files whose SeriesInstanceUID is missing or
        empty are grouped under ``""`` (the caller decides what to do with them).
        Non-DICOM files and DICOMDIR files are skipped with a logged warning.
    """
    groups: dict[str, list[Path]] = {}
    for path in _iter_files(inputs):
        try:
            hdr = _read_header(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises assorted errors on broken files
            log.warning("%s: not a readable DICOM file, skipped (%s)", path, exc)
            continue
        ds = hdr.ds
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
        if sop_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
            log.warning("%s: DICOMDIR, skipped", path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        groups.setdefault(uid, []).append(path)
        if header_cache is not None:
            header_cache[path] = hdr
    return groups


# --------------------------------------------------------------------------- frames


@dataclass
class _Frame:
    path: Path
    frame_number: int | None  # 1-based inside a multi-frame object
    header: Dataset
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    ts: str
    localizer: bool = False
    raw: _RawPixels | None = None  # set when the frame can be read straight from the file

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])

    def label(self) -> str:
        return f"{self.path}" + (f" frame {self.frame_number}" if self.frame_number else "")


def _floats(value: Any, n: int, path: Path, tag: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"unreadable value {value!r} ({exc})", path=path, tag=tag) from None
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise SeriesError(f"expected {n} numbers, got {value!r}", path=path, tag=tag)
    return arr


def _lookup(groups: list[Dataset | None], seq: str, tag: str) -> Any:
    for g in groups:
        if g is None:
            continue
        s = g.get(seq)
        if s and len(s) and tag in s[0] and s[0][tag].value not in (None, ""):
            return s[0][tag].value
    return None


def _rescale(value: Any, default: float, path: Path, tag: str) -> float:
    if value is None or value == "":
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SeriesError(f"unreadable value {value!r}", path=path, tag=tag) from None
    if not np.isfinite(v):
        raise SeriesError(f"not a finite number: {value!r}", path=path, tag=tag)
    return v


def _is_localizer(ds: Dataset) -> bool:
    it = ds.get("ImageType")
    if it is None:
        return False
    values = [it] if isinstance(it, str) else list(it)
    return "LOCALIZER" in [str(v).strip().upper() for v in values]


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    for tag in ("Rows", "Columns"):
        if tag not in ds or ds[tag].value in (None, ""):
            raise SeriesError("missing (not an image?)", path=path, tag=tag)
    rows, cols = int(ds.Rows), int(ds.Columns)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if str(ds.get("SOPClassUID", "")) in ENHANCED_CT_CLASSES or "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence")
        shared0 = shared[0] if shared else None
        per = ds.get("PerFrameFunctionalGroupsSequence")
        if per is not None and len(per) != nframes:
            raise SeriesError(
                f"{len(per)} items for {nframes} frames", path=path, tag="PerFrameFunctionalGroupsSequence"
            )
        out = []
        for i in range(nframes):
            groups = [per[i] if per else None, shared0]
            ipp = _lookup(groups, "PlanePositionSequence", "ImagePositionPatient")
            iop = _lookup(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _lookup(groups, "PixelMeasuresSequence", "PixelSpacing")
            for tag, val in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop), ("PixelSpacing", ps)):
                if val is None:
                    raise SeriesError(f"missing for frame {i + 1} (functional groups)", path=path, tag=tag)
            slope = _lookup(groups, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _lookup(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            ftype = _lookup(groups, "CTImageFrameTypeSequence", "FrameType")
            loc = ftype is not None and "LOCALIZER" in [str(v).upper() for v in ftype]
            out.append(
                _Frame(
                    path, i + 1, ds,
                    _floats(ipp, 3, path, "ImagePositionPatient"),
                    _floats(iop, 6, path, "ImageOrientationPatient"),
                    tuple(_floats(ps, 2, path, "PixelSpacing")),
                    rows, cols,
                    _rescale(slope if slope is not None else ds.get("RescaleSlope"), 1.0, path, "RescaleSlope"),
                    _rescale(inter if inter is not None else ds.get("RescaleIntercept"), 0.0, path, "RescaleIntercept"),
                    ts, loc or _is_localizer(ds),
                )
            )
        return out
    if nframes != 1:
        raise SeriesError(f"{nframes} frames without per-frame geometry", path=path, tag="NumberOfFrames")
    localizer = _is_localizer(ds)
    vals: dict[str, Any] = {}
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        v = ds.get(tag)
        if v is None or v == "" or (hasattr(v, "__len__") and len(v) == 0):
            if localizer:  # a localizer may lack geometry; it is dropped anyway
                vals[tag] = None
                continue
            raise SeriesError("missing", path=path, tag=tag)
        vals[tag] = v
    if localizer and any(v is None for v in vals.values()):
        return [_Frame(path, None, ds, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), (1.0, 1.0), rows, cols, 1.0, 0.0, ts, True)]
    return [
        _Frame(
            path, None, ds,
            _floats(vals["ImagePositionPatient"], 3, path, "ImagePositionPatient"),
            _floats(vals["ImageOrientationPatient"], 6, path, "ImageOrientationPatient"),
            tuple(_floats(vals["PixelSpacing"], 2, path, "PixelSpacing")),
            rows, cols,
            _rescale(ds.get("RescaleSlope"), 1.0, path, "RescaleSlope"),
            _rescale(ds.get("RescaleIntercept"), 0.0, path, "RescaleIntercept"),
            ts, localizer,
        )
    ]


# --------------------------------------------------------------------------- decoding


def _ts_name(ts: str) -> str:
    try:
        name = UID(ts).name
    except Exception:  # noqa: BLE001 - a name for a message only
        name = ""
    return f"{name} ({ts})" if name and name != ts else (ts or "unknown transfer syntax")


def _read_raw_frame(path: str, raw: _RawPixels, index: int, rows: int, cols: int) -> np.ndarray | None:
    """Frame ``index`` (0-based) read straight from the file: exactly pydicom's ``pixel_array``.

    Returns None when the file holds fewer bytes than announced (pydicom then reports it).
    """
    count = rows * cols
    try:
        arr = np.fromfile(path, dtype=raw.dtype, count=count, offset=raw.offset + index * count * 2)
    except (OSError, ValueError):
        return None
    if arr.size != count:
        return None
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(rows, cols)
    if raw.shift:
        # pydicom's unused-bit correction: the bits above BitsStored are ignored, i.e. masked
        # off (unsigned) or replaced by the sign bit (signed, arithmetic shift)
        np.left_shift(arr, raw.shift, out=arr)
        np.right_shift(arr, raw.shift, out=arr)
    return arr


def _decode_frame(
    path: str,
    frame_number: int | None,
    rows: int,
    cols: int,
    cache: dict[str, Dataset] | None = None,
    raw: _RawPixels | None = None,
) -> np.ndarray:
    if raw is not None:
        arr = _read_raw_frame(path, raw, (frame_number or 1) - 1, rows, cols)
        if arr is not None:
            return arr
    if frame_number is None:
        ds = pydicom.dcmread(path, force=False)
        arr = ds.pixel_array
    else:
        # a multi-frame object is parsed once per chunk, then decoded frame by frame
        cache = {} if cache is None else cache
        if path not in cache:
            cache.clear()
            cache[path] = pydicom.dcmread(path, force=False)
        arr = pydicom.pixels.pixel_array(cache[path], index=frame_number - 1)
    if arr.shape != (rows, cols):
        raise ValueError(f"decoded shape {arr.shape} != Rows x Columns ({rows}, {cols})")
    return arr


_Item = tuple[str, "int | None", int, int, float, float, bool, str, "_RawPixels | None"]


class _DecodeFailure(Exception):
    def __init__(self, where: str, ts: str, message: str) -> None:
        super().__init__(where, ts, message)


def _decode_raw_iter(items: list[_Item]) -> Iterable[np.ndarray]:
    """Decode frames one at a time, not rescaled (raises _DecodeFailure)."""
    cache: dict[str, Dataset] = {}
    for path, fn, rows, cols, _slope, _inter, _as_int, ts, loc in items:
        try:
            raw = _decode_frame(path, fn, rows, cols, cache, loc)
        except Exception as exc:  # noqa: BLE001 - any codec failure becomes a SeriesError in the parent
            where = path + (f" frame {fn}" if fn else "")
            raise _DecodeFailure(where, ts, f"{type(exc).__name__}: {exc}") from None
        yield raw


def _decode_iter(items: list[_Item]) -> Iterable[np.ndarray]:
    """Decode and rescale frames one at a time (raises _DecodeFailure)."""
    for item, raw in zip(items, _decode_raw_iter(items)):
        yield _apply_rescale(raw, item[4], item[5], item[6])


def _decode_chunk(items: list[_Item]) -> list[np.ndarray] | tuple[str, str, str]:
    """Worker entry point: the rescaled slices, or (where, ts, message) on failure."""
    try:
        return list(_decode_iter(items))
    except _DecodeFailure as exc:
        return exc.args


def _apply_rescale(raw: np.ndarray, slope: float, inter: float, as_int: bool) -> np.ndarray:
    if as_int:
        # int64: a 16-bit value times an int32-sized slope plus an int32-sized intercept
        # (what as_int admits) cannot overflow, so no value wraps around silently
        hu = raw.astype(np.int64)
        if slope != 1:
            hu *= int(slope)
        if inter != 0:
            hu += int(inter)
        if hu.size and hu.min() >= -32768 and hu.max() <= 32767:
            return hu.astype(np.int16)  # halves what travels back from a worker
        return hu.astype(np.float32)  # beyond int16: the volume becomes float32 anyway
    return (raw.astype(np.float64) * slope + inter).astype(np.float32)


def _rescale_into(out: np.ndarray, raw: np.ndarray, slope: float, inter: float) -> bool:
    """Write ``raw * slope + inter`` (integral slope/intercept) into the int16 slice ``out``.

    Exactly what :func:`_apply_rescale` returns, without its three full-size temporaries;
    returns False, writing nothing, when the HU do not fit int16 (or an int32 product
    could overflow), so that the caller takes the general path.
    """
    if raw.dtype.kind not in "ui" or raw.dtype.itemsize > 2 or raw.shape != out.shape:
        return False
    s, b = int(slope), int(inter)
    lo, hi = int(raw.min()), int(raw.max())
    ends = (lo * s + b, hi * s + b)
    if min(ends) < -32768 or max(ends) > 32767 or max(abs(lo * s), abs(hi * s), abs(b)) >= 2**31:
        return False
    # int32 arithmetic as in _apply_rescale; every value fits int16, so the cast is exact
    prod = raw if s == 1 else np.multiply(raw, np.int32(s), dtype=np.int32)
    np.add(prod, np.int32(b), out=out, dtype=np.int32, casting="unsafe")
    return True


def _decode_error(where: str, ts: str, message: str) -> SeriesError:
    return SeriesError(f"cannot decode pixel data ({_ts_name(ts)}): {message}", tag="PixelData", path=where)


def _decode_all(
    frames: list[_Frame], workers: int, as_int: bool
) -> np.ndarray:
    """Decode every frame into one (n, rows, cols) array (int16 when possible, else float32)."""
    n, rows, cols = len(frames), frames[0].rows, frames[0].cols
    dtype = np.int16 if as_int else np.float32
    vol = np.empty((n, rows, cols), dtype=dtype)
    items = [(str(f.path), f.frame_number, f.rows, f.cols, f.slope, f.intercept, as_int, f.ts, f.raw) for f in frames]

    def put(k: int, sl: np.ndarray) -> None:
        nonlocal vol
        if vol.dtype == np.int16 and (sl.min() < -32768 or sl.max() > 32767):
            log.info("HU range exceeds int16, volume stored as float32")
            vol = vol.astype(np.float32)
        vol[k] = sl

    compressed = [i for i, f in enumerate(frames) if f.ts not in NATIVE_SYNTAXES]
    native = [i for i, f in enumerate(frames) if f.ts in NATIVE_SYNTAXES]
    in_process = native if (workers > 1 and len(compressed) >= max(2, PARALLEL_MIN_FRAMES)) else native + compressed
    try:
        for i, raw in zip(in_process, _decode_raw_iter([items[i] for i in in_process])):
            f = frames[i]
            if not (vol.dtype == np.int16 and _rescale_into(vol[i], raw, f.slope, f.intercept)):
                put(i, _apply_rescale(raw, f.slope, f.intercept, as_int))
    except _DecodeFailure as exc:
        raise _decode_error(*exc.args) from None
    if len(in_process) == n:
        return vol
    # small chunks, consumed in order as they arrive (pool.map drops each result once
    # yielded), so that little more than the output volume is held at any time
    nchunks = min(len(compressed), workers * 8)
    chunks = [c.tolist() for c in np.array_split(np.array(compressed), nchunks) if len(c)]
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        results = pool.map(_decode_chunk, [[items[i] for i in chunk] for chunk in chunks])
        for chunk in chunks:
            try:
                res = next(results)
            except Exception as exc:  # noqa: BLE001 - a worker died (e.g. a codec crashed)
                first = frames[chunk[0]]
                pool.shutdown(wait=False, cancel_futures=True)
                raise _decode_error(str(first.path), first.ts, f"decoder process failed: {exc}") from None
            if isinstance(res, tuple):
                pool.shutdown(wait=False, cancel_futures=True)
                raise _decode_error(*res)
            for i, sl in zip(chunk, res):
                put(i, sl)
            del res
    return vol


# --------------------------------------------------------------------------- identity


def _empty(ds: Dataset, tag: str) -> bool:
    v = ds.get(tag)
    return v is None or str(v).strip() == ""


def _check_identity(
    headers: list[tuple[Path, Dataset]], fill: bool, warnings: list[str]
) -> None:
    missing: dict[str, list[Path]] = {}
    for path, ds in headers:
        for tag in _IDENTITY_TAGS:
            if _empty(ds, tag):
                missing.setdefault(tag, []).append(path)
    if not missing:
        return
    tags = [t for t in _IDENTITY_TAGS if t in missing]
    first = missing[tags[0]][0]
    nfiles = len({p for t in tags for p in missing[t]})
    verb = "is" if len(tags) == 1 else "are"
    if not fill:
        raise SeriesError(
            f"{', '.join(tags)} {verb} empty in {nfiles} of {len(headers)} file(s); "
            "refusing to invent identities (fill_missing_uids=True is an offline-only opt-in)",
            path=first, tag=tags[0],
        )
    study_uid = generate_uid() if "StudyInstanceUID" in missing else None
    series_uid = generate_uid() if "SeriesInstanceUID" in missing else None
    for path, ds in headers:
        meta = getattr(ds, "file_meta", None)
        if _empty(ds, "SOPClassUID"):
            v = meta.get("MediaStorageSOPClassUID") if meta is not None else None
            if not v:
                raise SeriesError("empty, and the file meta header has no MediaStorageSOPClassUID", path=path, tag="SOPClassUID")
            ds.SOPClassUID = v
        if _empty(ds, "SOPInstanceUID"):
            v = meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
            ds.SOPInstanceUID = v if v else generate_uid()
        if _empty(ds, "StudyInstanceUID"):
            ds.StudyInstanceUID = study_uid
        if _empty(ds, "SeriesInstanceUID"):
            ds.SeriesInstanceUID = series_uid
    msg = (
        f"{', '.join(tags)} {verb} empty in {nfiles} file(s): filled (SOP class/instance from the file meta "
        f"header, new StudyInstanceUID {study_uid or '-'}, new SeriesInstanceUID {series_uid or '-'})"
    )
    warnings.append(msg)
    log.warning("%s: %s", first, msg)


def _contrast(ds: Dataset) -> bool:
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip().upper()
    if agent:
        return agent not in _NO_CONTRAST
    route = str(ds.get("ContrastBolusRoute", "") or "").strip().upper()
    if route and route not in _NO_CONTRAST:
        return True
    for tag in ("ContrastBolusVolume", "ContrastBolusTotalDose"):
        try:
            if float(ds.get(tag) or 0) > 0:
                return True
        except (TypeError, ValueError):
            pass
    seq = ds.get("ContrastBolusAgentSequence")
    return bool(seq and len(seq))


# --------------------------------------------------------------------------- geometry


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    log.warning("%s", message)


def _same_pixels(a: _Frame, b: _Frame) -> bool:
    ra = _decode_chunk([(str(a.path), a.frame_number, a.rows, a.cols, 1.0, 0.0, False, a.ts, a.raw)])
    rb = _decode_chunk([(str(b.path), b.frame_number, b.rows, b.cols, 1.0, 0.0, False, b.ts, b.raw)])
    for r in (ra, rb):
        if isinstance(r, tuple):
            raise _decode_error(*r)
    return (
        a.slope == b.slope and a.intercept == b.intercept and np.array_equal(ra[0], rb[0])
    )


def _shift_inplane(vol: np.ndarray, shifts: np.ndarray, fill: float) -> None:
    """Shift slice k by ``shifts[k]`` = (rows, cols) pixels in place (linear interpolation)."""
    from scipy import ndimage

    for k in range(vol.shape[0]):
        dr, dc = shifts[k]
        if abs(dr) < 1e-6 and abs(dc) < 1e-6:
            continue
        sl = ndimage.shift(vol[k].astype(np.float32), (dr, dc), order=1, mode="constant", cval=fill)
        vol[k] = np.rint(sl) if vol.dtype.kind == "i" else sl


def _resample_normal(vol: np.ndarray, d: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation of slices at normal coordinates ``d`` onto a regular grid from d[0]."""
    n_new = int(np.floor((d[-1] - d[0]) / spacing + 1e-3)) + 1
    out = np.empty((n_new,) + vol.shape[1:], dtype=vol.dtype)
    for m in range(n_new):
        t = d[0] + m * spacing
        hi = int(np.searchsorted(d, t, side="left"))
        hi = min(max(hi, 1), len(d) - 1)
        lo = hi - 1
        w = (t - d[lo]) / (d[hi] - d[lo])
        w = min(max(w, 0.0), 1.0)
        if w < 1e-6:
            out[m] = vol[lo]
        elif w > 1 - 1e-6:
            out[m] = vol[hi]
        else:
            sl = vol[lo].astype(np.float32) * (1 - w) + vol[hi].astype(np.float32) * w
            out[m] = np.rint(sl) if vol.dtype.kind == "i" else sl
    return out


# --------------------------------------------------------------------------- loading


def load_series(
    files: Sequence[Path],
    *,
    fill_missing_uids: bool = False,
    require_modality: str | None = "CT",
    decode_workers: int | None = None,
    keep_headers: bool = True,
    header_cache: dict[Path, Any] | None = None,
) -> Volume:
    """Load the files of ONE DICOM series into a HU volume on a regular grid.

    Args:
        files: the series' files (single-frame instances, or Enhanced / Legacy
            Converted Enhanced CT multi-frame objects).
        fill_missing_uids: offline-only opt-in: fill empty SOPClassUID / SOPInstanceUID
            from the file meta header and give all files one new Study and one new
            Series Instance UID (recorded in ``Volume.warnings``).  Otherwise empty
            identifying UIDs raise :class:`SeriesError`.
        require_modality: the Modality the caller needs (``None``: any).
        decode_workers: processes for decoding compressed pixel data
            (default ``os.cpu_count()``; ``1`` decodes in process).
        keep_headers: keep the source headers (pixel data removed) in
            ``Volume.info.source_datasets``.
        header_cache: the dict a :func:`find_series` call filled: the headers of
            these files are taken from it (and removed from it) instead of being parsed
            again, unless a file changed since (inode, size or mtime).

    Returns:
        The :class:`Volume`; ``array`` is int16 when all rescale slopes/intercepts are
        integral and the HU fit, float32 otherwise.

    Raises:
        SeriesError: for any input problem (naming the file and the tag).
    """
    warnings: list[str] = []
    if not files:
        raise SeriesError("no files given")
    cache: dict[Path, Any] = header_cache if header_cache is not None else {}
    headers: list[tuple[Path, Dataset]] = []
    raw_of: dict[int, _RawPixels | None] = {}
    for f in files:
        path = Path(f)
        hdr = cache.pop(path, None)
        if not (isinstance(hdr, _Header) and hdr.fresh(path)):
            try:
                hdr = _read_header(path)
            except InvalidDicomError as exc:
                raise SeriesError(f"not a DICOM file ({exc})", path=path) from None
            except Exception as exc:  # noqa: BLE001 - pydicom raises assorted errors on broken files
                raise SeriesError(f"unreadable DICOM header ({type(exc).__name__}: {exc})", path=path) from None
        ds = hdr.ds
        if "DirectoryRecordSequence" in ds:
            log.warning("%s: DICOMDIR, skipped", path)
            continue
        headers.append((path, ds))
        raw_of[id(ds)] = hdr.raw
    if not headers:
        raise SeriesError("no DICOM image files given")

    # modality first: an MR series is refused whatever else is wrong with it
    if require_modality is not None:
        for path, ds in headers:
            mod = str(ds.get("Modality", "") or "").strip()
            if mod != require_modality:
                raise SeriesError(
                    f"Modality is {mod or 'empty'}, the profile needs {require_modality}", path=path, tag="Modality"
                )

    _check_identity(headers, fill_missing_uids, warnings)

    series = Counter(str(ds.SeriesInstanceUID) for _, ds in headers)
    if len(series) > 1:
        desc = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common())
        other = next(p for p, ds in headers if str(ds.SeriesInstanceUID) != series.most_common(1)[0][0])
        raise SeriesError(f"files of more than one series given: {desc}", path=other, tag="SeriesInstanceUID")
    studies = Counter(str(ds.StudyInstanceUID) for _, ds in headers)
    if len(studies) > 1:
        other = next(p for p, ds in headers if str(ds.StudyInstanceUID) != studies.most_common(1)[0][0])
        raise SeriesError(f"one series in {len(studies)} studies: {', '.join(studies)}", path=other, tag="StudyInstanceUID")

    # frames, localizers, orientation
    frames: list[_Frame] = []
    for path, ds in headers:
        try:
            new = _frames_of(path, ds)
            for fr in new:
                fr.raw = raw_of[id(ds)]
            frames.extend(new)
        except SeriesError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed values that pydicom only notices on access
            raise SeriesError(f"malformed image header ({type(exc).__name__}: {exc})", path=path) from None
    kept = []
    for fr in frames:
        if fr.localizer:
            _warn(warnings, f"{fr.label()}: LOCALIZER image dropped")
        else:
            kept.append(fr)
    frames = kept
    if frames:
        # cluster orientations (max cosine difference _ORIENT_TOL), keep the biggest cluster
        reps: list[np.ndarray] = []
        cluster: list[int] = []
        for fr in frames:
            for n, rep in enumerate(reps):
                if np.max(np.abs(fr.iop - rep)) <= _ORIENT_TOL:
                    cluster.append(n)
                    break
            else:
                reps.append(fr.iop)
                cluster.append(len(reps) - 1)
        major = Counter(cluster).most_common(1)[0][0]
        kept = []
        for fr, n in zip(frames, cluster):
            if n == major:
                kept.append(fr)
            else:
                _warn(
                    warnings,
                    f"{fr.label()}: ImageOrientationPatient {np.round(fr.iop, 4).tolist()} differs from the "
                    f"series' majority orientation, frame dropped",
                )
        frames = kept
    if len(frames) < 2:
        where = frames[0].path if frames else headers[0][0]
        raise SeriesError(f"{len(frames)} image frame(s): a volume needs at least 2 slices", path=where)

    # consistency
    ref = frames[0]
    size_major = Counter((fr.rows, fr.cols) for fr in frames).most_common(1)[0][0]
    for fr in frames:
        if (fr.rows, fr.cols) != size_major:
            raise SeriesError(
                f"Rows/Columns {fr.rows}x{fr.cols} differ from the series' {size_major[0]}x{size_major[1]}",
                path=fr.path, tag="Rows" if fr.rows != size_major[0] else "Columns",
            )
    sp_major = Counter(fr.spacing for fr in frames).most_common(1)[0][0]
    for fr in frames:
        if not np.allclose(fr.spacing, sp_major, rtol=1e-3, atol=1e-4):
            raise SeriesError(
                f"PixelSpacing {list(fr.spacing)} differs from the series' {list(sp_major)}", path=fr.path, tag="PixelSpacing"
            )
    if min(sp_major) <= 0:
        raise SeriesError(f"PixelSpacing {list(sp_major)} is not positive", path=ref.path, tag="PixelSpacing")
    used = {id(fr.header) for fr in frames}  # a set: a membership test per header, not a scan of the frames
    fors = Counter(str(ds.get("FrameOfReferenceUID", "") or "") for _, ds in headers if id(ds) in used)
    if len(fors) > 1:
        bad = next(fr.path for fr in frames if str(fr.header.get("FrameOfReferenceUID", "") or "") != fors.most_common(1)[0][0])
        raise SeriesError(
            f"mixed FrameOfReferenceUID in one series: {', '.join(u or '(empty)' for u in fors)}",
            path=bad, tag="FrameOfReferenceUID",
        )

    # sort along the normal
    row_cos = ref.iop[:3] / np.linalg.norm(ref.iop[:3])
    col_cos = ref.iop[3:] / np.linalg.norm(ref.iop[3:])
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError("row and column cosines are parallel", path=ref.path, tag="ImageOrientationPatient")
    normal /= np.linalg.norm(normal)
    frames.sort(key=lambda fr: float(normal @ fr.ipp))
    d = np.array([normal @ fr.ipp for fr in frames])

    # duplicates
    kept = [frames[0]]
    kept_d = [d[0]]
    for fr, dist in zip(frames[1:], d[1:]):
        prev = kept[-1]
        if abs(dist - kept_d[-1]) <= _MIN_GAP_MM and np.linalg.norm(fr.ipp - prev.ipp) <= 0.1:
            if _same_pixels(prev, fr):
                _warn(warnings, f"{fr.label()}: duplicate of {prev.label()} (same position and pixels), dropped")
                continue
            raise SeriesError(
                f"two frames at position {np.round(fr.ipp, 3).tolist()} with different pixel data: "
                f"{prev.label()} and {fr.label()} (two acquisitions mixed in one series?)",
                path=fr.path, tag="ImagePositionPatient",
            )
        kept.append(fr)
        kept_d.append(dist)
    frames = kept
    d = np.array(kept_d)
    if len(frames) < 2:
        raise SeriesError("all frames share one position: a volume needs at least 2 slices", path=frames[0].path)

    # decode
    as_int = all(
        float(fr.slope).is_integer() and float(fr.intercept).is_integer()
        and abs(fr.slope) < 2**31 and abs(fr.intercept) < 2**31  # beyond: float arithmetic
        for fr in frames
    )
    workers = decode_workers if decode_workers is not None else (os.cpu_count() or 1)
    vol = _decode_all(frames, max(1, int(workers)), as_int)

    # geometry
    dr, dc = sp_major
    gaps = np.diff(d)
    if np.any(gaps <= _MIN_GAP_MM):
        k = int(np.argmax(gaps <= _MIN_GAP_MM))
        raise SeriesError(
            f"{frames[k].label()} and {frames[k + 1].label()} lie in the same plane at different in-plane "
            "positions (two acquisitions mixed in one series?)",
            path=frames[k + 1].path, tag="ImagePositionPatient",
        )
    median_gap = float(np.median(gaps))
    tol = max(_MIN_GAP_MM, _REL_GAP * median_gap)
    rel = np.array([fr.ipp - frames[0].ipp for fr in frames])
    inplane = rel - np.outer(d - d[0], normal)
    off_r = inplane @ col_cos  # mm along the column cosine (row index direction)
    off_c = inplane @ row_cos  # mm along the row cosine (column index direction)
    inplane_tol = max(_MIN_GAP_MM, 0.01 * min(dr, dc))
    tilted = bool(np.max(np.hypot(off_r, off_c)) > inplane_tol)
    uneven = bool(np.max(np.abs(gaps - median_gap)) > tol)
    resampled = tilted or uneven
    fill = float(vol.min())
    if tilted:
        tilt_tag = frames[0].header.get("GantryDetectorTilt", "")
        angle = np.degrees(np.arctan2(np.max(np.hypot(off_r, off_c)), d[-1] - d[0]))
        _shift_inplane(vol, np.stack([off_r / dr, off_c / dc], axis=1), fill)
        _warn(
            warnings,
            f"gantry tilt / sheared stack: slice positions deviate up to {np.max(np.hypot(off_r, off_c)):.2f} mm "
            f"from the slice normal (about {angle:.1f} deg; GantryDetectorTilt says {tilt_tag or 'nothing'}); "
            "slices shifted in-plane onto an orthogonal grid",
        )
    if uneven:
        _warn(
            warnings,
            f"uneven slice spacing: gaps {gaps.min():.3f} to {gaps.max():.3f} mm; resampled by linear "
            f"interpolation along the slice normal to the median gap {median_gap:.3f} mm",
        )
        vol = _resample_normal(vol, d, median_gap)

    affine = np.eye(4)
    affine[:3, 0] = row_cos * dc
    affine[:3, 1] = col_cos * dr
    if resampled:
        affine[:3, 2] = normal * median_gap
    else:
        affine[:3, 2] = (frames[-1].ipp - frames[0].ipp) / (len(frames) - 1)
    affine[:3, 3] = frames[0].ipp

    # provenance
    src: list[SourceFrame] = []
    for fr in frames:
        src.append(
            SourceFrame(
                path=fr.path, frame_number=fr.frame_number, sop_instance_uid=str(fr.header.SOPInstanceUID),
                position=fr.ipp.copy(), orientation=fr.iop.copy(), pixel_spacing=(float(dr), float(dc)),
                rows=fr.rows, columns=fr.cols,
            )
        )
    datasets: list[Any] = []
    if keep_headers:
        seen: set[int] = set()
        for fr in frames:
            if id(fr.header) not in seen:
                seen.add(id(fr.header))
                datasets.append(fr.header)
    hdr = frames[0].header
    try:
        series_number = int(hdr.get("SeriesNumber")) if str(hdr.get("SeriesNumber", "") or "").strip() else None
    except (TypeError, ValueError):
        series_number = None
    info = SeriesInfo(
        series_instance_uid=str(hdr.SeriesInstanceUID),
        study_instance_uid=str(hdr.StudyInstanceUID),
        frame_of_reference_uid=str(hdr.get("FrameOfReferenceUID", "") or "") or None,
        modality=str(hdr.get("Modality", "") or ""),
        series_description=str(hdr.get("SeriesDescription", "") or ""),
        series_number=series_number,
        contrast_applied=_contrast(hdr),
        source_datasets=datasets,
    )
    return Volume(array=vol, affine=affine, info=info, frames=src, resampled=resampled, warnings=warnings)
