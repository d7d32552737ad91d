"""Result objects beside the SEG (issue 14): measurements SR, overlay series, Encapsulated STL.

Made by the real pipeline from the shared J2K CT series, then checked as a PACS and a reader
would: dciodvfy on every object, the SR read back with highdicom against report.json, an overlay
slice's pixels against the SEG, geometry against the source.  Overlay PNGs are kept as test
artifacts in ``tests/.artifacts/outputs/`` (look at them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.pipeline.outputs import OutputOptions, dicom_objects
from node.pipeline.outputs.common import FrameMasks
from node.pipeline.outputs.encapsulated_stl import ENCAPSULATED_STL
from node.pipeline.outputs.overlay import (
    SECONDARY_CAPTURE,
    OverlayStyle,
    OverlayTissue,
    _Painter,
    overlay_series_description,
    read_overlay_rgb,
    write_overlay_series,
)
from node.pipeline.outputs.sr import COMPREHENSIVE_3D_SR, read_measurements
from node.pipeline.run import run_pipeline
from node.pipeline.seg import read_seg_masks
from node.pipeline.volume import SeriesInfo, SourceFrame, Volume
from node.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
ARTIFACTS = Path(os.environ.get("NODE_TEST_ARTIFACTS", REPO / "tests" / ".artifacts")) / "outputs"

needs_data = pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {J2K}")
ALL = OutputOptions(("seg", "sr", "overlay", "stl"))


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path`` (skips when dicom3tools is missing)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    res = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=120)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not J2K.is_dir():
        pytest.skip(f"test data not found at {J2K}")
    out = tmp_path_factory.mktemp("outputs") / "liver"
    res = run_pipeline([J2K], "liver", out, seg_series_uid="1.2.826.0.1.3680043.8.498.14001", outputs=ALL)
    return res


@needs_data
def test_report_names_every_object_and_each_passes_dciodvfy(run: Any) -> None:
    out = run.output_dir
    report = json.loads((out / "report.json").read_text())
    o = report["outputs"]
    assert o["sr"] == "liver_sr.dcm"
    assert len(o["overlay"]) == 20 and all(p.startswith("liver_overlay/") for p in o["overlay"])
    assert o["encapsulated_stl"] == ["liver_stl_01_liver_tissue.dcm", "liver_stl_02_liver_vessels.dcm"]
    assert "outputs" in report["timings_s"]
    files = [out / p for p in dicom_objects(report)] + [out / o["seg"]]
    assert len(files) == 1 + 20 + 2 + 1
    errors = {p.name: e for p in files if (e := dciodvfy_errors(p))}
    assert not errors, errors
    # one study, each kind its own series, SOP classes as meant
    by_class: dict[str, set[str]] = {}
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.StudyInstanceUID == run.volume.info.study_instance_uid
        by_class.setdefault(str(ds.SOPClassUID), set()).add(str(ds.SeriesInstanceUID))
    assert set(by_class) == {COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, ENCAPSULATED_STL, "1.2.840.10008.5.1.4.1.1.66.4"}
    assert all(len(v) == 1 for v in by_class.values())
    assert len(set().union(*by_class.values()) | {run.volume.info.series_instance_uid}) == 5


@needs_data
def test_default_outputs_write_nothing_new(tmp_path: Path) -> None:
    """Without outputs= (and with the default [seg]) the run is what it was: no new files, no new keys."""
    res = run_pipeline([J2K], "liver", tmp_path / "r", outputs=OutputOptions(), write_meshes=False, qc=False)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["liver_seg.dcm", "report.json"]
    assert set(res.report["outputs"]) == {"seg", "seg_series_instance_uid", "meshes"}


@needs_data
def test_sr_reads_back_the_report_volumes_and_references_the_seg(run: Any) -> None:
    out = run.output_dir
    report = json.loads((out / "report.json").read_text())
    seg = pydicom.dcmread(out / "liver_seg.dcm", stop_before_pixels=True)
    got = read_measurements(out / "liver_sr.dcm")
    assert set(got) == {"liver tissue", "liver vessels"}
    labels = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    for name, info in report["tissues"].items():
        m = got[f"liver {name}"]
        assert m.segment_number == labels[f"liver {name}"]
        assert m.values["volume_ml_voxels"] == pytest.approx(info["volume_ml_voxels"], abs=1e-6)
        assert m.values["volume_ml_mesh"] == pytest.approx(info["volume_ml_mesh"], abs=1e-6)
        hu = run.volume.array[run.masks[name]].astype(float)
        assert m.values["hu_mean"] == pytest.approx(hu.mean(), abs=0.01)
        assert m.values["hu_std"] == pytest.approx(hu.std(), abs=0.01)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(out / "liver_sr.dcm"))
    report_content = sr.content
    assert isinstance(report_content, hd.sr.MeasurementReport)
    groups = report_content.get_volumetric_roi_measurement_groups()
    for g in groups:
        ref = g.referenced_segment
        assert ref is not None and ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        source = ref.source_series_for_segmentation
        assert source is not None and source.value == run.volume.info.series_instance_uid
    # the profile, backend and version are in the algorithm identification
    ds = pydicom.dcmread(out / "liver_sr.dcm")
    texts = {str(i.get("TextValue", "")) for i in _walk(ds)}
    assert {"profile=liver", "backend=hu_based"} <= texts
    # the planar companion (same tracking UID) outlines the tissue on an existing source slice
    planar = report_content.get_planar_roi_measurement_groups()
    assert {str(p.tracking_identifier) for p in planar} == {"liver tissue", "liver vessels"}
    sops = {f.sop_instance_uid for f in run.volume.frames}
    for p in planar:
        assert p.roi is not None
        assert p.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sops


def _walk(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_walk(item))
    return out


@needs_data
def test_overlay_slice_pixels_match_the_seg(run: Any, tmp_path: Path) -> None:
    """Render one slice uncompressed: a pixel is tinted exactly where the SEG has a tissue (outside
    the legend and banner), grey elsewhere; the JPEG series agrees within JPEG's error."""
    out = run.output_dir
    vol = run.volume
    seg_masks = read_seg_masks(out / "liver_seg.dcm")
    prof = load_profile("liver")
    names = [t.name for t in prof.tissues]
    fm = FrameMasks.of(vol, run.masks, names)
    tissues = [OverlayTissue(t.name, t.color, f"liver {t.name}") for t in prof.tissues]
    raw = write_overlay_series(vol, fm, tissues, tmp_path / "raw", style=OverlayStyle(jpeg=False),
                               profile_name="liver")
    n = int(np.argmax(fm.get("tissue").reshape(len(vol.frames), -1).sum(axis=1)))  # most liver
    sop = vol.frames[n].sop_instance_uid
    union = seg_masks["liver tissue"][sop] | seg_masks["liver vessels"][sop]
    assert union.sum() > 5000
    rgb = read_overlay_rgb(raw[n]).astype(int)
    painter = _Painter(vol.frames[0].rows, vol.frames[0].columns, tissues, OverlayStyle(), (40.0, 300.0), "liver")
    free = ~painter.reserved(*union.shape)
    tinted = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) > 0
    assert np.array_equal(tinted[free], union[free])
    # inside a tissue (away from its edge) the colour is the profile colour blended over grey
    k5 = np.ones((5, 5), np.uint8)
    vessels_near = cv2.dilate(seg_masks["liver vessels"][sop].astype(np.uint8), k5).astype(bool)  # drawn on top
    inner = cv2.erode(seg_masks["liver tissue"][sop].astype(np.uint8), k5).astype(bool) & free & ~vessels_near
    color = np.array(prof.tissues[0].color, float)
    gray = painter.gray(vol.array[n]).astype(float)
    expect = np.floor(gray[inner, None] + (color - gray[inner, None]) * 0.4 + 0.5)
    assert np.abs(rgb[inner] - expect).max() <= 1
    # the JPEG overlay the run wrote: same picture within compression error
    jpg = read_overlay_rgb(out / "liver_overlay" / raw[n].name).astype(int)
    tinted_j = (np.abs(jpg[..., 0] - jpg[..., 1]) + np.abs(jpg[..., 1] - jpg[..., 2])) > 24
    inter = (tinted_j & union & free).sum()
    dice = 2 * inter / ((tinted_j & free).sum() + (union & free).sum())
    assert dice > 0.9, dice
    assert np.abs(jpg - rgb).mean() < 3.0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(ARTIFACTS / f"overlay_fill_slice{n + 1:02d}.png"), cv2.cvtColor(jpg.astype(np.uint8),
                                                                                cv2.COLOR_RGB2BGR))
    outline = write_overlay_series(vol, fm, tissues, tmp_path / "outline", style=OverlayStyle(mode="outline"),
                                   profile_name="liver")
    cv2.imwrite(str(ARTIFACTS / f"overlay_outline_slice{n + 1:02d}.png"),
                cv2.cvtColor(read_overlay_rgb(outline[n]), cv2.COLOR_RGB2BGR))


@needs_data
def test_overlay_geometry_is_the_source_slices(run: Any) -> None:
    out = run.output_dir
    files = sorted((out / "liver_overlay").glob("*.dcm"))
    assert len(files) == len(run.volume.frames)
    series = set()
    for f, fr in zip(files, run.volume.frames):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == SECONDARY_CAPTURE
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
        assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.BurnedInAnnotation == "YES"
        assert ds.FrameOfReferenceUID == run.volume.info.frame_of_reference_uid
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], fr.position, atol=1e-4)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], fr.orientation, atol=1e-6)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(fr.pixel_spacing))
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == fr.sop_instance_uid
        assert (ds.Rows, ds.Columns) == (fr.rows, fr.columns)
    assert len(series) == 1
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SeriesDescription == f"OVERLAY liver {run.volume.info.series_description}"[:64]


def test_series_description_template() -> None:
    f = {"profile": "bones", "SeriesDescription": "CT Body 3.0", "mode": "fill"}
    assert overlay_series_description("OVERLAY {profile} {SeriesDescription}", f) == "OVERLAY bones CT Body 3.0"
    assert overlay_series_description("{profile} ({mode}) {unknown}", f) == "bones (fill) {unknown}"
    assert len(overlay_series_description("x" * 100, f)) == 64


@needs_data
def test_encapsulated_stl_holds_the_mesh_in_the_source_frame_of_reference(run: Any) -> None:
    out = run.output_dir
    for name in ("tissue", "vessels"):
        p = next(out.glob(f"liver_stl_*_liver_{name}.dcm"))
        ds = pydicom.dcmread(p)
        assert ds.SOPClassUID == ENCAPSULATED_STL and ds.Modality == "M3D"
        assert ds.FrameOfReferenceUID == run.volume.info.frame_of_reference_uid
        assert ds.MIMETypeOfEncapsulatedDocument == "model/stl"
        assert ds.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
        assert ds.DocumentTitle == f"liver {name}"
        stl = (out / f"liver_{name}.stl").read_bytes()
        assert bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)] == stl


def test_outputs_options_round_trip_through_job_params() -> None:
    opts = OutputOptions(("seg", "overlay"), OverlayStyle(mode="outline", opacity=0.5, window=(300, 1500)),
                         "{profile} overlay")
    assert OutputOptions.from_params(json.loads(json.dumps(opts.to_params()))) == opts
    assert OutputOptions.from_params({}) == OutputOptions()  # a job recorded before outputs existed
    with pytest.raises(ValueError, match="unknown output"):
        OutputOptions(("seg", "pdf"))


def _synthetic(n: int, rows: int = 512, cols: int = 512) -> tuple[Volume, dict[str, np.ndarray]]:
    from pydicom.dataset import Dataset

    study, series, for_uid = hd.UID(), hd.UID(), hd.UID()
    iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    frames, heads = [], []
    for k in range(n):
        sop = hd.UID()
        ipp = np.array([-250.0, -250.0, -800.0 + 1.25 * k])
        frames.append(SourceFrame(None, None, sop, ipp, iop, (0.98, 0.98), rows, cols))
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
        ds.Modality, ds.PatientID, ds.PatientName, ds.SliceThickness = "CT", "SYN", "Syn^Thetic", 1.25
        heads.append(ds)
    affine = frames[0].pixel_to_patient()
    affine[:3, 2] = [0, 0, 1.25]
    jj, ii = np.ogrid[0:rows, 0:cols]
    r2 = (jj - 256) ** 2 + (ii - 256) ** 2
    body = np.where(r2 < 200 ** 2, 40, -1000).astype(np.int16)
    arr = np.broadcast_to(body, (n, rows, cols)).copy()
    arr[:, 200:300, 200:300] = 700
    vol = Volume(arr, affine, SeriesInfo(series, study, for_uid, "CT", "big", 2, source_datasets=heads), frames)
    return vol, {"bone": arr > 300, "soft": (arr > 0) & (arr < 100)}


@pytest.mark.slow
def test_overlay_of_400_slices_is_fast_and_small(tmp_path: Path) -> None:
    """400 x 512 x 512: time and size printed (not asserted tightly: these machines are shared)."""
    vol, masks = _synthetic(400)
    fm = FrameMasks.of(vol, masks, ["bone", "soft"])
    tissues = [OverlayTissue("bone", (241, 214, 145)), OverlayTissue("soft", (200, 80, 60))]
    t0 = time.perf_counter()
    files = write_overlay_series(vol, fm, tissues, tmp_path / "ov", profile_name="synthetic")
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"overlay 400 x 512 x 512: {dt:.2f} s, {size:.1f} MB ({size / 400 * 1000:.0f} kB per slice)")
    assert len(files) == 400
    assert dt < 60 and size < 40
    assert not dciodvfy_errors(files[200])


@needs_data
def test_overlay_on_a_working_grid_shows_the_source_pixels(tmp_path: Path) -> None:
    """Segmented on a coarser grid, the overlay still shows each source slice's own pixels (not
    the block-averaged working grid), with the masks mapped back onto the source frames."""
    from node.pipeline.series.load import load_series

    opts = OutputOptions(("seg", "overlay"), OverlayStyle(jpeg=False))
    res = run_pipeline([J2K], "liver", tmp_path / "r", working_grid_mm=3.0, outputs=opts, write_meshes=False)
    assert res.report["input"]["working_grid"] is not None
    native = load_series(sorted(J2K.glob("*.dcm")), decode_workers=1)
    files = sorted((tmp_path / "r" / "liver_overlay").glob("*.dcm"))
    prof = load_profile("liver")
    tissues = [OverlayTissue(t.name, t.color, f"liver {t.name}") for t in prof.tissues]
    painter = _Painter(512, 512, tissues, OverlayStyle(), (40.0, 300.0), "liver")  # the run's legend
    n = 10
    rgb = read_overlay_rgb(files[n]).astype(int)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    grey &= ~painter.reserved(512, 512)
    expect = painter.gray(native.array[n]).astype(int)
    assert grey.sum() > 100_000
    assert np.array_equal(rgb[..., 0][grey], expect[grey])
