"""Pixel data -> HU slices, in every transfer syntax pydicom and pylibjpeg decode: native
frames read straight from the file or by pydicom in process, compressed ones in a process
pool when there are enough of them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.errors import SeriesError
from node.pipeline.series.frames import Frame
from node.pipeline.series.header import RawPixels

log = logging.getLogger(__name__)


#: Transfer syntaxes read in-process (no codec needed).
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
}


#: Fewer compressed frames than this are decoded in process (starting a pool costs more).
PARALLEL_MIN_FRAMES = 32


def _ts_name(ts: str) -> str:
    try:
        name = UID(ts).name
    except Exception:  # noqa: BLE001 - a name for a message only
        name = ""
    return f"{name} ({ts})" if name and name != ts else (ts or "unknown transfer syntax")


def _read_raw_frame(path: str, raw: RawPixels, index: int, rows: int, cols: int) -> np.ndarray | None:
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
    raw: RawPixels | None = None,
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


_Item = tuple[str, "int | None", int, int, float, float, bool, str, "RawPixels | None"]


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
    frames: list[Frame], workers: int, as_int: bool
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


def decode_volume(frames: list[Frame], decode_workers: int | None) -> np.ndarray:
    """Decode the (ordered) frames into one ``(n, rows, cols)`` HU array: int16 when every
    RescaleSlope/Intercept is integral and the HU fit, else float32.  ``decode_workers``:
    processes for compressed frames (default ``os.cpu_count()``; ``1`` decodes in process)."""
    as_int = all(
        float(fr.slope).is_integer() and float(fr.intercept).is_integer()
        and abs(fr.slope) < 2**31 and abs(fr.intercept) < 2**31  # beyond: float arithmetic
        for fr in frames
    )
    workers = decode_workers if decode_workers is not None else (os.cpu_count() or 1)
    return _decode_all(frames, max(1, int(workers)), as_int)


def same_pixels(a: Frame, b: Frame) -> bool:
    ra = _decode_chunk([(str(a.path), a.frame_number, a.rows, a.cols, 1.0, 0.0, False, a.ts, a.raw)])
    rb = _decode_chunk([(str(b.path), b.frame_number, b.rows, b.cols, 1.0, 0.0, False, b.ts, b.raw)])
    for r in (ra, rb):
        if isinstance(r, tuple):
            raise _decode_error(*r)
    return (
        a.slope == b.slope and a.intercept == b.intercept and np.array_equal(ra[0], rb[0])
    )
