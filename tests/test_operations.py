"""The operator's actions (node/operations.py) on a real node (``dicom-node serve`` in a subprocess,
series sent with DCMTK storescu): cancel a running job (its process is killed) and retry it to
done, re-run a done series with another profile, route an unrouted series with a chosen rule,
release a quarantined instance into the spool (checked and indexed as if received: its series is
routed and processed) or delete one, and refuse what cannot be done, each with the reason."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pydicom
import pytest

from node.config import load_config
from node.contracts import JobState
from node.operations import cancel, delete_quarantined, release, rerun, retry, route_now
from node.spool import Spool
from test_node_flow import DICOM_NODE, J2K, STORESCU, ct_files, ct_series_uid, job_of, mr_series, node_factory, wait_for  # noqa: F401 - node_factory: a fixture used by name

pytestmark = [
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found: {J2K}"),
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu not installed"),
]
PUBLISHED = J2K.parent / "dicom-as-published"

RULES = """
rules:
  - name: body-liver
    match: {Modality: CT, SeriesDescription: {regex: "(?i)body"}}
    profile: liver
    share: true
  - name: knee-liver
    match: {SeriesDescription: {regex: "never matches"}}
    profile: liver
    share: false
"""


@pytest.fixture
def node(node_factory):  # noqa: F811 - the fixture imported above, used by name
    n = node_factory(workers=1)
    (n.tmp / "rules.yaml").write_text(RULES)
    return n.start()


def test_cancel_retry_rerun_route(node, tmp_path: Path) -> None:
    cfg = load_config(node.config)
    node.send(ct_files())
    uid = ct_series_uid()
    job = wait_for(lambda: job_of(node, uid, ("running",)), 90, "the job to run")
    pid = wait_for(lambda: (lambda j: j.params.slot.pid if j.params.slot else None)(node.jobs(series_uid=uid)[0]), 30,
                   "the job's process")
    s = node.store()
    try:
        out = cancel(s, job.id, by="operator")
        assert out.ok and out.detail == {"state_before": "running"}, out
        assert not cancel(s, job.id, by="operator").ok  # failed now: nothing to cancel
        # the pool kills the process within a second or so
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15,
                 "the cancelled job's process to end")
        j = s.get_job(job.id)
        assert j.state == JobState.FAILED and j.error == "cancelled by operator"
        wait_for(lambda: s.get_series(uid).state == "failed", 10, "the series to settle")
        time.sleep(2)
        assert s.get_job(job.id).state == JobState.FAILED  # the killed try is not retried by the pool
        # retry: queued with fresh attempts, runs to done, with its QC pictures
        assert retry(s, job.id).ok
        done = wait_for(lambda: (lambda j: j if j.state in ("done", "failed") else None)(s.get_job(job.id)), 120,
                        "the retried job")
        assert done.state == "done", done.error
        assert done.result.qc and all(p.is_file() for p in done.result.qc)
        assert s.get_series(uid).state == "done"
        # re-run with another profile: a new job on the same series, its own SEG identity
        out = rerun(cfg, s, uid, profile="bones", by="operator")
        assert out.ok and out.job_id is not None
        again = wait_for(lambda: (lambda j: j if j.state in ("done", "failed") else None)(s.get_job(out.job_id)), 120,
                         "the re-run")
        assert again.state == "done" and again.profile == "bones" and again.rule == "manual:bones"
        assert again.seg_series_uid != done.seg_series_uid
        assert not rerun(cfg, s, uid, profile="bonez", by="operator").ok
        assert not rerun(cfg, s, uid, rule="nope", by="operator").ok
        assert not route_now(cfg, s, uid, "body-liver", by="operator").ok  # not unrouted
    finally:
        s.close()

    # an unrouted series routed now with a chosen rule: the job the rule would have made
    files, mr_uid = mr_series(tmp_path / "mr", "MR knee")
    node.send(files)
    wait_for(lambda: (node.series(mr_uid) or None) and node.series(mr_uid).state == "unrouted", 60, "unrouted")
    s = node.store()
    try:
        out = route_now(cfg, s, mr_uid, "knee-liver", by="operator")
        assert out.ok, out
        j = s.get_job(out.job_id)
        assert j.rule == "knee-liver" and j.rules_version == out.detail["rules_version"]
        failed = wait_for(lambda: (lambda j: j if j.state in ("done", "failed") else None)(s.get_job(out.job_id)),
                          90, "the routed job")
        assert failed.state == "failed" and "bad input" in (failed.error or "")  # an MR for a CT profile
        assert s.get_series(mr_uid).state == "failed"
    finally:
        s.close()


def send_as_published(port: int, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The as-published files (empty UIDs) as they are: storescu cannot send them; pynetdicom in
    chunked mode takes the SOP UIDs from the file meta and sends the bytes raw."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # sop_class makes its names at import

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="PYTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.90"])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def test_quarantine_release_and_delete(node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(node.config)
    spool = Spool(cfg.spool_dir, cfg.quarantine_dir)
    # refused by the receiver: empty UIDs; releasing them is refused again, with the reason
    assert send_as_published(node.port, sorted(PUBLISHED.iterdir())[:2], monkeypatch) == [0xA900] * 2
    entries = wait_for(lambda: spool.quarantined() if len(spool.quarantined()) == 2 else None, 30, "the quarantine")
    s = node.store()
    try:
        out = release(cfg, s, entries[0].path.name)
        assert not out.ok and "missing or empty" in out.message and entries[0].path.is_file()
        out = delete_quarantined(cfg, entries[0].path.name)
        assert out.ok and not entries[0].path.exists() and len(spool.quarantined()) == 1
        assert not delete_quarantined(cfg, entries[0].path.name).ok
        assert not release(cfg, s, "../node.db").ok  # only names the quarantine lists
        # an instance held back for a reason since fixed (kept by the node's own quarantine
        # function): released, it is indexed as if received now and its series is processed
        src = ct_files()
        for f in src:
            spool.quarantine(f.read_bytes(), "held for the test", sop=str(pydicom.dcmread(f, stop_before_pixels=True)
                                                                          .SOPInstanceUID), calling="SCANNER")
        held = [e for e in spool.quarantined() if e.reason == "held for the test"]
        assert len(held) == len(src)
        for e in held:
            out = release(cfg, s, e.path.name)
            assert out.ok and out.detail["outcome"] == "new", out
        assert [e.reason for e in spool.quarantined()] == [entries[1].reason]
        uid = ct_series_uid()
        series = s.get_series(uid)
        assert series is not None and series.instance_count == len(src) and series.calling_ae == "SCANNER"
        done = wait_for(lambda: job_of(node, uid, ("done", "failed")), 120, "the released series' job")
        assert done.state == "done", done.error
        # the same actions from the shell (dicom-node jobs ...), audited as shell:<user>
        out = node.cli("delete-quarantined", entries[1].path.name)
        assert "deleted" in out and spool.quarantined() == []
        r = subprocess.run([*DICOM_NODE, "jobs", "rerun", uid, "--profile", "bonez", "--config", str(node.config)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "unknown profile 'bonez'" in r.stdout
        assert "nothing to cancel" in subprocess.run([*DICOM_NODE, "jobs", "cancel", str(done.id), "--config",
                                                      str(node.config)], capture_output=True, text=True, timeout=60).stdout
        audit = [(a["action"], a["detail"]["ok"]) for a in s.list_audit(limit=10) if a["username"].startswith("shell:")]
        assert ("quarantine.delete", True) in audit and ("series.rerun", False) in audit
    finally:
        s.close()
