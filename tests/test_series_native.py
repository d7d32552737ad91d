"""The direct read of uncompressed pixel data in node.pipeline.series, against pydicom.

``load_series`` reads native (uncompressed, not deflated) 16-bit frames straight from
their file offset instead of going through pydicom's pixel handlers; these tests pin
that the result is bit-identical to ``pydicom``'s ``pixel_array`` (byte order, signed and
unsigned data, garbage above BitsStored, multi-frame objects), that anything unusual
still goes through pydicom, and that headers parsed by ``find_series`` are reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    UID,
    ImplicitVRLittleEndian,
    generate_uid,
)

from node.errors import SeriesError
from node.pipeline.series import decode as decode_mod
from node.pipeline.series import header as header_mod
from node.pipeline.series.find import find_series
from node.pipeline.series.load import load_series

ROWS, COLS, N = 12, 10, 4


def _write(
    path: Path,
    pixels: np.ndarray,
    *,
    ts: str = ExplicitVRLittleEndian,
    signed: bool = False,
    bits_stored: int = 16,
    slope: str = "1",
    intercept: str = "-1024",
    z: float = 0.0,
    series: str = "1.2.3.4",
    photometric: str = "MONOCHROME2",
    vr: str = "OW",
) -> Path:
    """A minimal CT image whose PixelData holds exactly ``pixels`` (uint16 bit patterns)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = "1.2.3.5"
    ds.Modality = "CT"
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    big = ts == ExplicitVRBigEndian
    ds.PixelData = pixels.astype(">u2" if big else "<u2").tobytes()
    ds["PixelData"].VR = vr
    ds.save_as(path, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=not big, enforce_file_format=True)
    return path


def _patterns(seed: int) -> np.ndarray:
    """Random 16-bit patterns, including all-ones and the sign bit, i.e. garbage above any BitsStored."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 65536, size=(ROWS, COLS), dtype=np.uint32).astype(np.uint16)
    arr[0, :4] = [0, 0xFFFF, 0x8000, 0x0FFF]
    return arr


CASES = [
    pytest.param(ts, signed, bits, id=f"{name}-{'s' if signed else 'u'}{bits}")
    for name, ts in (("explicit", ExplicitVRLittleEndian), ("implicit", ImplicitVRLittleEndian),
                     ("bigendian", ExplicitVRBigEndian))
    for signed in (False, True)
    for bits in (16, 12, 1)
]


@pytest.mark.parametrize("ts, signed, bits", CASES)
def test_raw_frame_equals_pydicom_pixel_array(ts: str, signed: bool, bits: int, tmp_path: Path) -> None:
    path = _write(tmp_path / "a.dcm", _patterns(bits), ts=ts, signed=signed, bits_stored=bits)
    hdr = header_mod.read_header(path)
    assert hdr.raw is not None, "the direct read must apply to this file"
    got = decode_mod._read_raw_frame(str(path), hdr.raw, 0, ROWS, COLS)
    want = pydicom.dcmread(path).pixel_array
    # same values and kind; pydicom keeps big-endian data in a big-endian dtype, we swap once
    assert got is not None and got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative
    np.testing.assert_array_equal(got, want)
    if bits < 16:  # the high bits were garbage: pydicom corrects them, so must we
        assert not np.array_equal(got.view(np.uint16), _patterns(bits))


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("photometric, vr", [("MONOCHROME1", "OW"), ("MONOCHROME2", "OB")])
def test_raw_frame_monochrome1_and_ob(ts: str, photometric: str, vr: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "a.dcm", _patterns(5), ts=ts, signed=True, bits_stored=12,
                  photometric=photometric, vr=vr)
    hdr = header_mod.read_header(path)
    assert hdr.raw is not None
    ds = pydicom.dcmread(path)
    assert ds["PixelData"].VR == vr and ds.PhotometricInterpretation == photometric
    np.testing.assert_array_equal(decode_mod._read_raw_frame(str(path), hdr.raw, 0, ROWS, COLS), ds.pixel_array)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize(
    "signed, bits, slope, intercept",
    [(False, 12, "1", "-1024"), (True, 16, "1", "0"), (True, 12, "2", "-1000"), (False, 16, "1", "-32768"),
     (False, 12, "2.5", "-1024.5"), (True, 13, "-1", "100"), (False, 16, "1", "0")],
)
def test_load_series_equals_pydicom(
    ts: str, signed: bool, bits: int, slope: str, intercept: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [
        _write(tmp_path / f"{k}.dcm", _patterns(10 * k + bits), ts=ts, signed=signed, bits_stored=bits,
               slope=slope, intercept=intercept, z=2.0 * k)
        for k in range(N)
    ]
    # HU exactly as the loader built them before the direct read: pydicom's pixel_array, rescaled
    want = np.stack([decode_mod._apply_rescale(pydicom.dcmread(f).pixel_array, float(slope), float(intercept),
                                               float(slope).is_integer() and float(intercept).is_integer())
                     for f in files])
    vol_slow = _load_via_pydicom(files, monkeypatch)
    calls: list[str] = []
    real = decode_mod._read_raw_frame
    def counting_read(p, *a):
        calls.append(p)
        return real(p, *a)

    monkeypatch.setattr(decode_mod, "_read_raw_frame", counting_read)
    vol = load_series(files)
    assert len(calls) == N
    assert vol.array.dtype == vol_slow.array.dtype
    np.testing.assert_array_equal(vol.array, vol_slow.array)
    if vol.array.dtype == np.int16 and want.dtype != np.int16:  # int32 slices that fit were stored as int16
        want = want.astype(np.int16)
    np.testing.assert_array_equal(vol.array, want.astype(vol.array.dtype))


def _load_via_pydicom(files: list[Path], monkeypatch: pytest.MonkeyPatch):
    """load_series with the direct read switched off (every frame decoded by pydicom)."""
    with monkeypatch.context() as m:
        m.setattr(header_mod, "_raw_pixels", lambda fh, ds: None)
        return load_series(files)


def test_multiframe_native_frames(tmp_path: Path) -> None:
    """Frames of an uncompressed multi-frame object are read at their own offsets."""
    from node.tools.synth_series import write_series

    small = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct-body-3mm-small" / "ct.nii.gz"
    if not small.exists():
        pytest.skip("test data missing")
    files = write_series(small, tmp_path, size=(16, 16, 6), enhanced=True)
    hdr = header_mod.read_header(files[0])
    assert hdr.raw is not None
    full = pydicom.dcmread(files[0]).pixel_array
    for i in range(full.shape[0]):
        np.testing.assert_array_equal(decode_mod._read_raw_frame(str(files[0]), hdr.raw, i, 16, 16), full[i])


@pytest.mark.parametrize(
    "change",
    ["deflate", "photometric", "length", "bits8", "float"],
)
def test_unusual_files_go_through_pydicom(change: str, tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    if change == "deflate":
        _write(path, _patterns(1), ts=DeflatedExplicitVRLittleEndian)
    elif change == "photometric":
        _write(path, _patterns(1), photometric="PALETTE COLOR")
    else:
        _write(path, _patterns(1))
        ds = pydicom.dcmread(path)
        if change == "length":  # one extra pixel: pydicom decides what that means
            ds.PixelData = ds.PixelData + b"\0\0"
        elif change == "bits8":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = ds.PixelData[: ROWS * COLS]
        elif change == "float":
            del ds.PixelData
            ds.FloatPixelData = np.zeros((ROWS, COLS), np.float32).tobytes()
        ds.save_as(path, enforce_file_format=True)
    assert header_mod.read_header(path).raw is None


def test_truncated_pixel_data_still_reported_by_pydicom(tmp_path: Path) -> None:
    files = [_write(tmp_path / f"{k}.dcm", _patterns(k), z=2.0 * k) for k in range(3)]
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-50])
    assert header_mod.read_header(files[1]).raw is not None  # the header still announces full length
    with pytest.raises(SeriesError) as exc:
        load_series(files)
    assert str(files[1]) in str(exc.value) and exc.value.tag == "PixelData"


def test_header_cache_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [_write(tmp_path / f"{k}.dcm", _patterns(k), z=2.0 * k) for k in range(N)]
    (tmp_path / "other.dcm").write_bytes(b"not dicom")
    cache: dict[Path, object] = {}
    groups = find_series([tmp_path], header_cache=cache)
    assert set(cache) == set(groups["1.2.3.4"]) == set(files)
    reference = load_series(files)
    reads: list[object] = []
    real = pydicom.dcmread
    def counting_dcmread(*a, **kw):
        reads.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(decode_mod.pydicom, "dcmread", counting_dcmread)
    vol = load_series(groups["1.2.3.4"], header_cache=cache)
    assert reads == [] and cache == {}  # nothing parsed again; the entries were handed over
    np.testing.assert_array_equal(vol.array, reference.array)
    assert [f.sop_instance_uid for f in vol.frames] == [f.sop_instance_uid for f in reference.frames]


def test_header_cache_ignored_for_changed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [_write(tmp_path / f"{k}.dcm", _patterns(k), z=2.0 * k) for k in range(N)]
    cache: dict[Path, object] = {}
    find_series([tmp_path], header_cache=cache)
    # rewritten after the scan: another intercept and a longer header (the pixels move)
    ds = pydicom.dcmread(files[2])
    ds.RescaleIntercept = "-1000"
    ds.SeriesDescription = "x" * 64
    ds.save_as(files[2], enforce_file_format=True)
    vol = load_series(files, header_cache=cache)
    expected = pydicom.dcmread(files[2]).pixel_array.astype(np.int32) - 1000
    np.testing.assert_array_equal(vol.array[2], expected)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
@pytest.mark.parametrize("slope, intercept", [(1, -1024), (1, 0), (2, -1000), (-1, 100), (1, -32768), (3, 40000),
                                              (70000, 0), (1, 2**31)])
def test_rescale_into_matches_apply_rescale(dtype: type, slope: int, intercept: int) -> None:
    """The in-place int16 rescale is _apply_rescale exactly, or declines (nothing written)."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(slope + intercept % 97)
    raw: np.ndarray = rng.integers(info.min, info.max, size=(ROWS, COLS), endpoint=True).astype(dtype)
    raw[0, 0], raw[0, 1] = info.min, info.max
    for arr in (raw, raw // 4):
        out = np.full(arr.shape, 7, np.int16)
        try:
            want = decode_mod._apply_rescale(arr, float(slope), float(intercept), True)
        except OverflowError:  # an intercept beyond int32: not for the fast path either
            assert not decode_mod._rescale_into(out, arr, float(slope), float(intercept))
            continue
        if decode_mod._rescale_into(out, arr, float(slope), float(intercept)):
            assert want.dtype == np.int16
            np.testing.assert_array_equal(out, want)
        else:
            assert want.dtype != np.int16 or abs(slope) * max(abs(int(info.min)), int(info.max)) >= 2**31
            assert (out == 7).all()


def test_volume_beyond_int16_becomes_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice whose HU leave int16 still turns the volume into float32, as before."""
    files = [_write(tmp_path / f"{k}.dcm", _patterns(k), z=2.0 * k, intercept="-1024" if k != 2 else "0")
             for k in range(N)]
    vol = load_series(files)
    slow = _load_via_pydicom(files, monkeypatch)
    assert vol.array.dtype == slow.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, slow.array)


def test_header_cache_ignored_for_replaced_file_same_size_and_mtime(tmp_path: Path) -> None:
    """A file atomically replaced after the scan (new inode), even with the same size and mtime."""
    import os

    files = [_write(tmp_path / f"{k}.dcm", _patterns(k), z=2.0 * k) for k in range(N)]
    cache: dict[Path, object] = {}
    find_series([tmp_path], header_cache=cache)
    st = files[1].stat()
    ds = pydicom.dcmread(files[1])
    ds.RescaleIntercept = "-1000"  # same length as "-1024": same file size
    tmp = tmp_path / "new.tmp"
    ds.save_as(tmp, enforce_file_format=True)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, files[1])
    assert files[1].stat().st_size == st.st_size and files[1].stat().st_mtime_ns == st.st_mtime_ns
    vol = load_series(files, header_cache=cache)
    np.testing.assert_array_equal(vol.array[1], pydicom.dcmread(files[1]).pixel_array.astype(np.int32) - 1000)
