"""Outputs beside the SEG on their way (issue 14): rule schema, dispatch planning, the store's
new dispatch kind, and delivery to real peers: Orthanc by C-STORE (checked through its REST
API) and Orthanc's DICOMweb plugin by STOW-RS, with the server's per-instance failure reasons."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.config import (
    BasicAuth,
    Destination,
    NetworkTimeouts,
    NodeConfig,
    RetryPolicy,
    ShareConfig,
    StowAuth,
    StowDestination,
)
from node.dicomweb import stow
from node.dispatcher import Dispatcher, dispatch_log
from node.pipeline.outputs import OutputOptions, OverlayStyle
from node.pipeline.outputs.options import dispatch_kinds
from node.routing.rules import RulesError, parse_rules
from node.contracts import JobParams, JobResult
from node.dicom_values import tags_from_dataset
from node.jobs import _add_dispatches, _dispatch_plan
from node.store import (
    SCHEMA_VERSION,
    Dispatch,
    InstanceRecord,
    Job,
    Store,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ALL = OutputOptions(("seg", "sr", "overlay", "stl"))

needs_data = pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)")


# ---------------------------------------------------------------------------- rules and planning


RULES = """\
rules:
  - name: all
    match: {Modality: CT}
    profile: bones
    destinations: [pacs, archive]
    outputs: [seg, sr, overlay, stl]
    overlay:
      style: outline
      opacity: 0.5
      window: [300, 1500]
      jpeg: false
      series_description: "{profile} overlay of {SeriesDescription}"
  - name: default
    match: {Modality: CT}
    profile: liver
"""


def test_rule_outputs_parse_and_default() -> None:
    rs = parse_rules(RULES, known_destinations=["pacs", "archive"])
    r = rs.rules[0]
    assert r.outputs == OutputOptions(("seg", "sr", "overlay", "stl"),
                                      OverlayStyle(mode="outline", opacity=0.5, window=(300.0, 1500.0), jpeg=False),
                                      "{profile} overlay of {SeriesDescription}")
    assert rs.rules[1].outputs == OutputOptions()  # no outputs: the SEG, as before


@pytest.mark.parametrize(("snippet", "message", "line"), [
    ("    outputs: [seg, pdf]\n", "unknown output 'pdf'", 5),
    ("    outputs:\n      - sr\n", "output 'sr' references the SEG's segments", 5),
    ("    overlay: {style: fill}\n", "'overlay' options without 'overlay' in outputs", 5),
    ("    outputs: [overlay]\n    overlay: {style: dots}\n", "overlay.style must be one of fill, outline", 6),
    ("    outputs: [overlay]\n    overlay:\n      opacity: 3\n", "overlay.opacity must be a number", 7),
    ("    outputs: [overlay]\n    overlay:\n      colour: red\n", "overlay: unknown key 'colour'", 7),
    ("    outputs: [overlay]\n    overlay: {series_description: 'x {'}\n", "bad template", 6),
])
def test_rule_outputs_errors_name_the_line(snippet: str, message: str, line: int) -> None:
    text = "rules:\n  - name: r\n    match: {Modality: CT}\n    profile: bones\n" + snippet
    with pytest.raises(RulesError) as err:
        parse_rules(text)
    assert any(message in i.message and i.line == line for i in err.value.issues), err.value.issues


def test_dispatch_kinds_per_destination_type() -> None:
    assert dispatch_kinds(OutputOptions(), stow=False) == ("dicom",)  # unchanged for existing rules
    assert dispatch_kinds(ALL, stow=False) == ("dicom", "outputs")
    assert dispatch_kinds(OutputOptions(("overlay",)), stow=False) == ("outputs",)
    assert dispatch_kinds(OutputOptions(), stow=True) == ("outputs",)  # STOW-RS: everything at once
    assert dispatch_kinds(ALL, stow=True) == ("outputs",)


def test_worker_plans_dispatches_from_the_rule_outputs(tmp_path: Path) -> None:
    cfg = NodeConfig(storage=tmp_path / "var", port=0, destinations={
        "pacs": Destination(ae_title="PACS", host="127.0.0.1", port=104),
        "archive": StowDestination(stow="http://127.0.0.1:8042/dicom-web"),
    })
    store = Store(cfg.database_path)
    store.record_instance(InstanceRecord("1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2", "/x", "1.2.840.10008.1.2", 1))

    def plan(params: dict[str, Any], rule: str) -> list[tuple[str, str, str | None]]:
        # the params as the router writes them to the job row, read back as the job store reads them
        job_id, _ = store.create_job("1.2.3", rule, profile="bones", backend="hu_based", rules_version="v",
                                     generation=1, params=JobParams.from_json(params))
        return [(p.destination, p.kind, p.error) for p in _dispatch_plan(cfg, store, _job(store, job_id))[0]]

    assert plan({"destinations": ["pacs", "archive"], "share": True, **ALL.to_params()}, "a") == [
        ("pacs", "dicom", None), ("pacs", "outputs", None), ("archive", "outputs", None), ("share", "share", None)]
    # a job routed before outputs existed
    assert plan({"destinations": ["pacs"], "share": False}, "b") == [("pacs", "dicom", None)]


def test_stow_destination_config() -> None:
    d = StowDestination.model_validate({"stow": "https://archive/dicom-web/", "auth": {"bearer": {"token": "t"}}})
    assert d.stow == "https://archive/dicom-web" and d.auth is not None and d.auth.bearer is not None
    with pytest.raises(ValueError, match="exactly one of basic, bearer"):
        StowAuth.model_validate({})


# ---------------------------------------------------------------------------- store


def test_schema_6_migrates_dispatch_rows_and_takes_kind_outputs(tmp_path: Path) -> None:
    """A store written at schema 5 keeps its dispatches (and their ids) and accepts 'outputs'."""
    import node.store as S

    path = tmp_path / "node.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (5)")
    for stmt in ";".join(S._MIGRATIONS[:5]).split(";"):
        if stmt.strip().startswith("@add_column"):
            _, table, column, decl = stmt.split(None, 3)
            S._add_column(con, table, column, decl)
        elif stmt.strip():
            con.execute(stmt)
    con.execute("INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at, state,"
                " state_changed_at) VALUES ('1.2', '1.1', 0, 0, 'done', 0)")
    con.execute("INSERT INTO jobs (series_uid, rule, profile, backend, rules_version, generation, state,"
                " created_at) VALUES ('1.2', 'r', 'bones', 'hu_based', 'v', 0, 'done', 0)")
    con.execute("INSERT INTO dispatches (job_id, destination, kind, state, attempts, created_at, sent_at)"
                " VALUES (1, 'pacs', 'dicom', 'sent', 1, 0, 1)")
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO dispatches (job_id, destination, kind, created_at) VALUES (1, 'pacs', 'outputs', 0)")
    con.commit()
    con.close()
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION  # through 6 (dispatch kind outputs) to the newest
    (old,) = store.list_dispatches(job_id=1)
    assert (old.id, old.kind, old.state) == (1, "dicom", "sent")
    did, created = store.add_dispatch(1, "pacs", "outputs")
    assert created and did == 2
    assert store.add_dispatch(1, "pacs", "outputs") == (2, False)
    with pytest.raises(ValueError, match="dispatch kind"):
        store.add_dispatch(1, "pacs", "pdf")


# ---------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (bones) with every output."""
    if not J2K.is_dir():
        pytest.skip(f"test data not found at {J2K}")
    from node.pipeline.run import run_pipeline

    out = tmp_path_factory.mktemp("result") / "1"
    run_pipeline([J2K], "bones", out, seg_series_uid="1.2.826.0.1.3680043.8.498.14002.1", outputs=ALL)
    return out


def _config(tmp_path: Path, **kw: Any) -> NodeConfig:
    kw.setdefault("dispatch_retry", RetryPolicy(max_attempts=5, backoff_base_s=30, backoff_max_s=600))
    return NodeConfig(storage=tmp_path / "var", port=0, share=ShareConfig(root=tmp_path / "share"),
                      timeouts=NetworkTimeouts(acse_s=10, dimse_s=30, network_s=30, connect_s=3), **kw)


def _claim(store: Store, now: float) -> Dispatch:
    d = store.claim_dispatch(now=now)
    assert d is not None
    return d


def _job(store: Store, job_id: int) -> Job:
    j = store.get_job(job_id)
    assert j is not None
    return j


def _done_job(store: Store, result_dir: Path, params: dict[str, Any]) -> int:
    """A done job of the real series whose params are ``params`` (the JSON the router writes)."""
    files = sorted(J2K.glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.record_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID), path=str(f),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), size=f.stat().st_size, calling_ae="CT",
            called_ae="DICOMNODE", peer_address="127.0.0.1", tags=tags_from_dataset(ds),
        ))
    series_uid = str(ds.SeriesInstanceUID)
    series = store.get_series(series_uid)
    assert series is not None
    job_id, _ = store.create_job(series_uid, "all", profile="bones", backend="hu_based", rules_version="t",
                                 generation=series.generation, params=JobParams.from_json(params))
    claimed = store.claim_job("test")
    assert claimed is not None and claimed.id == job_id
    report = json.loads((result_dir / "report.json").read_text())
    store.complete_job(job_id, JobResult(output_dir=result_dir, report=result_dir / "report.json",
                                         seg_series_uid=report["outputs"]["seg_series_instance_uid"]))
    return job_id


def _by_modality(pacs: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in pacs.series():
        m = s["MainDicomTags"].get("Modality", "")
        out[m] = out.get(m, 0) + len(s["Instances"])
    return out


def _add_planned(cfg: NodeConfig, store: Store, job_id: int) -> None:
    assert _add_dispatches(cfg, store, _job(store, job_id)) > 0


@needs_data
def test_every_object_by_c_store_to_orthanc(tmp_path: Path, orthanc: Any, result_dir: Path) -> None:
    """SEG ('dicom') and SR + overlay + STL ('outputs') reach Orthanc; the STL's SOP class was
    proposed (it is in no default context list) and the overlay kept its JPEG transfer syntax."""
    cfg = _config(tmp_path, destinations={"pacs": Destination(ae_title=orthanc.aet, host="127.0.0.1",
                                                               port=orthanc.dicom_port)})
    store = Store(cfg.database_path)
    job_id = _done_job(store, result_dir, {"destinations": ["pacs"], "share": False, **ALL.to_params()})
    _add_planned(cfg, store, job_id)
    assert Dispatcher(cfg, store).run_due() == 2
    states = {d.kind: (d.state, d.last_error) for d in store.list_dispatches(job_id=job_id)}
    assert states == {"dicom": ("sent", None), "outputs": ("sent", None)}
    assert _by_modality(orthanc) == {"SEG": 1, "SR": 1, "OT": 20, "M3D": 3}
    m3d = next(s for s in orthanc.series() if s["MainDicomTags"]["Modality"] == "M3D")
    tags = orthanc.instance_tags(m3d["Instances"][0])
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.104.3"
    ot = next(s for s in orthanc.series() if s["MainDicomTags"]["Modality"] == "OT")
    meta = orthanc.get(f"/instances/{ot['Instances'][0]}/metadata?expand")
    assert meta["TransferSyntax"] == "1.2.840.10008.1.2.4.50"
    attempt = [a for a in dispatch_log(store, job_id=job_id) if a["outcome"] == "sent"][-1]
    assert "24/24 instance(s) stored" in attempt["detail"]


@needs_data
def test_overlay_goes_uncompressed_to_a_peer_without_jpeg(tmp_path: Path, result_dir: Path) -> None:
    from orthanc import Orthanc, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    with Orthanc(tmp_path / "orthanc", config={"JpegTransferSyntaxAccepted": False}) as pacs:
        cfg = _config(tmp_path, destinations={"pacs": Destination(ae_title=pacs.aet, host="127.0.0.1",
                                                                   port=pacs.dicom_port)})
        store = Store(cfg.database_path)
        job_id = _done_job(store, result_dir, {"destinations": ["pacs"], "share": False,
                                               **OutputOptions(("overlay",)).to_params()})
        _add_planned(cfg, store, job_id)
        assert Dispatcher(cfg, store).run_due() == 1
        assert _by_modality(pacs) == {"OT": 20}
        ot = pacs.series()[0]
        iid = ot["Instances"][0]
        assert pacs.get(f"/instances/{iid}/metadata?expand")["TransferSyntax"] in (
            "1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        assert pacs.instance_tags(iid)["PhotometricInterpretation"] == "RGB"


def _dicomweb_orthanc(tmp_path: Path, auth: tuple[str, str] | None = None, **config: Any) -> Any:
    from orthanc import Orthanc, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc's DICOMweb plugin not installed (apt-get install orthanc-dicomweb)")
    cfg = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **config}
    return Orthanc(tmp_path / "orthanc-dicomweb", config=cfg, auth=auth)


@needs_data
def test_every_object_by_stow_rs_in_one_request(tmp_path: Path, result_dir: Path) -> None:
    pacs = _dicomweb_orthanc(tmp_path, auth=("node", "s3cret"))
    try:
        secret = tmp_path / "pw"
        secret.write_text("s3cret\n")
        cfg = _config(tmp_path, destinations={"archive": StowDestination(
            stow=pacs.url + "/dicom-web", auth=StowAuth(basic=BasicAuth(username="node", password_file=secret)))})
        store = Store(cfg.database_path)
        job_id = _done_job(store, result_dir, {"destinations": ["archive"], "share": False, **ALL.to_params()})
        _add_planned(cfg, store, job_id)
        assert [d.kind for d in store.list_dispatches(job_id=job_id)] == ["outputs"]
        assert Dispatcher(cfg, store).run_due() == 1
        (d,) = store.list_dispatches(job_id=job_id)
        assert d.state == "sent", d.last_error
        (attempt,) = dispatch_log(store, job_id=job_id)
        assert "25/25 instance(s) stored" in attempt["detail"] and "(1 STOW-RS request(s))" in attempt["detail"]
        assert attempt["location"] == pacs.url + "/dicom-web"
        assert _by_modality(pacs) == {"SEG": 1, "SR": 1, "OT": 20, "M3D": 3}
        # without the password the archive refuses: a transient failure, retried with backoff
        cfg.destinations["archive"] = StowDestination(stow=pacs.url + "/dicom-web")
        did, _ = store.add_dispatch(job_id, "archive2", "outputs")
        cfg.destinations["archive2"] = cfg.destinations.pop("archive")
        now = time.time()
        out = Dispatcher(cfg, store).dispatch_one(_claim(store, now), now=now)
        assert out.dispatch_id == did and out.state == "pending" and "HTTP 401" in out.detail
    finally:
        pacs.stop()


@needs_data
def test_stow_rs_records_failure_reasons_and_retries_until_the_archive_is_back(
        tmp_path: Path, result_dir: Path) -> None:
    """An archive that is down: retried with backoff.  Up, it refuses one instance (of another
    study than the request's): the server's FailureReason is recorded and the dispatch retried."""
    from orthanc import Orthanc

    folder = tmp_path / "result"
    shutil.copytree(result_dir, folder)
    sr = folder / "bones_sr.dcm"
    ds = pydicom.dcmread(sr)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.save_as(sr)
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc's DICOMweb plugin not installed")
    pacs = Orthanc(tmp_path / "orthanc-dicomweb", start=False, config={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    cfg = _config(tmp_path, destinations={"archive": StowDestination(stow=pacs.url + "/dicom-web", timeout_s=10)})
    store = Store(cfg.database_path)
    job_id = _done_job(store, folder, {"destinations": ["archive"], "share": False,
                                       **OutputOptions(("seg", "sr")).to_params()})
    _add_planned(cfg, store, job_id)
    now = time.time()
    out = Dispatcher(cfg, store).dispatch_one(_claim(store, now), now=now)
    assert out.state == "pending" and out.retry_at == pytest.approx(now + 30)
    assert "Connection" in out.detail
    try:
        pacs.start()
        later = now + 31
        out = Dispatcher(cfg, store).dispatch_one(_claim(store, later), now=later)
        assert out.state == "pending" and out.retry_at == pytest.approx(later + 60)
        assert "1/2 instance(s) stored" in out.detail
        assert f"{ds.SOPInstanceUID}: FailureReason 0x0110 (processing failure)" in out.detail
        log = dispatch_log(store, job_id=job_id)
        assert [a["outcome"] for a in log] == ["retry", "retry"] and "FailureReason" in log[-1]["detail"]
        assert _by_modality(pacs) == {"SEG": 1}
    finally:
        pacs.stop()


@needs_data
def test_stow_splits_when_asked(tmp_path: Path, result_dir: Path) -> None:
    pacs = _dicomweb_orthanc(tmp_path)
    try:
        files = sorted((result_dir / "bones_overlay").glob("*.dcm"))
        r = stow(files, pacs.url + "/dicom-web", max_request_bytes=300_000)
        assert r.ok and r.requests > 2 and len(r.sent) == 20
        assert _by_modality(pacs) == {"OT": 20}
    finally:
        pacs.stop()
