"""The job lifecycle after a try (node/jobs.py): the ``origin`` destination resolved in one place,
for the dispatch plan when a job finishes and for the dispatcher when it sends."""

from __future__ import annotations

from pathlib import Path

from node.config import KnownAE, NodeConfig
from node.contracts import JobParams, JobResult, OriginAddress
from node.jobs import record_success, resolve_origin
from node.store import InstanceRecord, Job, Store


def _job(job: Job | None) -> Job:
    assert job is not None
    return job


def _store_with_job(tmp_path: Path, calling_ae: str | None) -> tuple[Store, int]:
    store = Store(tmp_path / "node.db")
    store.record_instance(InstanceRecord(
        sop_instance_uid="1.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid="1.1", study_uid="1",
        path=str(tmp_path / "1.dcm"), transfer_syntax="1.2.840.10008.1.2.1", size=1, calling_ae="SERIES_AE"))
    job_id, _ = store.create_job("1.1", "r", profile="bones", backend="hu_based", rules_version="v", generation=1,
                                 params=JobParams(destinations=("origin",), calling_ae=calling_ae))
    return store, job_id


def test_origin_from_the_job_else_the_series_calling_ae(tmp_path):
    cfg = NodeConfig(storage=tmp_path, known_aes={"CT01": KnownAE(host="10.0.0.5", port=104),
                                                  "SERIES_AE": KnownAE(host="10.0.0.6", port=11112, ae_title="PACS2")})
    store, job_id = _store_with_job(tmp_path, "CT01")
    o = resolve_origin(cfg, store, _job(store.get_job(job_id)))
    assert o.calling_ae == "CT01" and o.destination is not None
    assert o.destination.as_tuple() == ("CT01", "10.0.0.5", 104)
    store.close()
    store, job_id = _store_with_job(tmp_path / "b", None)  # routed without a calling AE: the series'
    o = resolve_origin(cfg, store, _job(store.get_job(job_id)))
    assert o.calling_ae == "SERIES_AE" and o.destination is not None
    assert o.destination.as_tuple() == ("PACS2", "10.0.0.6", 11112)
    store.close()


def test_origin_recorded_when_the_job_finishes_is_the_dispatchers_fallback(tmp_path):
    cfg = NodeConfig(storage=tmp_path, known_aes={"CT01": KnownAE(host="10.0.0.5", port=104)})
    store, job_id = _store_with_job(tmp_path, "CT01")
    job = _job(store.claim_job("w"))
    assert record_success(cfg, store, job, JobResult(output_dir=tmp_path / "results" / str(job_id))) == "done"
    done = _job(store.get_job(job_id))
    assert done.result.origin == OriginAddress(calling_ae="CT01", ae_title="CT01", host="10.0.0.5", port=104)
    assert [(d.destination, d.state) for d in store.list_dispatches(job_id=job_id)] == [("origin", "pending")]

    moved = NodeConfig(storage=tmp_path)  # known_aes edited since: the AE is no longer known
    assert resolve_origin(moved, store, done).destination is None  # the plan of a new dispatch: unknown
    fallback = resolve_origin(moved, store, done, recorded=True).destination  # the dispatcher: recorded
    assert fallback is not None and fallback.as_tuple() == ("CT01", "10.0.0.5", 104)
    store.close()


def test_origin_without_an_address_is_a_failed_dispatch_with_the_reason(tmp_path):
    store, job_id = _store_with_job(tmp_path, "CT01")
    job = _job(store.claim_job("w"))
    assert record_success(NodeConfig(storage=tmp_path), store, job, JobResult(output_dir=tmp_path)) == "done"
    (d,) = store.list_dispatches(job_id=job_id)
    assert d.state == "failed" and "calling AE 'CT01' has no address in known_aes" in (d.last_error or "")
    assert _job(store.get_job(job_id)).result.origin is None
    store.close()
