"""QC pictures (node/pipeline/stages/qc.py): made by the real pipeline on real series, checked as
a person would look at them: every picture there, the image with square pixels from the voxel
spacing, the colour exactly where the SEG's mask is (computed here with nibabel's reorientation,
not the stage's own), the legend in the SEG's recommended display colours, and the same anatomy
in the same place whether the scanner stored the series axially or coronally.  Pictures are kept
in ``tests/.artifacts/qc/`` (look at them)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest

from geometry_helpers import PARENCHYMA

from node.pipeline.orientation import to_orientation
from node.pipeline.run import RunResult, run_pipeline
from node.pipeline.stages import qc as qc_stage
from node.profiles import load_profile, parse_profile
from node.tools.synth_series import write_series

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
SMALL_CT = DATA / "ct-body-3mm-small" / "ct.nii.gz"
ARTIFACTS = Path(os.environ.get("NODE_TEST_ARTIFACTS", REPO / "tests" / ".artifacts")) / "qc"

pytestmark = pytest.mark.skipif(not (J2K.is_dir() and SMALL_CT.exists()), reason=f"test data not found under {DATA}")


def _keep(res: RunResult, tag: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for p in sorted((res.output_dir / "qc").glob("*.png")):
        shutil.copyfile(p, ARTIFACTS / f"{tag}_{p.name}")


@pytest.fixture(scope="module")
def liver(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    res = run_pipeline([J2K], "liver", tmp_path_factory.mktemp("qc") / "liver")
    _keep(res, "j2k_liver")
    return res


@pytest.fixture(scope="module")
def parenchyma(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    """The same real trunk CT stored axially (HFS) and as a coronal series."""
    out = {}
    profile = parse_profile(PARENCHYMA, "geometry_helpers.py")
    variants: tuple[tuple[str, dict[str, Any]], ...] = (("axial", {}), ("coronal", {"plane": "coronal"}))
    for variant, kw in variants:
        tmp = tmp_path_factory.mktemp(f"qc-{variant}")
        write_series(SMALL_CT, tmp / "src", **kw)
        out[variant] = run_pipeline([tmp / "src"], profile, tmp / "out", decode_workers=1)
        _keep(out[variant], f"body3mm_{variant}")
    return out


def _imread(path: str) -> np.ndarray:
    img = cv2.imread(path)
    assert img is not None, path
    return img


def _tinted(bgr: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (the CT is drawn in grey, every tissue in colour)."""
    b, g, r = (bgr[..., n].astype(int) for n in range(3))
    return (np.abs(r - g) + np.abs(g - b)) > 0


def _expected_union(res: RunResult, pic: dict[str, Any]) -> np.ndarray:
    """The union of the run's masks on the picture's slice, drawn at the picture's panel size."""
    assert res.volume is not None
    lps = [to_orientation(m.astype(np.uint8), res.volume.affine, "LPS").array for m in res.masks.values()]
    idx = pic["slice_index"]
    union = np.zeros_like(lps[0])
    for a in lps:
        union |= a
    plane = pic["plane"]
    sl = union[idx] if plane == "axial" else union[:, idx, :][::-1] if plane == "coronal" else union[:, :, idx][::-1]
    _, _, w, h = pic["panel"]
    return cv2.resize(np.ascontiguousarray(sl), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _check_slice_pictures(res: RunResult) -> list[dict[str, Any]]:
    assert res.volume is not None
    report = json.loads((res.output_dir / "report.json").read_text())
    pics = [p for p in report["qc"]["pictures"] if p["kind"] == "slice"]
    names = {t for t in res.masks if res.masks[t].any()}
    assert {(p["tissue"], p["plane"]) for p in pics} == {(t, pl) for t in names for pl in qc_stage.PLANES}
    assert report["outputs"]["qc"] == [p["file"] for p in report["qc"]["pictures"]]
    assert "qc" in report["timings_s"]
    lps = to_orientation(res.volume.array, res.volume.affine, "LPS")
    sl_, sp_, ss_ = lps.spacing  # mm along L, P, S
    for p in pics:
        img = _imread(str(res.output_dir / p["file"]))
        assert img is not None and img.shape[:2] == (p["height"], p["width"])
        x, y, w, h = p["panel"]
        assert (x, y) == (0, 0) and max(w, h) == qc_stage.MAX_SIDE
        # square pixels: the panel's aspect is the slice's extent in mm
        nk, nj, ni = lps.array.shape
        rows_mm, cols_mm = {"axial": (nj * sp_, ni * sl_), "coronal": (nk * ss_, ni * sl_),
                            "sagittal": (nk * ss_, nj * sp_)}[p["plane"]]
        assert abs(w / h - cols_mm / rows_mm) <= 1.5 / min(w, h) * (w / h) + 1e-6, (p, rows_mm, cols_mm)
        # the colour lies exactly on the masks, and covers them
        panel = img[y:y + h, x:x + w]
        tinted = _tinted(panel)
        union = _expected_union(res, p)
        assert union.sum() > 50, p
        assert not (tinted & ~union).any(), (p["file"], int((tinted & ~union).sum()))
        assert (tinted & union).sum() >= 0.99 * union.sum(), p["file"]
    return pics


def test_liver_pictures_show_the_masks_where_they_are(liver: RunResult) -> None:
    pics = _check_slice_pictures(liver)
    # the axial picture goes through the liver's largest slice, the one the SEG has most liver on
    axial = next(p for p in pics if p["tissue"] == "tissue" and p["plane"] == "axial")
    lps = to_orientation(liver.masks["tissue"].astype(np.uint8), liver.volume.affine, "LPS").array  # type: ignore[union-attr]  # set by run_pipeline
    per_slice = lps.reshape(lps.shape[0], -1).sum(axis=1)
    assert per_slice[axial["slice_index"]] >= 0.97 * per_slice.max()


def test_legend_and_edges_are_the_seg_display_colours(liver: RunResult) -> None:
    """Each tissue's edge is drawn in exactly the colour the SEG recommends for its segment, and
    that colour's pixels lie on its own mask."""
    seg = pydicom.dcmread(liver.output_dir / "liver_seg.dcm")
    seg_rgb = {str(s.SegmentLabel).split()[-1]: hd.color.CIELabColor.from_dicom_value(
        tuple(int(v) for v in s.RecommendedDisplayCIELabValue)).to_rgb() for s in seg.SegmentSequence}
    prof = load_profile("liver")
    assert seg_rgb == {t.name: tuple(t.color) for t in prof.result_tissues}
    report = json.loads((liver.output_dir / "report.json").read_text())
    pic = next(p for p in report["qc"]["pictures"] if p["plane"] == "axial" and p["tissue"] == "tissue")
    img = _imread(str(liver.output_dir / pic["file"]))
    assert liver.volume is not None
    mask = to_orientation(liver.masks["tissue"].astype(np.uint8), liver.volume.affine, "LPS").array[pic["slice_index"]]
    _, _, w, h = pic["panel"]
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    r, g, b = seg_rgb["tissue"]
    exact = np.all(img[:h, :w] == (b, g, r), axis=-1)
    assert exact.sum() > 100
    assert not (exact & ~mask).any()
    # the legend below the image shows the swatch
    legend = img[h:]
    assert np.all(legend == (b, g, r), axis=-1).sum() >= 100


def test_mesh_pictures(liver: RunResult) -> None:
    report = json.loads((liver.output_dir / "report.json").read_text())
    meshes = {p["tissue"]: p for p in report["qc"]["pictures"] if p["kind"] == "mesh"}
    assert set(meshes) == {t for t, r in report["tissues"].items() if r.get("stl")}
    for tissue, p in meshes.items():
        img = _imread(str(liver.output_dir / p["file"]))
        assert img.shape[:2] == (p["height"], p["width"])
        assert p["triangles"] == report["tissues"][tissue]["triangles"]
        x, y, w, h = p["panel"]
        views = img[y:y + h, x:x + w]
        rgb = next(t.color for t in load_profile("liver").result_tissues if t.name == tissue)
        # shaded in the tissue's colour: hue of the lit pixels is the tissue's
        lit = views.astype(int).sum(axis=-1) > 3 * 40
        assert lit.mean() > 0.02, tissue
        mean_bgr = views[lit].mean(axis=0)
        want = np.array(rgb[::-1], float)
        cos = float(mean_bgr @ want / (np.linalg.norm(mean_bgr) * np.linalg.norm(want)))
        assert cos > 0.99, (tissue, mean_bgr, want)


def test_the_same_anatomy_whether_stored_axially_or_coronally(parenchyma: dict[str, RunResult]) -> None:
    """The coronal series' pictures (the array in another storage order) show what the axial
    series' show, in the same place: the view is the patient's, not the array's."""
    for res in parenchyma.values():
        _check_slice_pictures(res)
    reports = {v: json.loads((r.output_dir / "report.json").read_text()) for v, r in parenchyma.items()}
    for plane in qc_stage.PLANES:
        pa, pc = (next(p for p in reports[v]["qc"]["pictures"] if p["tissue"] == "tissue" and p.get("plane") == plane)
                  for v in ("axial", "coronal"))
        ia, ic = (_imread(str(parenchyma[v].output_dir / p["file"])) for v, p in (("axial", pa), ("coronal", pc)))
        assert pa["panel"] == pc["panel"]
        assert abs(pa["position_mm"] - pc["position_mm"]) <= 3.0, (plane, pa, pc)
        w, h = pa["panel"][2:]
        a, c = _tinted(ia[:h, :w]), _tinted(ic[:h, :w])
        dice = 2 * (a & c).sum() / (a.sum() + c.sum())
        assert dice > 0.85, (plane, dice)  # the segmentations differ a little (another sampling of the scan)
        # the CT where neither has colour: the same picture (resampled once more for the coronal series)
        grey = ~a & ~c
        ga, gc = ia[:h, :w, 0][grey].astype(float), ic[:h, :w, 0][grey].astype(float)
        assert np.corrcoef(ga, gc)[0, 1] > 0.95, plane
        assert np.corrcoef(ga, np.fliplr(ic[:h, :w, 0])[grey].astype(float))[0, 1] < 0.9  # a mirror would not pass


def test_a_failing_qc_step_never_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: Any, **_k: Any) -> Any:
        raise OSError("disk said no")

    monkeypatch.setattr("node.pipeline.run.write_qc", broken)
    res = run_pipeline([J2K], "liver", tmp_path / "out")
    assert res.seg_path is not None and res.seg_path.is_file() and res.mesh_paths
    assert res.report["qc"] == {"pictures": [], "error": "OSError: disk said no"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["qc"]["error"] == "OSError: disk said no"


def test_qc_off(tmp_path: Path) -> None:
    res = run_pipeline([J2K], "liver", tmp_path / "out", qc=False, write_meshes=False)
    assert "qc" not in res.report and not (tmp_path / "out" / "qc").exists()


def test_500_slices_bounded(tmp_path: Path) -> None:
    """A 500-slice 512x512 volume with two large tissues: only slices are read and the mesh is
    clustered for drawing; the time is printed (figures in bench/README.md)."""
    rng = np.random.default_rng(3)
    k, j, i = np.ogrid[:500, :512, :512]
    array = (rng.normal(40, 20, (500, 512, 512))).astype(np.int16)
    big = ((k - 250) ** 2 / 200**2 + (j - 256) ** 2 / 150**2 + (i - 200) ** 2 / 120**2) < 1
    small = ((k - 250) ** 2 / 100**2 + (j - 230) ** 2 / 40**2 + (i - 330) ** 2 / 40**2) < 1
    affine = np.diag([0.7, 0.7, 0.8, 1.0])
    prof = parse_profile(PARENCHYMA, "geometry_helpers.py")
    from node.pipeline.mesh.extract import mesh_from_mask
    from node.pipeline.mesh.files import write_stl
    from node.pipeline.mesh.model import MeshOptions

    stl = write_stl(mesh_from_mask(big, affine, MeshOptions()), tmp_path / "big.stl")
    t0 = time.perf_counter()
    res = qc_stage.write_qc(array, affine, {"tissue": big, "airways": small}, prof, tmp_path, phase="non_contrast",
                            stl_paths={"tissue": stl})
    dt = time.perf_counter() - t0
    mesh = next(p for p in res.pictures if p.kind == "mesh")
    print(f"\nQC of a 500x512x512 volume, 2 tissues, 6 slice pictures + 1 mesh of {mesh.triangles} triangles"
          f" ({mesh.triangles_drawn} drawn): {dt:.2f} s")
    assert len(res.pictures) == 7 and not res.warnings
    assert mesh.triangles is not None and mesh.triangles_drawn is not None
    assert mesh.triangles_drawn <= qc_stage.MAX_TRIANGLES
