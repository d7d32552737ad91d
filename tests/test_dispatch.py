"""Dispatcher and share drop, with a real Orthanc as the PACS.

A real SEG is made once per module by running the pipeline (profile bones) on
the shared J2K series; jobs are put in the store as the worker leaves them
(done, result paths, dispatch rows) and the Dispatcher delivers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import ConfigError, Destination, KnownAE, NodeConfig, RetryPolicy, ShareConfig
from node.contracts import JobParams, JobResult
from node.dicom_values import tags_from_dataset
from node.dispatcher import Dispatcher, dispatch_log
from node.share import MANIFEST_NAME, PLACEHOLDER, SUPERSEDED_NAME, render_folder, sanitize_component
from node.store import Dispatch, InstanceRecord, Job, Store

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"

pytestmark = pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)")


def _dispatch(store: Store, did: int) -> Dispatch:
    d = store.get_dispatch(did)
    assert d is not None, f"no dispatch {did}"
    return d


def _job(store: Store, job_id: int) -> Job:
    job = store.get_job(job_id)
    assert job is not None, f"no job {job_id}"
    return job


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source():
    """(files, per-file tags, series UID, study UID) of the real J2K series."""
    files = sorted(J2K.glob("*.dcm"))
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    return {
        "files": files,
        "headers": headers,
        "series_uid": str(headers[0].SeriesInstanceUID),
        "study_uid": str(headers[0].StudyInstanceUID),
    }


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory, source):
    """A finished pipeline run (bones) on the J2K series: SEG, STL/PLY, report.json."""
    from node.pipeline.run import run_pipeline

    out = tmp_path_factory.mktemp("result") / "1"
    run_pipeline([J2K], "bones", out, seg_series_uid="1.2.826.0.1.3680043.8.498.1234567890.1")
    return out


def make_config(tmp_path: Path, **kw) -> NodeConfig:
    kw.setdefault("dispatch_retry", RetryPolicy(max_attempts=5, backoff_base_s=30, backoff_max_s=600))
    kw.setdefault("share", ShareConfig(root=tmp_path / "share"))
    return NodeConfig(storage=tmp_path / "var", port=0, timeouts={"acse_s": 5, "dimse_s": 10, "network_s": 10,
                                                                   "connect_s": 3}, **kw)


def done_job(store: Store, source, result_dir: Path, *, tags_override=None, generation_bump: int = 0,
             calling_ae: str = "MODALITY", rule: str = "body-ct-bones") -> int:
    """Index the source instances, then create, claim and complete a job as the worker would."""
    for f, ds in zip(source["files"], source["headers"]):
        tags = tags_from_dataset(ds)
        tags.update(tags_override or {})
        store.record_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_uid=source["series_uid"], study_uid=source["study_uid"], path=str(f),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), size=f.stat().st_size,
            calling_ae=calling_ae, called_ae="DICOMNODE", peer_address="127.0.0.1", tags=tags,
        ))
    series = store.get_series(source["series_uid"])
    assert series is not None
    job_id, _ = store.create_job(source["series_uid"], rule, profile="bones", backend="hu_based",
                                 rules_version="testrules", generation=series.generation + generation_bump,
                                 params=JobParams(calling_ae=calling_ae))
    job = store.claim_job("test-worker")
    assert job is not None and job.id == job_id
    report = json.loads((result_dir / "report.json").read_text())
    seg = result_dir / report["outputs"]["seg"]
    store.complete_job(job_id, JobResult(
        output_dir=result_dir,
        seg=seg,
        meshes=tuple(result_dir / m for m in report["outputs"]["meshes"]),
        report=result_dir / "report.json",
        seg_series_uid=report["outputs"]["seg_series_instance_uid"],
    ))
    return job_id


def seg_instances(pacs) -> list[str]:
    return [i["ID"] for s in pacs.seg_series() for i in pacs.series_instances(s["ID"])]


# ---------------------------------------------------------------------------- C-STORE to the PACS


def test_seg_dispatched_to_orthanc(tmp_path, orthanc, source, result_dir):
    cfg = make_config(tmp_path, destinations={"pacs": Destination(ae_title=orthanc.aet, host="127.0.0.1",
                                                                   port=orthanc.dicom_port)})
    store = Store(cfg.database_path)
    job_id = done_job(store, source, result_dir)
    did, _ = store.add_dispatch(job_id, "pacs", "dicom")
    t0 = time.time()
    assert Dispatcher(cfg, store).run_due() == 1

    d = _dispatch(store, did)
    assert d.state == "sent", d.last_error
    assert d.destination == "pacs" and d.sent_at is not None and t0 <= d.sent_at <= time.time() and d.attempts == 1
    (attempt,) = dispatch_log(store, job_id=job_id)
    assert attempt["outcome"] == "sent"
    assert attempt["location"] == f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    assert "1/1 instance(s) stored" in attempt["detail"]

    (seg_series,) = orthanc.seg_series()
    job = _job(store, job_id)
    assert seg_series["MainDicomTags"]["SeriesInstanceUID"] == job.seg_series_uid
    (inst,) = orthanc.series_instances(seg_series["ID"])
    tags = orthanc.instance_tags(inst["ID"])
    assert tags["Modality"] == "SEG"
    refs = tags["ReferencedSeriesSequence"]
    assert [r["SeriesInstanceUID"] for r in refs] == [source["series_uid"]]
    assert len(refs[0]["ReferencedInstanceSequence"]) == len(source["files"])
    assert tags["StudyInstanceUID"] == source["study_uid"]

    # what the PACS stored is a valid SEG (dciodvfy from dicom3tools)
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    f = orthanc.download(inst["ID"], tmp_path / "from_orthanc.dcm")
    assert dcmread(f).SeriesInstanceUID == job.seg_series_uid
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_pacs_down_then_back(tmp_path, orthanc, source, result_dir):
    cfg = make_config(tmp_path, destinations={"pacs": Destination(ae_title=orthanc.aet, host="127.0.0.1",
                                                                   port=orthanc.dicom_port)})
    policy = cfg.dispatch_retry
    store = Store(cfg.database_path)
    job_id = done_job(store, source, result_dir)
    did, _ = store.add_dispatch(job_id, "pacs", "dicom")

    orthanc.stop()
    t0 = time.time()
    assert Dispatcher(cfg, store).run_due(now=t0) == 1
    d1 = _dispatch(store, did)
    assert d1.state == "pending" and d1.attempts == 1
    assert d1.next_attempt_at is not None and d1.next_attempt_at == pytest.approx(t0 + policy.delay(1))
    assert d1.last_error is not None and "cannot connect" in d1.last_error and str(orthanc.dicom_port) in d1.last_error
    assert Dispatcher(cfg, store).run_due(now=t0 + policy.delay(1) - 1) == 0  # not due yet

    # a node restart: new store connection, new dispatcher; the retry time comes from the database
    store.close()
    store = Store(cfg.database_path)
    t1 = d1.next_attempt_at
    assert Dispatcher(cfg, store).run_due(now=t1) == 1
    d2 = _dispatch(store, did)
    assert d2.state == "pending" and d2.attempts == 2
    assert d2.next_attempt_at is not None and d2.next_attempt_at == pytest.approx(t1 + policy.delay(2))
    assert d2.next_attempt_at - t1 > d1.next_attempt_at - t0  # backoff grows
    assert seg_instances_down_safe(orthanc) is None

    orthanc.start()
    dispatcher = Dispatcher(cfg, store)
    assert dispatcher.run_due(now=d2.next_attempt_at) == 1
    d3 = _dispatch(store, did)
    assert d3.state == "sent" and d3.attempts == 3 and d3.last_error is None
    for _ in range(3):
        assert dispatcher.run_due() == 0
    assert len(seg_instances(orthanc)) == 1
    outcomes = [a["outcome"] for a in dispatch_log(store, dispatch_id=did)]
    assert outcomes == ["retry", "retry", "sent"]


def seg_instances_down_safe(orthanc):
    """None while Orthanc is down (its REST API is down too)."""
    try:
        return seg_instances(orthanc)
    except OSError:
        return None


def test_gives_up_after_max_attempts(tmp_path, source, result_dir):
    from orthanc import free_port

    cfg = make_config(tmp_path, destinations={"pacs": Destination(ae_title="NOBODY", host="127.0.0.1",
                                                                   port=free_port())},
                      dispatch_retry=RetryPolicy(max_attempts=3, backoff_base_s=0, backoff_max_s=0))
    store = Store(cfg.database_path)
    job_id = done_job(store, source, result_dir)
    did, _ = store.add_dispatch(job_id, "pacs", "dicom")
    assert Dispatcher(cfg, store).run_due() == 3  # zero backoff: retried at once, until attempts are used up
    d = _dispatch(store, did)
    assert d.state == "failed" and d.attempts == 3
    assert d.last_error is not None and d.last_error.startswith("gave up after 3 attempt(s)") and "cannot connect" in d.last_error


def test_origin_destination(tmp_path, orthanc, source, result_dir):
    cfg = make_config(tmp_path, known_aes={"MODALITY": KnownAE(host="127.0.0.1", port=orthanc.dicom_port,
                                                               ae_title=orthanc.aet)})
    store = Store(cfg.database_path)
    job_id = done_job(store, source, result_dir, calling_ae="MODALITY")
    did, _ = store.add_dispatch(job_id, "origin", "dicom")
    # a destination that is not configured fails at once (retrying cannot help)
    bad, _ = store.add_dispatch(job_id, "nowhere", "dicom")
    assert Dispatcher(cfg, store).run_due() == 2
    assert _dispatch(store, did).state == "sent"
    b = _dispatch(store, bad)
    assert b.state == "failed" and b.attempts == 1 and "unknown destination 'nowhere'" in (b.last_error or "")
    assert len(seg_instances(orthanc)) == 1


# ---------------------------------------------------------------------------- share drop

HOSTILE = {
    "PatientID": "../etc",
    "StudyDate": "",
    "AccessionNumber": "a/b\\c",
    "SeriesNumber": 2,
    "SeriesDescription": "Body\x00\x1b..\n/x",
}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_share_drop_sanitised_with_manifest(tmp_path, source, result_dir):
    cfg = make_config(tmp_path)
    store = Store(cfg.database_path)
    job_id = done_job(store, source, result_dir, tags_override=HOSTILE)
    did, _ = store.add_dispatch(job_id, "share", "share")
    assert Dispatcher(cfg, store).run_due() == 1
    d = _dispatch(store, did)
    assert d.state == "sent", d.last_error

    root = cfg.share.root
    folder = root / "etc" / f"{PLACEHOLDER}_a_b_c" / "2_Body_._x_bones"
    assert folder.is_dir(), sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == [root / "etc", folder.parent, folder]
    assert dispatch_log(store, dispatch_id=did)[-1]["location"] == str(folder)
    report = json.loads((result_dir / "report.json").read_text())
    # the QC pictures (qc/qc_*.png in the result folder) go beside the rest, under their own names
    sources = {n: result_dir / n for n in ("bones_seg.dcm", "report.json", *report["outputs"]["meshes"])}
    sources.update({Path(q).name: result_dir / q for q in report["outputs"]["qc"]})
    expected = set(sources)
    assert any(n.endswith(".stl") for n in expected) and any(n.endswith("_colored.ply") for n in expected)
    assert {"qc_cortical_axial.png", "qc_cortical_mesh.png"} <= expected
    assert _files(folder) == expected | {MANIFEST_NAME}

    m = json.loads((folder / MANIFEST_NAME).read_text())
    assert {o["name"] for o in m["outputs"]} == expected
    assert {o["kind"] for o in m["outputs"] if o["name"].startswith("qc_")} == {"qc"}
    for o in m["outputs"]:
        data = (folder / o["name"]).read_bytes()
        assert o["size"] == len(data) and o["sha256"] == hashlib.sha256(data).hexdigest()
        assert data == sources[o["name"]].read_bytes()
    assert m["folder"] == folder.relative_to(root).as_posix()
    assert m["input"]["series_instance_uid"] == source["series_uid"]
    assert m["input"]["study_instance_uid"] == source["study_uid"]
    assert m["input"]["instance_count"] == len(source["files"])
    assert m["input"]["source_ae"] == "MODALITY"
    assert m["job"]["id"] == job_id and m["job"]["rule"] == "body-ct-bones" and m["job"]["profile"] == "bones"
    assert m["job"]["backend"] == "hu_based" and m["job"]["rules_version"] == "testrules"
    assert m["seg_series_instance_uid"] == _job(store, job_id).seg_series_uid
    for k in ("dicom-node", "pydicom", "highdicom", "vtk"):
        assert m["software"][k] and m["software"][k] != "not installed"
    assert m["created"] and m["supersedes"] == []

    # idempotent: an operator retry of the same dispatch rewrites the same folder, nothing duplicated
    first = {p: p.stat().st_ino for p in folder.iterdir()}
    store.conn.execute("UPDATE dispatches SET state = 'pending', next_attempt_at = NULL WHERE id = ?", (did,))
    assert Dispatcher(cfg, store).run_due() == 1
    assert _dispatch(store, did).state == "sent"
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == [root / "etc", folder.parent, folder]
    assert _files(folder) == expected | {MANIFEST_NAME}  # no temp files left either
    assert all(p.stat().st_ino != ino for p, ino in first.items())  # really rewritten (rename over)
    m2 = json.loads((folder / MANIFEST_NAME).read_text())
    assert m2["outputs"] == m["outputs"]


def test_share_superseded_generation(tmp_path, source, result_dir):
    """Same folder (default template): the newer manifest names what it supersedes; an older one never
    overwrites a newer one.  Per-generation folders: the older folder gets a SUPERSEDED marker."""
    cfg = make_config(tmp_path, share=ShareConfig(root=tmp_path / "share",
                                                   path_template="{PatientID}/{SeriesNumber}_{organ}_g{generation}"))
    store = Store(cfg.database_path)
    old_id = done_job(store, source, result_dir)
    old_d, _ = store.add_dispatch(old_id, "share", "share")
    disp = Dispatcher(cfg, store)
    assert disp.run_due() == 1
    new_id = done_job(store, source, result_dir, generation_bump=1)
    new_d, _ = store.add_dispatch(new_id, "share", "share")
    assert disp.run_due() == 1
    pid = sanitize_component(source["headers"][0].PatientID)
    num = source["headers"][0].SeriesNumber
    old_folder, new_folder = cfg.share.root / pid / f"{num}_bones_g1", cfg.share.root / pid / f"{num}_bones_g2"
    m = json.loads((new_folder / MANIFEST_NAME).read_text())
    assert [s["job_id"] for s in m["supersedes"]] == [old_id]
    assert m["supersedes"][0]["folder"] == f"{pid}/{num}_bones_g1"
    marker = json.loads((old_folder / SUPERSEDED_NAME).read_text())
    assert marker["superseded_by"]["job_id"] == new_id and marker["superseded_by"]["folder"] == f"{pid}/{num}_bones_g2"
    assert (old_folder / MANIFEST_NAME).is_file()  # the older result is kept, only marked

    # default template: both generations share one folder; the newer replaces, the older cannot come back
    cfg2 = make_config(tmp_path / "b")
    store2 = Store(cfg2.database_path)
    a = done_job(store2, source, result_dir)
    b = done_job(store2, source, result_dir, generation_bump=1)
    db, _ = store2.add_dispatch(b, "share", "share")
    assert Dispatcher(cfg2, store2).run_due() == 1
    da, _ = store2.add_dispatch(a, "share", "share")  # the older one's dispatch comes late
    assert Dispatcher(cfg2, store2).run_due() == 1
    assert _dispatch(store2, db).state == "sent"
    late = _dispatch(store2, da)
    assert late.state == "failed" and (late.last_error or "").startswith("superseded:")
    (folder,) = {p.parent for p in cfg2.share.root.rglob(MANIFEST_NAME)}
    assert json.loads((folder / MANIFEST_NAME).read_text())["job"]["id"] == b


def test_share_folder_taken_by_another_series(tmp_path, source, result_dir):
    """Two series whose fields sanitise to the same names never overwrite each other."""
    from node.share import ShareFile, drop

    files = [ShareFile(result_dir / "report.json", "report.json", "report")]
    fields = {"PatientID": "", "organ": "bones"}
    a = drop(tmp_path, "{PatientID}/{organ}", fields, files, job={"id": 1, "profile": "bones"},
             inputs={"series_instance_uid": "1.2.3"})
    b = drop(tmp_path, "{PatientID}/{organ}", fields, files, job={"id": 2, "profile": "bones"},
             inputs={"series_instance_uid": "1.2.4"})
    b2 = drop(tmp_path, "{PatientID}/{organ}", fields, files, job={"id": 2, "profile": "bones"},
              inputs={"series_instance_uid": "1.2.4"})
    assert a.relative == f"{PLACEHOLDER}/bones" and b.relative.startswith(f"{PLACEHOLDER}/bones~")
    assert b2.relative == b.relative
    assert json.loads((a.folder / MANIFEST_NAME).read_text())["input"]["series_instance_uid"] == "1.2.3"


def test_share_unavailable_is_retried(tmp_path, source, result_dir):
    root = tmp_path / "share"
    root.write_text("not a folder")  # e.g. the share is not mounted / not writable
    cfg = make_config(tmp_path, share=ShareConfig(root=root))
    store = Store(cfg.database_path)
    did, _ = store.add_dispatch(done_job(store, source, result_dir), "share", "share")
    assert Dispatcher(cfg, store).run_due() == 1
    d = _dispatch(store, did)
    assert d.state == "pending" and d.last_error and d.next_attempt_at is not None and d.next_attempt_at > time.time()
    root.unlink()
    assert Dispatcher(cfg, store).run_due(now=d.next_attempt_at) == 1
    assert _dispatch(store, did).state == "sent"


@pytest.mark.parametrize(
    "template, message",
    [
        ("{PatientID}/{Nope}/", "unknown field {Nope}"),
        ("{PatientID.__class__}/", "not a plain field name"),
        ("/abs/{PatientID}", "must be a relative path"),
        ("../{PatientID}", "'.'/'..'"),
        ("{PatientID!r}", "conversions"),
    ],
)
def test_bad_template_is_a_config_error(tmp_path, template, message):
    cfg = make_config(tmp_path, share=ShareConfig(root=tmp_path / "share", path_template=template))
    with pytest.raises(ConfigError) as exc:
        Dispatcher(cfg, Store(cfg.database_path))
    assert "share.path_template" in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("../etc", "etc"),
        ("..", PLACEHOLDER),
        ("a/b\\c", "a_b_c"),
        ("x\x00y\x1f\x7fz\u202e", "x_y_z"),
        ("", PLACEHOLDER),
        (None, PLACEHOLDER),
        ("   ", PLACEHOLDER),
        (".hidden", "hidden"),
        ("a..b", "a.b"),
        ("CON", "_CON"),
        ('A<b>:c"d|e?f*', "A_b_c_d_e_f"),
        ("Müller^Hans", "Müller^Hans"),
        (["ORIGINAL", "PRIMARY"], "ORIGINAL-PRIMARY"),
        (3.0, "3"),
        ("x" * 300, "x" * 64),
    ],
)
def test_sanitize_component(value, expected):
    assert sanitize_component(value) == expected


def test_render_folder_never_escapes():
    evil = {k: "../../.." for k in ("PatientID", "StudyDate", "AccessionNumber", "SeriesNumber",
                                     "SeriesDescription", "organ")}
    rel = render_folder("{PatientID}/{StudyDate}_{AccessionNumber}/{SeriesNumber}_{SeriesDescription}_{organ}/", evil)
    parts = rel.split("/")
    assert len(parts) == 3 and all(p and not p.startswith(".") and ".." not in p for p in parts)
