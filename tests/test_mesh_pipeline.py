"""The mesh stage of run_pipeline: on-disk check, report fields, output order."""

from __future__ import annotations

import platform
from pathlib import Path

import pydicom
import pytest

import node.pipeline.run as run_mod
import node.pipeline.stages.mesh as mesh_stage
from node.pipeline.mesh.files import check_stl, check_written_stl

from ai_helpers import synth_tissue, write_case_series  # tests/ is on sys.path


def _profile(names: list[str]):
    from node.profiles import parse_profile

    spec = {"organ": dict(hu=[100, 170], labels=[1]), "bone": dict(hu=[200, 1500], labels=[2]),
            "nothing": dict(hu=[3000, 3071], labels=[3])}  # no voxel that bright: an empty tissue
    data = {"name": "synth", "description": "synthetic shapes", "model_type": "hu_based", "model": {},
            "tissues": [synth_tissue(n, **spec[n]) for n in names]}
    return parse_profile(data, "<test synth>")


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    from node.tools.synth_shapes import make_case

    folder = tmp_path_factory.mktemp("synth") / "dicom"
    write_case_series(make_case(7), folder)
    return folder


def test_mesh_stage_checks_the_written_files(series, tmp_path, monkeypatch):
    checked: list[str] = []

    def spy(path, mesh, **kw):
        checked.append(Path(path).name)
        return check_written_stl(path, mesh, **kw)

    monkeypatch.setattr(mesh_stage, "check_written_stl", spy)
    res = run_mod.run_pipeline([series], _profile(["organ", "nothing", "bone"]), tmp_path / "out",
                               write_segmentation=False)
    assert sorted(checked) == ["synth_bone.stl", "synth_organ.stl"]  # tissues meshed concurrently
    tissues = res.report["tissues"]
    for name in ("organ", "bone"):
        full = check_stl(tmp_path / "out" / f"synth_{name}.stl")
        assert full.printable
        assert (tissues[name]["watertight"], tissues[name]["manifold"]) == (full.watertight, full.manifold)
        assert tissues[name]["triangles"] == full.triangles
    assert tissues["nothing"]["watertight"] is None and tissues["nothing"]["stl"] is None
    # the HU backend segments and meshes inside a heap window (node.pipeline.hu.heap)
    heap = res.report["heap"]
    assert heap["retained_below_mb"] > 0 and heap["trims"] >= 0
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert heap["applied"] is True


def test_report_gives_components_and_what_decimation_removed(series, tmp_path, caplog, monkeypatch):
    from node.profiles import parse_profile

    computed: list[int] = []  # topologies the mesh stage computes itself (a decimated mesh brings its own)
    real = mesh_stage.topology

    def spy(faces, n):
        computed.append(len(faces))
        return real(faces, n)

    monkeypatch.setattr(mesh_stage, "topology", spy)

    # "rim": the noisy edge between body and organ, hundreds of voxel-sized islands
    tissues = [synth_tissue("organ", hu=[100, 170], labels=[1]),
               synth_tissue("rim", hu=[40, 90], labels=[1], mesh={"decimate": 0.2})]
    prof = parse_profile({"name": "synth", "description": "synthetic shapes", "model_type": "hu_based",
                          "model": {}, "tissues": tissues}, "<test synth>")
    with caplog.at_level("WARNING", logger="node.pipeline.stages.mesh"):
        res = run_mod.run_pipeline([series], prof, tmp_path / "out", write_segmentation=False)
    report = res.report["tissues"]
    for name in ("organ", "rim"):
        assert report[name]["components"] == check_stl(tmp_path / "out" / f"synth_{name}.stl").components
    assert "decimation" not in report["organ"]
    dec = report["rim"]["decimation"]
    assert dec["triangles_before"] * 0.2 >= report["rim"]["triangles"]
    assert dec["components_before"] > 100
    assert dec["components_removed"] == dec["components_before"] - report["rim"]["components"] > 0
    assert computed == [report["organ"]["triangles"]]
    (warned,) = [r.getMessage() for r in caplog.records if "decimation to" in r.getMessage()]
    assert f"removed {dec['components_removed']} of its {dec['components_before']} surface components" in warned


def test_tissues_meshed_two_at_a_time_in_profile_order(series, tmp_path, monkeypatch):
    import itertools
    import threading
    import time

    from node.pipeline.mesh.extract import mesh_from_mask

    prof = _profile(["organ", "nothing", "bone"])
    plain = run_mod.run_pipeline([series], prof, tmp_path / "plain", write_segmentation=False)

    calls = itertools.count()
    first_two = threading.Barrier(2, timeout=10)

    def meeting(mask, affine, opts):
        n = next(calls)
        if n < 2:
            first_two.wait()  # BrokenBarrierError when the tissues are meshed one after another
        mesh = mesh_from_mask(mask, affine, opts)
        if n == 0:
            time.sleep(0.3)  # the profile's first tissue finishes last: the order must not follow
        return mesh

    monkeypatch.setattr(mesh_stage, "mesh_from_mask", meeting)
    res = run_mod.run_pipeline([series], prof, tmp_path / "pooled", write_segmentation=False)
    assert next(calls) == 3
    assert [p.name for p in res.mesh_paths] == [p.name for p in plain.mesh_paths] == [
        "synth_organ.stl", "synth_organ_colored.ply", "synth_bone.stl", "synth_bone_colored.ply"]
    assert res.report["tissues"] == plain.report["tissues"]
    assert res.report["outputs"]["meshes"] == plain.report["outputs"]["meshes"]
    for p in plain.mesh_paths:
        assert (tmp_path / "pooled" / p.name).read_bytes() == p.read_bytes()


def test_vtk_backend_switched_before_any_thread_goes_on(monkeypatch):
    """Concurrent first calls of _vtk_smp: none returns before the backend switch is done."""
    import threading
    import time

    import node.pipeline.mesh.vtk_glue as vtk_glue
    from vtkmodules.vtkCommonCore import vtkSMPTools

    switched = threading.Event()
    real_set = vtkSMPTools.SetBackend

    class SlowSMP:
        @staticmethod
        def GetBackend():
            return "Sequential"

        @staticmethod
        def SetBackend(name):
            time.sleep(0.2)  # a slow switch: the other thread must wait for it
            switched.set()
            return True

    import vtkmodules.vtkCommonCore as core

    monkeypatch.setattr(core, "vtkSMPTools", SlowSMP)
    monkeypatch.setattr(vtk_glue, "_SMP_READY", False)
    seen: list[bool] = []

    def first_use():
        vtk_glue.vtk_smp()
        seen.append(switched.is_set())

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True, True]
    assert real_set is vtkSMPTools.SetBackend


def test_first_tissue_is_meshed_while_the_next_is_segmented(series, tmp_path, monkeypatch):
    """A streaming backend's tissue is meshed before segmentation ends, results unchanged."""
    import threading

    from node.pipeline.hu.backend import HUBackend
    from node.pipeline.mesh.extract import mesh_from_mask

    prof = _profile(["organ", "bone"])
    plain = run_mod.run_pipeline([series], prof, tmp_path / "plain", write_segmentation=False)
    meshing = threading.Event()

    class WaitingBackend(HUBackend):
        """Hands over the first tissue, then waits until somebody meshes it."""

        def segment(self, volume, profile, *, phase, on_mask=None):
            def hand_over(name, mask):
                on_mask(name, mask)
                if name == "organ":
                    assert meshing.wait(10), "the first tissue was not meshed during segmentation"

            return super().segment(volume, profile, phase=phase, on_mask=hand_over)

    def spy(mask, affine, opts):
        meshing.set()
        return mesh_from_mask(mask, affine, opts)

    monkeypatch.setattr(run_mod, "get_backend", lambda name: WaitingBackend())
    monkeypatch.setattr(mesh_stage, "mesh_from_mask", spy)
    res = run_mod.run_pipeline([series], prof, tmp_path / "streamed", write_segmentation=False)
    assert res.report["tissues"] == plain.report["tissues"]
    assert list(res.report["tissues"]) == ["organ", "bone"]
    assert res.report["timings_s"]["mesh_span"] > 0
    for p in plain.mesh_paths:
        assert (tmp_path / "streamed" / p.name).read_bytes() == p.read_bytes()


def test_seg_first_writes_the_seg_before_any_mesh(series, tmp_path, monkeypatch):
    """seg_first (the node): no mesh while segmenting, the SEG handed on (on_seg) before the first
    mesh starts; the outputs are those of the default (streaming) run."""
    from node.pipeline.mesh.extract import mesh_from_mask

    prof = _profile(["organ", "bone"])
    plain = run_mod.run_pipeline([series], prof, tmp_path / "plain", seg_series_uid="1.2.826.0.1.3680043.8.498.7")
    events: list[str] = []

    def spy(mask, affine, opts):
        events.append("mesh")
        return mesh_from_mask(mask, affine, opts)

    monkeypatch.setattr(mesh_stage, "mesh_from_mask", spy)
    res = run_mod.run_pipeline([series], prof, tmp_path / "first", seg_series_uid="1.2.826.0.1.3680043.8.498.7",
                               seg_first=True, on_seg=lambda path, uid: events.append(f"seg {path.name} {uid}"))
    assert events == ["seg synth_seg.dcm 1.2.826.0.1.3680043.8.498.7", "mesh", "mesh"]
    assert res.report["tissues"] == plain.report["tissues"]
    assert [p.name for p in res.mesh_paths] == [p.name for p in plain.mesh_paths]
    for p in plain.mesh_paths:
        assert (tmp_path / "first" / p.name).read_bytes() == p.read_bytes()
    assert res.seg_path is not None and plain.seg_path is not None
    a = pydicom.dcmread(res.seg_path, stop_before_pixels=True)
    b = pydicom.dcmread(plain.seg_path, stop_before_pixels=True)
    assert a.SOPInstanceUID == b.SOPInstanceUID  # fixed by the SEG series UID
