"""Sanity checks in every result (node/pipeline/stages/quality.py): report.json's quality block, the
job's warnings in ``jobs list`` / ``jobs show``, landmark tissues, and the refusal of a
profile whose model is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from thorax_phantom import thorax

from node.contracts import JobResult
from node.errors import BackendUnavailable
from node.pipeline.stages import quality
from node.profiles import Expect, load_profile, parse_profile

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])  # i -> +x: patient left


def _tissue(**expect):
    t = load_profile("kidneys").tissues[1]
    return t.model_copy(update={"expect": Expect(**expect) if expect else None})


def _blob(shape, centre, radii) -> np.ndarray:
    k, j, i = np.indices(shape)
    return ((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + ((i - centre[2]) / radii[2]) ** 2 <= 1


def test_volume_inside_and_outside_the_range():
    shape = (40, 60, 100)
    m = _blob(shape, (20, 30, 50), (10, 15, 15))  # whole, inside the series
    ml = float(m.sum()) * 1.5 * 1.5 * 3.0 / 1000
    ok = quality.check_tissue(_tissue(volume_ml=(ml / 2, ml * 2)), m, AFFINE, 1.5 * 1.5 * 3 / 1000)
    assert ok.status == "ok" and not ok.warnings and ok.cut_by_scan == ()
    small = quality.check_tissue(_tissue(volume_ml=(ml * 2, ml * 4)), m, AFFINE, 1.5 * 1.5 * 3 / 1000)
    assert small.status == "warning" and "less than" in small.warnings[0]
    big = quality.check_tissue(_tissue(volume_ml=(1, ml / 2)), m, AFFINE, 1.5 * 1.5 * 3 / 1000)
    assert "more than" in big.warnings[0]
    none = quality.check_tissue(_tissue(volume_ml=(1, 10)), np.zeros(shape, bool), AFFINE, 0.00675)
    assert none.warnings == ("kidneys: nothing found (a whole one is 1-10 mL)",)
    assert quality.check_tissue(_tissue(), m, AFFINE, 0.00675).status == "unchecked"


def test_an_organ_cut_by_the_scan_is_only_checked_against_the_upper_limit():
    shape = (40, 60, 100)
    m = _blob(shape, (0, 30, 50), (10, 15, 15))  # the first slice cuts it
    q = quality.check_tissue(_tissue(volume_ml=(10_000, 20_000)), m, AFFINE, 0.00675)
    assert q.status == "partial" and q.cut_by_scan == ("first slice",) and not q.warnings
    q = quality.check_tissue(_tissue(volume_ml=(0.1, 1)), m, AFFINE, 0.00675)
    assert q.status == "warning" and "more than 1 mL" in q.warnings[0]
    edge = _blob(shape, (20, 30, 0), (10, 15, 15))
    assert quality.cut_by_scan(edge) == ("image edge",)


def test_paired_organs_each_side_and_their_balance():
    shape = (40, 60, 120)
    left = _blob(shape, (20, 30, 90), (10, 12, 12))  # high i = patient left with this affine
    right = _blob(shape, (20, 30, 30), (10, 12, 12))
    smaller_right = _blob(shape, (20, 30, 30), (6, 8, 8))
    vml = 0.00675
    one = float(left.sum()) * vml
    q = quality.check_tissue(_tissue(volume_ml=(one / 2, one * 2), paired=True), left | right, AFFINE, vml)
    assert q.status == "ok" and q.side_ratio == pytest.approx(1.0, abs=0.01)
    assert q.sides_ml is not None
    assert q.sides_ml["left"] == pytest.approx(one, rel=0.01) and q.sides_ml["right"] == pytest.approx(one, rel=0.01)
    q = quality.check_tissue(_tissue(volume_ml=(one / 10, one * 2), paired=True, max_side_ratio=1.5),
                             left | smaller_right, AFFINE, vml)
    assert any("sides unbalanced" in w for w in q.warnings)
    q = quality.check_tissue(_tissue(volume_ml=(one / 2, one * 2), paired=True), left, AFFINE, vml, centre=60)
    assert any("right side 0 mL" in w for w in q.warnings)  # the body's centre keeps one organ whole
    # columns running to the patient's right (negative x step): the sides swap
    flipped = AFFINE.copy()
    flipped[0, 0] = -1.5
    q = quality.check_tissue(_tissue(volume_ml=(one / 2, one * 2), paired=True), left | smaller_right, flipped, vml,
                             centre=60)
    assert q.sides_ml is not None and q.sides_ml["right"] > q.sides_ml["left"]


def _series(tmp_path, volume):
    from node.tools.synth_series import write_series

    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    write_series(volume.array.transpose(2, 1, 0), tmp_path / "dicom", affine=ras, series_description="CT Thorax")
    return tmp_path / "dicom"


def test_run_writes_quality_and_logs_warnings_landmarks_stay_out(tmp_path, caplog):
    """The lungs on a synthetic thorax through run_pipeline: report.json has the quality block;
    a range the result fails is a logged warning; a landmark tissue is in no output."""
    from node.pipeline.run import run_pipeline
    from node.pipeline.seg import read_seg_masks

    volume, _ = thorax()
    folder = _series(tmp_path, volume)
    doc = yaml.safe_load(Path(str(load_profile("lungs").source)).read_text())
    doc["tissues"][0]["output"] = False  # the airways as a landmark only
    doc["tissues"][1]["expect"] = {"volume_ml": [100, 1000], "paired": True}  # smaller than these lungs
    prof = parse_profile(doc, "lungs.yaml")
    with caplog.at_level(logging.WARNING, logger="node.pipeline.run"):
        res = run_pipeline([folder], prof, tmp_path / "out", write_meshes=False)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(rep["tissues"]) == ["lungs"] and list(rep["quality"]["tissues"]) == ["lungs"]
    q = rep["quality"]["tissues"]["lungs"]
    assert q["cut_by_scan"] == ["last slice"]  # the lungs go on above the series
    assert q["status"] == "warning" and q["expected_ml"] == [100, 1000]
    assert set(q["sides_ml"]) == {"left", "right"}
    assert rep["quality"]["warnings"] and all("more than 1000 mL" in w for w in rep["quality"]["warnings"])
    assert any("quality check: lungs: left side" in r.getMessage() for r in caplog.records)
    assert res.seg_path is not None
    masks = read_seg_masks(res.seg_path)
    assert list(masks) == ["lungs lungs"]  # no airways segment: a landmark


def test_jobs_list_and_show_carry_the_warnings(tmp_path, capsys):
    from node.cli import main
    from node.store import InstanceRecord, Store

    store = Store(tmp_path / "node.db")
    store.record_instance(InstanceRecord(
        sop_instance_uid="1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid="S1", study_uid="T1",
        path="/spool/1.dcm", transfer_syntax="1.2.840.10008.1.2.1", size=1, calling_ae="CT", called_ae="NODE",
        peer_address="127.0.0.1", received_at=1.0, tags={"Modality": "CT"}))
    job_id, _ = store.create_job("S1", "ct-kidneys", profile="kidneys", backend="hu_based", rules_version="v",
                                 generation=1)
    assert store.claim_job("w") is not None
    warning = "kidneys: right side 12 mL, less than 80 mL"
    assert store.complete_job(job_id, JobResult(output_dir=Path("/r/1"), warnings=(warning,)))
    store.close()
    assert main(["jobs", "list", "--db", str(tmp_path / "node.db")]) == 0
    out = capsys.readouterr().out
    assert "ERROR / WARNING" in out and f"WARNING (1): {warning}" in out
    assert main(["jobs", "show", str(job_id), "--db", str(tmp_path / "node.db")]) == 0
    assert warning in capsys.readouterr().out


@pytest.mark.parametrize("organ", ["pancreas", "heart"])
def test_model_only_profile_is_refused_with_its_reason_before_reading(tmp_path, monkeypatch, organ):
    monkeypatch.setenv("DICOM_NODE_MODELS", str(tmp_path / "no-models"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    from node.pipeline.run import run_pipeline

    with pytest.raises(BackendUnavailable) as err:
        run_pipeline([tmp_path / "never-read"], organ, tmp_path / "out")
    msg = str(err.value)
    assert f"profile {organ} is refused here: HU thresholds cannot separate the {organ}" in msg
    assert "It needs totalsegmentator:" in msg
    assert not (tmp_path / "out" / "report.json").exists()
