"""Tests for node.pipeline.series (DICOM series -> Volume) and node.tools.synth_series.

Real data come from ``$NODE_TEST_DATA`` (default ``<repo>/../shared/data``); synthetic
series are written into pytest's tmp folders from the small body CT NIfTI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from node.errors import SeriesError
from node.pipeline.series import decode as decode_mod
from node.pipeline.series.find import find_series
from node.pipeline.series.load import load_series
from node.tools.synth_series import LOSSY, TRANSFER_SYNTAXES, main as synth_main, write_series

DATA = Path(os.environ.get("NODE_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
J2K_DIR = DATA / "ct-abdomen-siemens-j2k" / "dicom"
PUBLISHED_DIR = DATA / "ct-abdomen-siemens-j2k" / "dicom-as-published"
SMALL_CT = DATA / "ct-body-3mm-small" / "ct.nii.gz"
MR = DATA / "mr-small" / "mr.nii.gz"
SIZE = (64, 64, 20)

needs_data = pytest.mark.skipif(not SMALL_CT.exists(), reason=f"test data not found under {DATA}")
pytestmark = needs_data


def _hu(path: Path | None) -> np.ndarray:
    """Reference HU of a single-frame file (a volume frame's path), straight from pydicom."""
    assert path is not None
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _sorted_files(files: list[Path]) -> list[Path]:
    def key(p: Path) -> float:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.cross(iop[:3], iop[3:]) @ np.array(ds.ImagePositionPatient, dtype=float))

    return sorted(files, key=key)


@pytest.fixture(scope="session")
def ref_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(SMALL_CT, tmp_path_factory.mktemp("ref"), size=SIZE)


@pytest.fixture(scope="session")
def ref_volume(ref_files: list[Path]):
    return load_series(ref_files)


def _copy(files: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, dest / f.name)) for f in files]


# --------------------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize("ts", sorted(TRANSFER_SYNTAXES))
def test_transfer_syntax_roundtrip(ts: str, tmp_path: Path, ref_volume) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, transfer_syntax=ts)
    assert str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == TRANSFER_SYNTAXES[ts]
    vol = load_series(files, decode_workers=1)
    assert vol.shape == ref_volume.shape
    np.testing.assert_allclose(vol.affine, ref_volume.affine, atol=1e-4)
    # exactly what pydicom decodes, rescaled
    expected = np.stack([_hu(f) for f in _sorted_files(files)])
    np.testing.assert_allclose(vol.array, expected, atol=1e-3 if vol.array.dtype == np.float32 else 0)
    if ts in LOSSY:
        err = np.abs(vol.array.astype(float) - ref_volume.array)
        if ts == "jpeg-baseline":  # 8-bit window -1000..1000 HU
            inside = (ref_volume.array > -1000) & (ref_volume.array < 1000)
            assert vol.array.dtype == np.float32
            assert err[inside].mean() < 30  # 7.8 HU steps + JPEG q90
        else:
            assert err.mean() < 15, err.mean()
    else:
        assert vol.array.dtype == np.int16
        np.testing.assert_array_equal(vol.array, ref_volume.array)


def test_parallel_decode_uses_pool_and_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, transfer_syntax="j2k")
    one = load_series(files, decode_workers=1)
    used = []
    assert decode_mod.ProcessPoolExecutor is ProcessPoolExecutor

    class Spy(ProcessPoolExecutor):
        def __init__(self, *a: Any, **kw: Any) -> None:
            used.append(kw.get("max_workers"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(decode_mod, "ProcessPoolExecutor", Spy)
    monkeypatch.setattr(decode_mod, "PARALLEL_MIN_FRAMES", 2)
    two = load_series(files, decode_workers=2)
    assert used == [2]
    np.testing.assert_array_equal(one.array, two.array)
    assert two.array.dtype == np.int16


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not J2K_DIR.exists(), reason="real J2K series missing")
def test_real_j2k_series() -> None:
    files = sorted(J2K_DIR.iterdir())
    vol = load_series(files)
    assert vol.shape == (20, 512, 512)
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert float(headers[0].SliceThickness) == 3.0  # spacing came from positions
    ipps = sorted((np.array(h.ImagePositionPatient, dtype=float) for h in headers), key=lambda p: p[2])
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [*ipps[0], 1], atol=1e-6)
    np.testing.assert_allclose(vol.affine @ [0, 0, 19, 1], [*ipps[-1], 1], atol=1e-6)
    assert not vol.resampled and vol.array.dtype == np.int16
    for k in (0, 7, 19):
        fr = vol.frames[k]
        np.testing.assert_array_equal(vol.array[k], _hu(fr.path))
        np.testing.assert_allclose(fr.position, vol.affine[:3, :3] @ [0, 0, k] + vol.affine[:3, 3], atol=1e-6)
    assert vol.info.contrast_applied
    assert vol.info.series_description == "CT Body 3.0"
    assert vol.info.modality == "CT" and vol.info.series_number == 3
    assert len(vol.info.source_datasets) == 20
    assert all("PixelData" not in ds and "SOPInstanceUID" in ds for ds in vol.info.source_datasets)
    assert [ds.SOPInstanceUID for ds in vol.info.source_datasets] == [f.sop_instance_uid for f in vol.frames]
    assert find_series([J2K_DIR]) == {str(headers[0].SeriesInstanceUID): files}


@pytest.mark.skipif(not PUBLISHED_DIR.exists(), reason="as-published series missing")
def test_as_published_refused_naming_missing_uids() -> None:
    files = sorted(PUBLISHED_DIR.iterdir())
    groups = find_series([PUBLISHED_DIR])
    assert list(groups) == [""] and len(groups[""]) == 20
    with pytest.raises(SeriesError) as exc:
        load_series(files)
    msg = str(exc.value)
    assert "SOPClassUID, SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID are empty" in msg
    assert str(files[0]) in msg


@pytest.mark.skipif(not PUBLISHED_DIR.exists(), reason="as-published series missing")
def test_as_published_fill_missing_uids() -> None:
    files = sorted(PUBLISHED_DIR.iterdir())
    vol = load_series(files, fill_missing_uids=True)
    assert vol.shape == (20, 512, 512)
    assert any("filled" in w for w in vol.warnings)
    dss = vol.info.source_datasets
    assert len({ds.StudyInstanceUID for ds in dss}) == 1 and len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert dss[0].SeriesInstanceUID == vol.info.series_instance_uid != ""
    assert vol.info.study_instance_uid not in ("", vol.info.series_instance_uid)
    for ds, fr in zip(dss, vol.frames):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == fr.sop_instance_uid
    # a second load gets fresh (different) UIDs, never those of another input
    again = load_series(files, fill_missing_uids=True)
    assert again.info.series_instance_uid != vol.info.series_instance_uid
    # same pixels as the repaired copy
    if J2K_DIR.exists():
        np.testing.assert_array_equal(vol.array, load_series(sorted(J2K_DIR.iterdir())).array)


def test_only_some_uids_empty(tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files, tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = ""
    ds.save_as(files[3])
    with pytest.raises(SeriesError, match=r"SOPInstanceUID is empty in 1 of 20"):
        load_series(files)


# --------------------------------------------------------------------------- sorting, dropping


def test_sorting_shuffled_files_reversed_instance_numbers(tmp_path: Path, ref_volume) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, shuffle=True, seed=3)
    numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in _sorted_files(files)]
    assert numbers == sorted(numbers, reverse=True)
    rng = np.random.default_rng(1)
    vol = load_series([files[i] for i in rng.permutation(len(files))])
    np.testing.assert_array_equal(vol.array, ref_volume.array)
    np.testing.assert_allclose(vol.affine, ref_volume.affine, atol=1e-4)
    d = [fr.position[2] for fr in vol.frames]
    assert d == sorted(d)
    for k in (0, 10, 19):
        np.testing.assert_array_equal(vol.array[k], _hu(vol.frames[k].path))


def test_localizer_dropped(tmp_path: Path, ref_volume) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, localizer=True)
    vol = load_series(files)
    assert any("LOCALIZER" in w and "LOCALIZER.dcm" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.array, ref_volume.array)
    assert len(vol.info.source_datasets) == 20


def test_other_orientation_dropped(tmp_path: Path, ref_volume) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, localizer=True)
    loc = files[-1]
    ds = pydicom.dcmread(loc)
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]  # not flagged: only its orientation differs
    ds.save_as(loc)
    vol = load_series(files)
    assert any("majority orientation" in w and "LOCALIZER.dcm" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.array, ref_volume.array)


def test_duplicate_identical_kept_once(tmp_path: Path, ref_files: list[Path], ref_volume) -> None:
    files = _copy(ref_files, tmp_path)
    dup = tmp_path / "dup.dcm"
    shutil.copy(files[5], dup)
    vol = load_series(files + [dup])
    assert vol.shape == ref_volume.shape
    assert any("duplicate" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.array, ref_volume.array)


def test_duplicate_position_different_pixels(tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files, tmp_path)
    ds = pydicom.dcmread(files[5])
    arr = ds.pixel_array.copy()
    arr[10:20, 10:20] += 100
    ds.PixelData = arr.tobytes()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    other = tmp_path / "second_acquisition.dcm"
    ds.save_as(other)
    with pytest.raises(SeriesError) as exc:
        load_series(files + [other])
    assert str(files[5]) in str(exc.value) and str(other) in str(exc.value)


# --------------------------------------------------------------------------- resampling


def _sample(volume, points_lps: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    ijk = (np.linalg.inv(volume.affine) @ np.vstack([points_lps, np.ones(points_lps.shape[1])]))[:3]
    return ndimage.map_coordinates(volume.array.astype(np.float32), ijk[::-1], order=1, cval=np.nan)


def test_gantry_tilt(tmp_path: Path, ref_volume) -> None:
    tilt = 15.0
    files = write_series(SMALL_CT, tmp_path, size=SIZE, tilt_deg=tilt)
    vol = load_series(files)
    assert vol.resampled and any("tilt" in w for w in vol.warnings)
    assert vol.shape == (20, 64, 64)
    frames = vol.frames
    row_cos, col_cos = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row_cos, col_cos)
    # orthogonal grid: third axis along the slice normal, spacing = z step * cos(tilt)
    np.testing.assert_allclose(vol.affine[:3, 2] / np.linalg.norm(vol.affine[:3, 2]), normal, atol=1e-6)
    assert vol.spacing[2] == pytest.approx(4.5 * np.cos(np.radians(tilt)), rel=1e-3)
    assert abs(np.degrees(np.arccos(col_cos @ [0, 1, 0])) - tilt) < 1e-3
    # the first frame is the untilted reference point: voxel (i, j, 0) is its pixel (i, j)
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [*frames[0].position, 1], atol=1e-6)
    np.testing.assert_array_equal(vol.array[0], _hu(frames[0].path))
    # every frame pixel's LPS position holds that pixel's value in the volume
    errs, naive = [], []
    for fr in frames[2:-2]:
        jj, ii = np.mgrid[0 : fr.rows, 0 : fr.columns]
        pts = (fr.pixel_to_patient() @ np.stack([ii.ravel(), jj.ravel(), 0 * ii.ravel(), 1 + 0 * ii.ravel()]))[:3]
        got = _sample(vol, pts)
        want = _hu(fr.path).ravel()
        ok = np.isfinite(got) & (want > -1000)
        errs.append(np.abs(got[ok] - want[ok]).mean())
        k = frames.index(fr)
        naive.append(np.abs(vol.array[k].ravel()[ok] - want[ok]).mean())  # if the shift were ignored
    assert np.mean(errs) < 20, errs
    assert np.mean(naive) > 3 * np.mean(errs)
    # the tilted volume agrees with the untilted acquisition of the same patient
    kk, jj, ii = np.mgrid[3:17, 10:54, 10:54]
    pts = (vol.affine @ np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)]))[:3]
    a, b = vol.array[kk, jj, ii].ravel().astype(float), _sample(ref_volume, pts)
    ok = np.isfinite(b)
    assert np.corrcoef(a[ok], b[ok])[0, 1] > 0.9
    # a mask made on the volume lands on the same structure in every original frame
    mask = vol.array > 150
    back = vol.mask_on_frames(mask)
    assert back.shape == (20, 64, 64)
    truth = np.stack([_hu(fr.path) > 150 for fr in frames])
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.85, dice


def test_uneven_spacing_resampled(tmp_path: Path, ref_volume) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, uneven=True)
    assert len(files) == 18
    vol = load_series(files)
    assert vol.resampled and any("uneven" in w and "median" in w for w in vol.warnings)
    assert len(vol.frames) == 18
    assert vol.shape == ref_volume.shape
    assert vol.spacing[2] == pytest.approx(4.5, abs=1e-4)
    np.testing.assert_allclose(vol.affine, ref_volume.affine, atol=1e-4)
    dropped = {20 // 3, 40 // 3}
    for m in range(20):
        if m in dropped:
            mid = np.rint((ref_volume.array[m - 1].astype(float) + ref_volume.array[m + 1]) / 2)
            np.testing.assert_allclose(vol.array[m], mid, atol=1)
        else:
            np.testing.assert_array_equal(vol.array[m], ref_volume.array[m])
    back = vol.mask_on_frames(vol.array > 150)
    assert back.shape == (18, 64, 64)
    kept = [m for m in range(20) if m not in dropped]
    np.testing.assert_array_equal(back, ref_volume.array[kept] > 150)


@pytest.mark.parametrize("tilt, gaps", [(18.5, None), (0.0, [4.0, 1.08, 7.0]), (25.0, [1.0, 7.0, 3.0])])
def test_exact_grid_holds_every_pixel(tmp_path: Path, tilt: float, gaps: list[float] | None) -> None:
    """The exact grid: every original pixel is a voxel, unmodified, at its own LPS position
    (sheared affine for tilt, a step through every slice for uneven gaps), and a mask on the
    grid goes back onto each frame as the grid slice holding its pixels."""
    files = write_series(SMALL_CT, tmp_path, size=SIZE, tilt_deg=tilt, gaps_mm=gaps)
    vol = load_series(files, grid="exact")
    assert vol.frame_slices is not None and len(vol.frame_slices) == len(vol.frames) == len(files)
    assert list(vol.frame_slices) == sorted(vol.frame_slices)
    if gaps:
        assert vol.resampled and any("uneven" in w and "grid step" in w for w in vol.warnings)
        step = vol.spacing[2] * np.cos(np.radians(tilt))  # along the normal
        assert step <= min(gaps) * np.cos(np.radians(tilt)) + 1e-6
        assert vol.shape[0] <= 4 * len(files) + 1
    if tilt:
        assert any("sheared grid" in w for w in vol.warnings)
    inv = np.linalg.inv(vol.affine)
    worst = 0.0
    for fr, k in zip(vol.frames, vol.frame_slices):
        np.testing.assert_array_equal(vol.array[k], _hu(fr.path))
        # the frame's corner pixels in grid index space: their own (column, row), slice k
        corners = fr.pixel_to_patient() @ np.array([[0, 0, 0, 1], [fr.columns - 1, fr.rows - 1, 0, 1]]).T
        ijk = (inv @ corners)[:3]
        np.testing.assert_allclose(ijk[:2], [[0, fr.columns - 1], [0, fr.rows - 1]], atol=0.1)
        worst = max(worst, float(np.max(np.abs(ijk[2] - k))))
    assert worst <= (0.5 if gaps else 1e-3)  # snapped by at most half a step
    mask = vol.array > 150
    back = vol.mask_on_frames(mask)
    np.testing.assert_array_equal(back, np.stack([_hu(fr.path) > 150 for fr in vol.frames]))


def test_exact_grid_between_slices_interpolated(tmp_path: Path) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, gaps_mm=[9.0, 4.5])  # every 3rd of 4.5 mm gone
    vol = load_series(files, grid="exact")
    assert vol.spacing[2] == pytest.approx(4.5, abs=1e-3)  # a step that holds every slice exactly
    assert vol.frame_slices is not None
    slots = list(vol.frame_slices)
    a, b = slots[0], slots[1]
    assert b - a == 2
    mid = np.rint((vol.array[a].astype(float) + vol.array[b]) / 2)
    np.testing.assert_allclose(vol.array[a + 1], mid, atol=1)


def test_working_grid_drops_frame_slices(tmp_path: Path) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, tilt_deg=12.0)
    vol = load_series(files, grid="exact")
    assert vol.frame_slices is not None and not vol.resampled
    small = vol.downsampled((1, 2, 2))
    assert small.frame_slices is None and small.resampled
    assert small.mask_on_frames(np.ones(small.shape, bool)).shape == (len(files), 64, 64)


def test_not_resampled_mask_on_frames_identity(ref_volume) -> None:
    mask = ref_volume.array > 150
    assert not ref_volume.resampled
    assert ref_volume.mask_on_frames(mask) is not None
    np.testing.assert_array_equal(ref_volume.mask_on_frames(mask), mask)


# --------------------------------------------------------------------------- enhanced CT


def test_enhanced_ct_matches_single_frame(tmp_path: Path, ref_volume) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, enhanced=True)
    assert len(files) == 1
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.2" and int(ds.NumberOfFrames) == 20
    vol = load_series(files)
    np.testing.assert_array_equal(vol.array, ref_volume.array)
    np.testing.assert_allclose(vol.affine, ref_volume.affine, atol=1e-4)
    assert len(vol.frames) == 20 and len(vol.info.source_datasets) == 1
    assert sorted(fr.frame_number or 0 for fr in vol.frames) == list(range(1, 21))
    assert {fr.sop_instance_uid for fr in vol.frames} == {ds.SOPInstanceUID}
    # frame k of the volume is frame frames[k].frame_number of the object
    full = pydicom.dcmread(files[0]).pixel_array
    k = 4
    fn = vol.frames[k].frame_number
    assert fn is not None
    np.testing.assert_array_equal(vol.array[k], full[fn - 1].astype(int) - 1024)


def test_enhanced_ct_compressed_parallel(tmp_path: Path, ref_volume, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_series(SMALL_CT, tmp_path, size=SIZE, enhanced=True, transfer_syntax="j2k")
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    monkeypatch.setattr(decode_mod, "PARALLEL_MIN_FRAMES", 2)
    vol = load_series(files, decode_workers=2)
    np.testing.assert_array_equal(vol.array, ref_volume.array)


def test_source_datasets_build_a_seg(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    files = write_series(SMALL_CT, tmp_path, size=SIZE, tilt_deg=10)
    vol = load_series(files)
    frames_mask = vol.mask_on_frames(vol.array > 200)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="bone", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Bone, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=vol.info.source_datasets, pixel_array=frames_mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    refs = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {fr.sop_instance_uid for fr in vol.frames}


# --------------------------------------------------------------------------- errors


def test_mr_rejected(tmp_path: Path) -> None:
    files = write_series(MR, tmp_path, modality="MR")
    with pytest.raises(SeriesError, match="Modality is MR, the profile needs CT") as exc:
        load_series(files)
    assert exc.value.tag == "Modality"
    assert load_series(files, require_modality=None).info.modality == "MR"


def test_single_slice(ref_files: list[Path]) -> None:
    with pytest.raises(SeriesError, match="at least 2 slices") as exc:
        load_series(ref_files[:1])
    assert str(ref_files[0]) in str(exc.value)


def test_inconsistent_rows(tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files, tmp_path)
    ds = pydicom.dcmread(files[7])
    arr = ds.pixel_array[:48].copy()
    ds.Rows = 48
    ds.PixelData = arr.tobytes()
    ds.save_as(files[7])
    with pytest.raises(SeriesError) as exc:
        load_series(files)
    assert str(files[7]) in str(exc.value) and "48x64" in str(exc.value) and "64x64" in str(exc.value)


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry(tag: str, tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files, tmp_path)
    ds = pydicom.dcmread(files[2])
    delattr(ds, tag)
    ds.save_as(files[2])
    with pytest.raises(SeriesError) as exc:
        load_series(files)
    assert exc.value.tag == tag and exc.value.path == str(files[2])


def test_more_than_one_series(tmp_path: Path, ref_files: list[Path]) -> None:
    other = write_series(SMALL_CT, tmp_path, size=(32, 32, 4))
    with pytest.raises(SeriesError, match="more than one series"):
        load_series(list(ref_files) + other)
    groups = find_series([ref_files[0].parent, tmp_path])
    assert sorted(len(v) for v in groups.values()) == [4, 20]


def test_mixed_frame_of_reference(tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files, tmp_path)
    ds = pydicom.dcmread(files[4])
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(files[4])
    with pytest.raises(SeriesError, match="FrameOfReferenceUID") as exc:
        load_series(files)
    assert exc.value.tag == "FrameOfReferenceUID"


@pytest.mark.skipif(not J2K_DIR.exists(), reason="real J2K series missing")
@pytest.mark.parametrize("parallel", [False, True])
def test_corrupted_j2k_pixel_data(parallel: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _copy(sorted(J2K_DIR.iterdir())[:4], tmp_path)
    bad = files[2]
    ds = pydicom.dcmread(bad)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 5]])
    ds.save_as(bad)
    if parallel:
        monkeypatch.setattr(decode_mod, "PARALLEL_MIN_FRAMES", 2)
    with pytest.raises(SeriesError) as exc:
        load_series(files, decode_workers=2 if parallel else 1)
    assert str(bad) in str(exc.value) and "JPEG 2000" in str(exc.value) and exc.value.tag == "PixelData"


def test_truncated_file(tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files[:3], tmp_path)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 3000])
    with pytest.raises(SeriesError) as exc:
        load_series(files)
    assert str(files[1]) in str(exc.value)


def test_non_dicom_files(tmp_path: Path, ref_files: list[Path]) -> None:
    files = _copy(ref_files[:3], tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(pydicom.dcmread(files[0]))
    fs.write(tmp_path / "media")
    groups = find_series([tmp_path])
    assert list(groups.values()) != [] and all(p.name not in ("notes.txt", "DICOMDIR") for v in groups.values() for p in v)
    assert sum(len(v) for v in groups.values()) == 4  # 3 + the copy inside the file-set
    with pytest.raises(SeriesError, match="not a DICOM file"):
        load_series(files + [tmp_path / "s" / "notes.txt"])


def test_contrast_flag_and_headers(ref_volume, tmp_path: Path, ref_files: list[Path]) -> None:
    assert not ref_volume.info.contrast_applied
    files = _copy(ref_files[:2], tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ContrastBolusAgent = "NONE"
        ds.save_as(f)
    assert not load_series(files).info.contrast_applied
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ContrastBolusAgent = "IOMEPROL 400"
        ds.save_as(f)
    assert load_series(files).info.contrast_applied
    assert load_series(files, keep_headers=False).info.source_datasets == []


# --------------------------------------------------------------------------- synth tool


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_dciodvfy_accepts_explicit_series(ref_files: list[Path]) -> None:
    for f in (ref_files[0], ref_files[-1]):
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        out = res.stdout + res.stderr
        assert not [line for line in out.splitlines() if line.startswith("Error")], out


def test_synth_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = synth_main(["--nifti", str(SMALL_CT), "--out", str(tmp_path), "--size", "32x32x6", "--ts", "rle", "--localizer"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "wrote 7 file(s)" in out
    vol = load_series(sorted(tmp_path.glob("*.dcm")))
    assert vol.shape == (6, 32, 32)


@pytest.mark.parametrize("slope, intercept", [(1, 2**31 + 5), (1, -(2**31) - 7), (40000, -1024), (1, 2**40)])
def test_huge_rescale_values_load_as_float_without_overflow(tmp_path, slope, intercept):
    """Integral rescale values beyond int32 (or products beyond int16) give exact float32 HU, no OverflowError."""
    files = write_series(np.full((4, 8, 8), 40, np.int16), tmp_path, affine=np.diag([-2.0, -2.0, 2.0, 1.0]))
    raws = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
        raws.append(ds.pixel_array.astype(np.int64))
        ds.save_as(f)
    vol = load_series(files)
    assert vol.array.dtype == np.float32
    expected = np.float32(float(int(raws[0].max()) * slope + intercept))
    assert np.all(vol.array == expected)
