"""DICOM SEG writer/reader (node.pipeline.seg) on the real J2K series and synthetic geometry."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.errors import InputError
from node.pipeline import seg as S
from node.pipeline.series.load import load_series
from node.pipeline.volume import SeriesInfo, SourceFrame, Volume

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

needs_data = pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {J2K}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def volume() -> Volume:
    return load_series(sorted(J2K.glob("*.dcm")), decode_workers=1)


def _body(vol: Volume) -> np.ndarray:
    return vol.array > -500


def _specs(vol: Volume) -> list[S.SegmentSpec]:
    bone = vol.array > 300
    soft = (vol.array >= 40) & (vol.array <= 100) & _body(vol)
    return [
        S.SegmentSpec("bones cortical", "bone", "HU > 300", (241, 214, 145),
                      S.CATEGORY_TISSUE, S.TYPE_BONE, bone),
        S.SegmentSpec("soft tissue", "soft_tissue", "", (200, 80, 60),
                      S.CATEGORY_TISSUE, S.TYPE_SOFT_TISSUE, soft),
    ]


def _dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy; return its error lines (and print everything for info)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = (res.stdout + res.stderr).strip()
    print(f"dciodvfy {path.name}:\n{out}")
    return [ln for ln in out.splitlines() if "Error" in ln]


def _check_frames_match(ds: Dataset, vol: Volume, masks: list[np.ndarray]) -> int:
    """Every SEG frame equals mask_on_frames on the source frame it references."""
    on_frames = [vol.mask_on_frames(m) for m in masks]
    by_key = {S.source_key(f): n for n, f in enumerate(vol.frames)}
    px = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    seen = set()
    for idx, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_id = fg.get("SegmentIdentificationSequence") or \
            ds.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
        seg_num = int(seg_id[0].ReferencedSegmentNumber)
        src = fg.DerivationImageSequence[0].SourceImageSequence[0]
        key = (str(src.ReferencedSOPInstanceUID) if "ReferencedFrameNumber" not in src
               else (str(src.ReferencedSOPInstanceUID), int(src.ReferencedFrameNumber)))
        n = by_key[key]
        pos = np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(pos, vol.frames[n].position, atol=1e-3)
        assert np.array_equal(px[idx].astype(bool), on_frames[seg_num - 1][n]), (seg_num, n)
        seen.add((seg_num, n))
    # frames absent from the SEG must be empty in the input
    for s, fm in enumerate(on_frames, start=1):
        for n in range(len(vol.frames)):
            if (s, n) not in seen:
                assert not fm[n].any(), f"segment {s} frame {n} missing but not empty"
    return len(seen)


def _ct_header(*, study: str, series: str, for_uid: str, sop: str, ipp, iop, spacing,
               rows: int, cols: int, thickness: float = 2.0) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = "CT"
    ds.PatientID = "SYN0001"
    ds.PatientName = "Synthetic^Volume"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 3
    ds.SeriesDescription = "synthetic"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = thickness
    ds.ImageOrientationPatient = [float(x) for x in iop]
    ds.ImagePositionPatient = [float(x) for x in ipp]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


# ----------------------------------------------------------------------------- real series


@needs_data
def test_real_series_round_trip(volume: Volume, tmp_path: Path) -> None:
    specs = _specs(volume)
    out = tmp_path / "seg" / "out.dcm"
    t0 = time.perf_counter()
    S.write_seg(volume, specs, out, algorithm_version="1.2.3")
    print(f"write_seg {volume.shape}: {time.perf_counter() - t0:.2f} s")
    assert out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name != "out.dcm"], "temp file left"

    assert _dciodvfy(out) == []

    ds = pydicom.dcmread(out)
    src = volume.info.source_datasets[0]
    assert ds.SOPClassUID == S.SEGMENTATION_STORAGE == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    assert ds.ContentLabel == "SEGMENTATION"
    assert ds.SeriesInstanceUID != volume.info.series_instance_uid
    assert ds.StudyInstanceUID == volume.info.study_instance_uid
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.PatientID == src.PatientID
    assert int(ds.SeriesNumber) == 900 + int(src.SeriesNumber) % 100
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.info.series_instance_uid
    ref_uids = {str(i.ReferencedSOPInstanceUID)
                for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert ref_uids == {f.sop_instance_uid for f in volume.frames}

    assert len(ds.SegmentSequence) == 2
    for n, (item, spec) in enumerate(zip(ds.SegmentSequence, specs), start=1):
        assert item.SegmentNumber == n
        assert item.SegmentLabel == spec.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        alg = item.SegmentationAlgorithmIdentificationSequence[0]
        assert alg.AlgorithmName == "dicom-node HU" and alg.AlgorithmVersion == "1.2.3"
        fam = alg.AlgorithmFamilyCodeSequence[0]
        assert (fam.CodeValue, fam.CodingSchemeDesignator) == ("123105", "DCM")
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        typ = item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator, cat.CodeMeaning) == spec.category
        assert (typ.CodeValue, typ.CodingSchemeDesignator, typ.CodeMeaning) == spec.type
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(rgb, spec.color, atol=1), (rgb, spec.color)
    assert ds.SegmentSequence[0].SegmentDescription == "HU > 300"
    assert ds.SegmentSequence[1].SegmentDescription == "soft_tissue"

    # pixel data: every frame on the right source slice with the right pixels
    n = _check_frames_match(ds, volume, [s.mask for s in specs])
    assert n == int(ds.NumberOfFrames)

    # highdicom read-back
    seg = hd.seg.segread(out)
    assert seg.segment_numbers == [1, 2]
    assert seg.get_segment_description(1).segment_label == "bones cortical"
    uids = [f.sop_instance_uid for f in volume.frames]
    px = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    assert px.shape == (len(uids), 512, 512, 2)
    for s, spec in enumerate(specs):
        assert np.array_equal(px[..., s].astype(bool), spec.mask)

    # our reader
    masks = S.read_seg_masks(out)
    assert list(masks) == ["bones cortical", "soft tissue"]
    for spec in specs:
        assert set(masks[spec.label]) == set(uids)
        for k, f in enumerate(volume.frames):
            assert np.array_equal(masks[spec.label][S.source_key(f)], spec.mask[k])


@needs_data
def test_empty_segment_and_given_series(volume: Volume, tmp_path: Path) -> None:
    specs = _specs(volume)
    empty = S.SegmentSpec("fat", "fat", "", (230, 220, 60), S.CATEGORY_TISSUE, S.TYPE_FAT,
                          np.zeros(volume.shape, bool))
    # a segment present in one slice only: other frames must be absent
    one = np.zeros(volume.shape, bool)
    one[5, 100:110, 200:230] = True
    spot = S.SegmentSpec("spot", "spot", "", (0, 0, 255), S.CATEGORY_ANATOMICAL_STRUCTURE,
                         S.TYPE_LIVER, one)
    uid = hd.UID()
    out = tmp_path / "empty.dcm"
    ds = S.write_seg(volume, [specs[0], empty, spot], out, algorithm_version="1",
                     series_instance_uid=uid, series_number=42, series_description="test seg")
    assert _dciodvfy(out) == []
    ds = pydicom.dcmread(out)
    assert ds.SeriesInstanceUID == uid and ds.SeriesNumber == 42
    assert ds.SeriesDescription == "test seg"
    assert [int(i.SegmentNumber) for i in ds.SegmentSequence] == [1, 2, 3]
    nums = [int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for fg in ds.PerFrameFunctionalGroupsSequence]
    assert 2 not in nums and nums.count(3) == 1
    _check_frames_match(ds, volume, [specs[0].mask, empty.mask, one])
    masks = S.read_seg_masks(ds)
    assert all(not m.any() for m in masks["fat"].values())
    assert len(masks["fat"]) == len(volume.frames)
    assert sum(int(m.any()) for m in masks["spot"].values()) == 1

    # the instance UID follows from the given series UID: a re-run (retried job) writes the same
    # instance, so a PACS that got the SEG from the first try stores it once
    again = S.write_seg(volume, [specs[0], empty, spot], tmp_path / "again.dcm", algorithm_version="1",
                        series_instance_uid=uid, series_number=42, series_description="test seg")
    assert again.SOPInstanceUID == ds.SOPInstanceUID != uid
    other = S.write_seg(volume, [specs[0]], tmp_path / "other.dcm", algorithm_version="1",
                        series_instance_uid=hd.UID())
    assert other.SOPInstanceUID != ds.SOPInstanceUID

    # all segments empty: still a valid SEG (highdicom then keeps all frames)
    out2 = tmp_path / "all_empty.dcm"
    first = S.write_seg(volume, [empty], out2, algorithm_version="1")
    assert _dciodvfy(out2) == []
    assert S.write_seg(volume, [empty], tmp_path / "x.dcm", algorithm_version="1").SOPInstanceUID != \
        first.SOPInstanceUID  # no series UID given: new UIDs each time
    masks = S.read_seg_masks(out2)
    assert len(masks["fat"]) == len(volume.frames)
    assert not any(m.any() for m in masks["fat"].values())


@needs_data
def test_overlapping_segments(volume: Volume, tmp_path: Path) -> None:
    """Overlapping masks go through the stacked (4D) path; disjoint ones are NO overlap."""
    body = _body(volume)
    bone = volume.array > 300
    specs = [S.SegmentSpec("body", "body", "", (177, 122, 101),
                           S.CATEGORY_ANATOMICAL_STRUCTURE, S.TYPE_SOFT_TISSUE, body),
             S.SegmentSpec("bone", "bone", "", (241, 214, 145), S.CATEGORY_TISSUE,
                           S.TYPE_BONE, bone)]
    out = tmp_path / "overlap.dcm"
    S.write_seg(volume, specs, out, algorithm_version="1")
    assert _dciodvfy(out) == []
    ds = pydicom.dcmread(out)
    assert ds.SegmentsOverlap == "YES"
    _check_frames_match(ds, volume, [body, bone])
    masks = S.read_seg_masks(out)
    for k, f in enumerate(volume.frames):
        assert np.array_equal(masks["body"][f.sop_instance_uid], body[k])
        assert np.array_equal(masks["bone"][f.sop_instance_uid], bone[k])

    ds2 = S.write_seg(volume, _specs(volume), tmp_path / "disjoint.dcm", algorithm_version="1")
    assert ds2.SegmentsOverlap == "NO"


@needs_data
def test_source_errors(volume: Volume, tmp_path: Path) -> None:
    specs = _specs(volume)[:1]

    def variant(**changes) -> Volume:
        heads = [copy.deepcopy(d) for d in volume.info.source_datasets]
        for h in heads:
            for kw, val in changes.items():
                if val is None:
                    if kw in h:
                        delattr(h, kw)
                else:
                    setattr(h, kw, val)
        info = copy.copy(volume.info)
        info.source_datasets = heads
        return Volume(volume.array, volume.affine, info, volume.frames)

    # headers without a FrameOfReferenceUID (issue 16): the SEG takes the volume's
    no_for = S.write_seg(variant(FrameOfReferenceUID=None), specs, tmp_path / "for" / "a.dcm",
                         algorithm_version="1")
    assert str(no_for.FrameOfReferenceUID) == volume.info.frame_of_reference_uid
    shutil.rmtree(tmp_path / "for")
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        S.write_seg(variant(FrameOfReferenceUID="1.2.3.4"), specs, tmp_path / "a.dcm",
                    algorithm_version="1")
    with pytest.raises(InputError, match="StudyInstanceUID"):
        S.write_seg(variant(StudyInstanceUID=""), specs, tmp_path / "b.dcm",
                    algorithm_version="1")
    info = copy.copy(volume.info)
    info.source_datasets = []
    with pytest.raises(InputError):
        S.write_seg(Volume(volume.array, volume.affine, info, volume.frames), specs,
                    tmp_path / "c.dcm", algorithm_version="1")
    with pytest.raises(ValueError):
        S.write_seg(volume, specs, tmp_path / "d.dcm", algorithm_version="1",
                    series_instance_uid=volume.info.series_instance_uid)
    assert not list(tmp_path.iterdir()), "failed writes must not leave files"


# ----------------------------------------------------------------------------- synthetic


def _tilted_volume(tilt_deg: float = 15.0) -> tuple[Volume, np.ndarray]:
    """Gantry-tilted frames resampled to an axis-aligned grid, and the centre of a sphere in it."""
    rows = cols = 48
    n = 14
    t = np.deg2rad(tilt_deg)
    row_cos = np.array([1.0, 0.0, 0.0])
    col_cos = np.array([0.0, np.cos(t), np.sin(t)])
    iop = np.concatenate([row_cos, col_cos])
    spacing = (2.0, 2.0)
    dz = 3.0
    study, series, for_uid = hd.UID(), hd.UID(), hd.UID()
    frames, heads = [], []
    # uneven spacing too: one gap is doubled
    zs = [k * dz + (dz if k >= 9 else 0.0) for k in range(n)]
    for z in zs:
        ipp = np.array([-48.0, -40.0, z])
        sop = hd.UID()
        frames.append(SourceFrame(None, None, sop, ipp, iop, spacing, rows, cols))
        heads.append(_ct_header(study=study, series=series, for_uid=for_uid, sop=sop, ipp=ipp,
                                iop=iop, spacing=spacing, rows=rows, cols=cols))
    # axis-aligned 1.5 mm grid covering the tilted stack
    step = 1.5
    origin = np.array([-48.0, -42.0, -12.0])
    shape = (int(60 / step), int(110 / step), int(100 / step))  # k, j, i
    affine = np.eye(4)
    affine[:3, :3] = np.diag([step, step, step])
    affine[:3, 3] = origin
    centre = np.array([0.0, 5.0, 20.0])
    info = SeriesInfo(series, study, for_uid, "CT", "synthetic tilted", 3,
                      source_datasets=heads)
    vol = Volume(np.zeros(shape, np.float32), affine, info, frames, resampled=True)
    return vol, centre


def test_resampled_tilted_volume(tmp_path: Path) -> None:
    vol, centre = _tilted_volume()
    mask = np.zeros(vol.shape, bool)
    kk, jj, ii = np.indices(vol.shape)
    pts = np.stack([ii, jj, kk], -1) @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    mask = np.linalg.norm(pts - centre, axis=-1) <= 14.0
    half = pts[..., 0] > 0  # second segment: half of the sphere
    specs = [S.SegmentSpec("ball", "ball", "", (255, 0, 0), S.CATEGORY_TISSUE,
                           S.TYPE_SOFT_TISSUE, mask),
             S.SegmentSpec("half ball", "half", "", (0, 255, 0), S.CATEGORY_TISSUE,
                           S.TYPE_MUSCLE, mask & half)]
    out = tmp_path / "tilt.dcm"
    S.write_seg(vol, specs, out, algorithm_version="1")
    assert _dciodvfy(out) == []
    ds = pydicom.dcmread(out)
    _check_frames_match(ds, vol, [s.mask for s in specs])

    # independent check: SEG pixels vs the analytic sphere at each source pixel centre
    masks = S.read_seg_masks(out)
    agree = total = 0
    for f in vol.frames:
        jj2, ii2 = np.mgrid[0:f.rows, 0:f.columns]
        p = f.pixel_to_patient() @ np.stack([ii2.ravel(), jj2.ravel(),
                                             np.zeros(ii2.size), np.ones(ii2.size)])
        truth = (np.linalg.norm(p[:3].T - centre, axis=1) <= 14.0).reshape(f.rows, f.columns)
        got = masks["ball"][f.sop_instance_uid]
        agree += int((got == truth).sum())
        total += truth.size
        if truth.sum() > 20:  # slices through the ball have pixels on them
            assert got.any()
    assert agree / total > 0.98, agree / total
    # tilted slices: the in-plane centre of the disk moves down the rows with z
    rows_c = [np.argwhere(masks["ball"][f.sop_instance_uid])[:, 0].mean()
              for f in vol.frames if masks["ball"][f.sop_instance_uid].sum() > 50]
    assert rows_c[0] > rows_c[-1]


def test_enhanced_ct_multiframe_source(tmp_path: Path) -> None:
    """A single Enhanced CT source; volume frames listed in a different order than frames."""
    rows, cols, n = 32, 40, 10
    iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    study, series, for_uid, sop = hd.UID(), hd.UID(), hd.UID(), hd.UID()
    src = _ct_header(study=study, series=series, for_uid=for_uid, sop=sop, ipp=[0, 0, 0],
                     iop=iop, spacing=(1.0, 1.0), rows=rows, cols=cols)
    src.SOPClassUID = ENHANCED_CT_STORAGE
    del src.ImagePositionPatient, src.ImageOrientationPatient, src.PixelSpacing
    del src.SliceThickness
    src.NumberOfFrames = n
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [1.0, 1.0]
    pm.SliceThickness = 2.0
    shared.PixelMeasuresSequence = [pm]
    po = Dataset()
    po.ImageOrientationPatient = iop
    shared.PlaneOrientationSequence = [po]
    src.SharedFunctionalGroupsSequence = [shared]
    per = []
    # frame 1 is the top slice (z descending with frame number)
    zs = [2.0 * (n - 1 - f) for f in range(n)]
    for z in zs:
        item, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [-10.0, -20.0, z]
        item.PlanePositionSequence = [pp]
        per.append(item)
    src.PerFrameFunctionalGroupsSequence = per

    order = sorted(range(n), key=lambda f: zs[f])  # volume slice k -> frame index
    frames = [SourceFrame(None, f + 1, sop, np.array([-10.0, -20.0, zs[f]]), np.array(iop),
                          (1.0, 1.0), rows, cols) for f in order]
    affine = frames[0].pixel_to_patient()
    affine[:3, 2] = [0, 0, 2.0]
    info = SeriesInfo(series, study, for_uid, "CT", "enhanced", 5, source_datasets=[src])
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 100, (n, rows, cols)).astype(np.float32)
    vol = Volume(arr, affine, info, frames)
    m = arr > 50
    m[3] = False
    m2 = arr > 0  # overlaps m -> stacked path with frame reordering
    specs = [S.SegmentSpec("noise", "noise", "", (10, 200, 10), S.CATEGORY_TISSUE,
                           S.TYPE_BLOOD, m),
             S.SegmentSpec("positive", "pos", "", (200, 10, 10), S.CATEGORY_TISSUE,
                           S.TYPE_MUSCLE, m2)]
    out = tmp_path / "mf.dcm"
    S.write_seg(vol, specs, out, algorithm_version="1", algorithm_family=S.ALGORITHM_FAMILY_AI)
    assert _dciodvfy(out) == []
    ds = pydicom.dcmread(out)
    assert int(ds.NumberOfFrames) == (n - 1) + n
    assert ds.SegmentsOverlap == "YES"
    _check_frames_match(ds, vol, [m, m2])
    masks = S.read_seg_masks(out)
    assert set(masks["noise"]) == {S.source_key(f) for f in vol.frames}
    for k, f in enumerate(vol.frames):
        assert np.array_equal(masks["noise"][S.source_key(f)], m[k])
        assert np.array_equal(masks["positive"][S.source_key(f)], m2[k])

    # single segment, disjoint (label-map) path with frame reordering
    out1 = tmp_path / "mf1.dcm"
    S.write_seg(vol, specs[:1], out1, algorithm_version="1")
    assert _dciodvfy(out1) == []
    ds1 = pydicom.dcmread(out1)
    assert int(ds1.NumberOfFrames) == n - 1
    _check_frames_match(ds1, vol, [m])


def test_large_seg_round_trip(tmp_path: Path) -> None:
    """400 x 512 x 512, 2 segments: writes and reads back (timing is printed, not asserted:
    speed is checked by bench/, these machines are shared and noisy)."""
    n, rows, cols = 400, 512, 512
    study, series, for_uid = hd.UID(), hd.UID(), hd.UID()
    iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    frames, heads = [], []
    for k in range(n):
        sop = hd.UID()
        ipp = np.array([-250.0, -250.0, -800.0 + 1.25 * k])
        frames.append(SourceFrame(None, None, sop, ipp, iop, (0.98, 0.98), rows, cols))
        heads.append(_ct_header(study=study, series=series, for_uid=for_uid, sop=sop, ipp=ipp,
                                iop=iop, spacing=(0.98, 0.98), rows=rows, cols=cols))
    affine = frames[0].pixel_to_patient()
    affine[:3, 2] = [0, 0, 1.25]
    info = SeriesInfo(series, study, for_uid, "CT", "big", 2, source_datasets=heads)
    vol = Volume(np.zeros((n, rows, cols), np.int16), affine, info, frames)
    jj, ii = np.ogrid[0:rows, 0:cols]
    disk = (jj - 256) ** 2 + (ii - 256) ** 2 < 180 ** 2
    ring = disk & ~((jj - 256) ** 2 + (ii - 256) ** 2 < 150 ** 2)
    m1 = np.broadcast_to(disk, vol.shape).copy()
    m1[:50] = False
    m2 = np.broadcast_to(ring, vol.shape).copy()
    specs = [S.SegmentSpec("body", "body", "", (200, 150, 120), S.CATEGORY_ANATOMICAL_STRUCTURE,
                           S.TYPE_SOFT_TISSUE, m1),
             S.SegmentSpec("shell", "bone", "", (241, 214, 145), S.CATEGORY_TISSUE,
                           S.TYPE_BONE, m2)]
    out = tmp_path / "big.dcm"
    t0 = time.perf_counter()
    S.write_seg(vol, specs, out, algorithm_version="1")
    dt = time.perf_counter() - t0
    size = out.stat().st_size / 1e6
    print(f"write_seg 400x512x512 x2 segments: {dt:.2f} s, {size:.1f} MB")
    t0 = time.perf_counter()
    masks = S.read_seg_masks(out)
    print(f"read_seg_masks: {time.perf_counter() - t0:.2f} s")
    assert np.array_equal(masks["shell"][frames[123].sop_instance_uid], ring)
    assert not masks["body"][frames[10].sop_instance_uid].any()


# ----------------------------------------------------------------------------- label map


def _reference_labels(masks: list[np.ndarray]) -> np.ndarray | None:
    """What _frame_arrays built before _label_map: an overlap test, then labels[m] = s."""
    if S._overlap(masks):
        return None
    labels = np.zeros(masks[0].shape, np.uint8)
    for s, m in enumerate(masks, start=1):
        labels[m] = s
    return labels


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (37, 300, 301), (5, 1100, 1000)])
@pytest.mark.parametrize("overlap_at", [None, "first", "last", "middle"])
def test_label_map_equals_overlap_test_and_labels(shape: tuple[int, int, int], overlap_at: str | None) -> None:
    rng = np.random.default_rng(sum(shape))
    choice = rng.integers(0, 4, size=shape)  # 0 = background, s = segment s: disjoint
    masks = [choice == s for s in (1, 2, 3)]
    if overlap_at is not None:
        k = {"first": 0, "last": shape[0] - 1, "middle": shape[0] // 2}[overlap_at]
        masks[2][k, -1, -1] = masks[0][k, -1, -1] = True  # one shared voxel
    got = S._label_map(masks, np.uint8)
    want = _reference_labels(masks)
    if want is None:
        assert got is None
    else:
        assert got is not None and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


def test_label_map_one_and_empty_masks() -> None:
    m = np.zeros((3, 4, 5), bool)
    m[1, 2, 3] = True
    np.testing.assert_array_equal(S._label_map([m], np.uint8), m.astype(np.uint8))
    np.testing.assert_array_equal(S._label_map([np.zeros_like(m), m], np.uint16), 2 * m.astype(np.uint16))
    assert S._label_map([m, m], np.uint8) is None


def test_warm_up_loads_highdicom_tables():
    """The preload the pipeline runs in the background really fills highdicom's table caches."""
    from highdicom import _standard_utils as standard

    from node.pipeline.seg import warm_up

    standard.get_module_attribute_map.cache_clear()
    assert standard.get_module_attribute_map.cache_info().currsize == 0
    assert warm_up() is True
    assert standard.get_module_attribute_map.cache_info().currsize == 1
