"""The worker pool keeps its job claims (leases) while a job runs, and stops a job whose claim ran
out and was taken by another node: real pool, real job process, real store (SQLite; the same
statements run on PostgreSQL, tests/test_store_pg.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from node.config import NodeConfig
from node.contracts import JobParams, JobState, SeriesState
from node.pool import WorkerPool
from node.store import InstanceRecord, Store


def _wait(pred, timeout_s: float, what: str, every: float = 0.05):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def one_job(tmp_path):
    from ai_helpers import SYNTH_TISSUES, write_case_series

    from node.tools.synth_shapes import make_case

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "synth_hu.yaml").write_text(yaml.safe_dump(
        {"name": "synth_hu", "description": "synthetic shapes", "model_type": "hu_based", "tissues": SYNTH_TISSUES},
        sort_keys=False))
    files = write_case_series(make_case(3), tmp_path / "dicom")
    store = Store(tmp_path / "var" / "node.db")
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        store.record_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID), path=str(f),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), size=f.stat().st_size))
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert store.complete_series(uid, quiet_period_s=0)
    store.set_series_state(uid, SeriesState.ROUTED, from_states=(SeriesState.COMPLETE,))
    jid, _ = store.create_job(uid, "r", profile="synth_hu", backend="hu_based", rules_version="v", generation=1,
                              max_attempts=1, params=JobParams(destinations=(), share=False))
    cfg = NodeConfig(storage=tmp_path / "var", profiles=profiles, workers=1, job_timeout_s=300,
                     store={"job_lease_s": 5}, models={"threads": 1}, log_level="INFO")
    yield store, cfg, jid
    store.close()


def test_running_job_claim_renewed_then_stopped_when_claimed_elsewhere(one_job, caplog):
    store, cfg, jid = one_job
    pool = WorkerPool(cfg, store, poll_s=0.1)
    results = Path(cfg.results_dir)
    pool.start()
    try:
        # hold the job process inside its pipeline (SIGSTOP), so the job stays running however fast it is
        tmp = _wait(lambda: list(results.glob(f".{jid}.tmp-*")), 60, "the pipeline to start", 0.01)[0]
        job_pid = int(tmp.name.rsplit("-", 1)[1])
        os.killpg(job_pid, signal.SIGSTOP)
        first = store.get_job(jid)
        assert first.state == JobState.RUNNING and first.worker and first.lease_until is not None
        assert first.lease_until <= time.time() + 5
        # renewed every sixth of the lease while it runs
        _wait(lambda: store.get_job(jid).lease_until > first.lease_until + 0.5, 10, "the claim to be renewed")
        assert store.requeue_expired_jobs() == []
        # the claim ran out (this node stalled) and another node took the job: this node stops its try
        store.conn.execute("UPDATE jobs SET worker = 'elsewhere:1:cpu0' WHERE id = ?", (jid,))
        _wait(lambda: not pool.running_jobs, 10, "the pool to stop the job")
        _wait(lambda: not _alive(job_pid), 10, "the job process to end")
        row = store.get_job(jid)
        assert row.state == JobState.RUNNING and row.worker == "elsewhere:1:cpu0"  # the other node's now
        assert "its claim ran out" in caplog.text
    finally:
        pool.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
