"""End to end with an AI backend: storescu -> dicom-node serve -> a rule picks nnU-Net -> SEG in Orthanc.

The rule names an HU-capable profile and overrides its backend with ``backend: nnunet``; the
profile carries the tiny committed model in its ``model:`` section.  Needs the AI extras in
the environment that runs the tests (dicom-node serve is started from the same venv).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import yaml
from pydicom import dcmread

pytest.importorskip("torch", reason="AI extras not installed (see docs/ai-backends.md)")
pytest.importorskip("nnunetv2", reason="nnunetv2 not installed")
if shutil.which("storescu") is None:
    pytest.skip("DCMTK storescu not installed", allow_module_level=True)

from ai_helpers import HELD_OUT_SEEDS, NNUNET_TINY, SYNTH_TISSUES, truth_on_loaded, write_case_series
from test_e2e_orthanc import DICOM_NODE, Node, storescu, wait_job_settled

from node.tools.synth_shapes import dice, make_case

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DICOM_NODE.exists(), reason="dicom-node is not installed in this environment")]

PROFILE = {
    "name": "synth",
    "description": "synthetic organ and bone (HU thresholds, or the tiny nnU-Net when a rule says so)",
    "model_type": "hu_based",
    "model": {"folder": str(NNUNET_TINY), "folds": [0], "device": "cpu"},
    "tissues": SYNTH_TISSUES,
}
RULES = {"rules": [{"name": "synth-ai", "match": {"Modality": "CT"}, "profile": "synth", "backend": "nnunet",
                    "destinations": ["pacs"]}]}


def test_rule_selects_nnunet_and_seg_reaches_orthanc(tmp_path, orthanc):
    (tmp_path / "node").mkdir()
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "synth.yaml").write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    node = Node(tmp_path / "node", orthanc)
    (node.workdir / "routing_rules.yaml").write_text(yaml.safe_dump(RULES))
    node.config["profiles"] = str(profiles)
    node.config_path.write_text(yaml.safe_dump(node.config))
    case = make_case(HELD_OUT_SEEDS[0])
    files = write_case_series(case, tmp_path / "dicom")
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node.start()
    try:
        storescu(node.port, files)
        found = orthanc.wait_for(lambda: orthanc.seg_series(), timeout_s=120)
        assert found, f"no SEG in Orthanc; node log:\n{node.log()[-6000:]}"
        (seg_series,) = orthanc.seg_series()
        (inst,) = orthanc.series_instances(seg_series["ID"])
        data = orthanc.get_bytes(f"/instances/{inst['ID']}/file")
        seg_file = tmp_path / "seg.dcm"
        seg_file.write_bytes(data)
        seg = dcmread(seg_file)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        assert {s.SegmentAlgorithmName for s in seg.SegmentSequence} == {"nnU-Net"}
        store = node.store
        (job,) = wait_job_settled(store)
        assert job.state == "done" and job.rule == "synth-ai"
        store.close()
        # the masks in the SEG match the synthetic truth
        from node.pipeline.seg import read_seg_masks
        from node.pipeline.series.load import load_series

        vol = load_series(files)
        truth = truth_on_loaded(case, vol)
        masks = read_seg_masks(seg_file)
        index: dict[str | tuple[str, int], int] = {f.sop_instance_uid: n for n, f in enumerate(vol.frames)}
        for label, tid in (("synth organ", 1), ("synth bone", 2)):
            m = np.zeros(vol.shape, bool)
            for key, fm in masks[label].items():
                m[index[key]] = fm
            assert dice(m, truth == tid) >= 0.9, label
    finally:
        node.stop()
        time.sleep(0.1)
