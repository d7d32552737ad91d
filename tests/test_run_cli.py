"""``dicom-node run`` on the real JPEG 2000 series: outputs, report, SEG validity, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.pipeline.mesh.files import check_stl
from node.pipeline.seg import read_seg_masks
from node.pipeline.series.find import find_series
from node.pipeline.series.load import load_series

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
PUBLISHED = DATA / "ct-abdomen-siemens-j2k" / "dicom-as-published"
CLI = [sys.executable, "-m", "node.cli"]

pytestmark = pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def liver_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("liver")
    res = _run("run", "--input", str(J2K), "--organ", "liver", "--output", str(out))
    assert res.returncode == 0, res.stderr
    return out, res


def test_outputs_and_report(liver_run):
    out, res = liver_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "liver_seg.dcm",
            "liver_tissue.stl",
            "liver_tissue_colored.ply",
            "liver_vessels.stl",
            "liver_vessels_colored.ply",
            "qc",  # the QC pictures (tests/test_qc.py)
            "report.json",
        ]
    )
    # progress for each stage on stderr
    for stage in ("load", "segment", "mesh", "seg", "report"):
        assert f" {stage} " in res.stderr, res.stderr
    rep = json.loads((out / "report.json").read_text())
    src = pydicom.dcmread(next(J2K.iterdir()), stop_before_pixels=True)
    assert rep["input"]["series_instance_uid"] == src.SeriesInstanceUID
    assert rep["input"]["spacing_mm_ijk"] == [0.9766, 0.9766, 2.0]  # spacing from positions, not SliceThickness 3
    assert rep["profile"] == {
        "name": "liver",
        "source": str(REPO / "profiles" / "liver.yaml"),
        "model_type": "hu_based",
        "phase": "contrast",  # ContrastBolusAgent APPLIED
    }
    assert rep["software"]["name"] == "dicom-node"
    for stage in ("load", "segment", "mesh", "seg", "total"):
        assert rep["timings_s"][stage] >= 0
    liver = rep["tissues"]["tissue"]
    assert liver["voxels"] > 100_000
    vox_ml = 0.9765625 * 0.9765625 * 2.0 / 1000
    assert liver["volume_ml_voxels"] == pytest.approx(liver["voxels"] * vox_ml, rel=1e-3)
    # smoothing keeps volume: mesh and voxel volumes agree within a few percent
    assert liver["volume_ml_mesh"] == pytest.approx(liver["volume_ml_voxels"], rel=0.05)
    assert liver["watertight"] is True and liver["triangles"] > 1000


def test_meshes_on_disk_are_printable_and_in_patient_space(liver_run):
    out, _ = liver_run
    check = check_stl(out / "liver_tissue.stl")
    assert check.printable, check
    assert check.header.startswith("SPACE=LPS")
    vol = load_series(next(iter(find_series([J2K]).values())))
    # the mesh lies inside the volume's LPS bounding box (not in voxel indices)
    corners = np.array([[i, j, k, 1] for i in (0, 511) for j in (0, 511) for k in (0, 19)], float)
    lps = (vol.affine @ corners.T).T[:, :3]
    from node.pipeline.mesh.files import load_stl

    mesh = load_stl(out / "liver_tissue.stl")
    assert (mesh.vertices.min(0) >= lps.min(0) - 2).all() and (mesh.vertices.max(0) <= lps.max(0) + 2).all()
    # liver is on the patient's right: LPS x < 0 for most of it
    assert mesh.centroid[0] < 0


def test_seg_is_valid_and_matches_report(liver_run):
    out, _ = liver_run
    seg = out / "liver_seg.dcm"
    res = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
    assert not errors, errors
    ds = pydicom.dcmread(seg)
    for item in ds.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "dicom-node HU threshold"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123105"
    masks = read_seg_masks(seg)
    rep = json.loads((out / "report.json").read_text())
    assert set(masks) == {"liver tissue", "liver vessels"}
    total = sum(int(m.sum()) for m in masks["liver tissue"].values())
    assert total == rep["tissues"]["tissue"]["voxels"]


def test_bad_input_exits_nonzero_with_one_line(tmp_path):
    res = _run("run", "--input", str(PUBLISHED), "--organ", "bones", "--output", str(tmp_path / "o"))
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("dicom-node: error:")]
    assert len(lines) == 1 and "SOPInstanceUID" in lines[0] and "SeriesInstanceUID" in lines[0]
    assert "Traceback" not in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run("run", "--input", str(empty), "--organ", "bones", "--output", str(tmp_path / "o"))
    assert res.returncode == 1 and "no DICOM files found" in res.stderr
    res = _run("run", "--input", str(J2K), "--organ", "bnoes", "--output", str(tmp_path / "o"))
    assert res.returncode == 1 and "did you mean 'bones'" in res.stderr


def test_two_series_need_a_choice(tmp_path):
    both = tmp_path / "both"
    shutil.copytree(J2K, both / "a")
    from node.tools.synth_series import write_series

    write_series(np.full((4, 16, 16), 40, np.int16), both / "b", affine=np.diag([-2.0, -2.0, 2.0, 1.0]))
    res = _run("run", "--input", str(both), "--organ", "liver", "--output", str(tmp_path / "o"))
    assert res.returncode == 1 and "holds 2 series, choose one with --series" in res.stderr
    uid = pydicom.dcmread(next(J2K.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    res = _run("run", "--input", str(both), "--organ", "liver", "--output", str(tmp_path / "o"),
               "--series", uid, "--no-meshes")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "liver_seg.dcm").exists() and not list((tmp_path / "o").glob("*.stl"))


def test_fill_missing_uids_opt_in(tmp_path):
    res = _run("run", "--input", str(PUBLISHED), "--organ", "bones", "--output", str(tmp_path / "o"),
               "--fill-missing-uids", "--no-meshes")
    assert res.returncode == 0, res.stderr
    seg = pydicom.dcmread(tmp_path / "o" / "bones_seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    metas = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in PUBLISHED.iterdir()}
    assert refs == metas


def test_list_profiles():
    res = _run("run", "--list-profiles")
    assert res.returncode == 0 and "bones" in res.stdout.split()


def test_synth_command_writes_a_series_the_loader_reads(tmp_path):
    nifti = DATA / "ct-body-3mm-small" / "ct.nii.gz"
    res = _run("synth", "--nifti", str(nifti), "--out", str(tmp_path / "s"), "--tilt", "10", "--ts", "rle")
    assert res.returncode == 0, res.stderr
    vol = load_series(next(iter(find_series([tmp_path / "s"]).values())))
    assert vol.resampled and vol.shape[0] >= 30
    bad = _run("run", "--input", str(tmp_path / "s"), "--organ", "bones", "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_run_pipeline_parses_each_header_once(tmp_path, monkeypatch):
    """Grouping and loading share the parsed headers: one header read per file."""
    from node.pipeline.series import find as find_mod
    from node.pipeline.series import header as header_mod
    from node.pipeline.series import load as load_mod
    from node.pipeline.run import run_pipeline
    from node.tools.synth_series import write_series

    write_series(np.full((6, 16, 16), 40, np.int16), tmp_path / "s", affine=np.diag([-2.0, -2.0, 2.0, 1.0]))
    reads: list[Path] = []
    real = header_mod.read_header

    def counting(path):
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(find_mod, "read_header", counting)  # grouping
    monkeypatch.setattr(load_mod, "read_header", counting)  # loading
    res = run_pipeline([tmp_path / "s"], "liver", tmp_path / "o", write_meshes=False, write_segmentation=False)
    n = len(list((tmp_path / "s").iterdir()))
    assert res.report["input"]["files"] == n
    assert len(reads) == len(set(reads)) == n
