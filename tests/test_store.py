"""The SQLite job store: instances, quiet series, jobs, dispatches, concurrency."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from node.contracts import JobParams, JobResult, JobState, Resource
from node.store import SCHEMA_VERSION, InstanceRecord, Store


def rec(sop: str, series: str = "S1", study: str = "T1", at: float | None = None, **kw) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series,
        study_uid=study,
        path=f"/spool/{study}/{series}/{sop}.dcm",
        transfer_syntax="1.2.840.10008.1.2.4.90",
        size=100,
        calling_ae="CT01",
        called_ae="DICOMNODE",
        peer_address="127.0.0.1",
        received_at=at,
        tags=kw.pop("tags", {"Modality": "CT", "SeriesDescription": "CT Body 3.0", "ImageType": ["ORIGINAL", "PRIMARY"]}),
        **kw,
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "node.db")
    yield s
    s.close()


def test_migrate_idempotent_and_wal(tmp_path):
    s = Store(tmp_path / "node.db")
    assert s.migrate() == s.migrate() == s.schema_version() == SCHEMA_VERSION
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    s2 = Store(tmp_path / "node.db")  # reopen: no error, data kept
    assert s2.schema_version() == SCHEMA_VERSION
    s2.close()


def test_record_new_duplicate_and_series(store):
    t0 = time.time() - 100
    assert store.record_instance(rec("1", at=t0)) == "new"
    assert store.record_instance(rec("2", at=t0 + 1)) == "new"
    assert store.record_instance(rec("2", at=t0 + 5)) == "duplicate"
    inst = store.get_instance("2")
    assert inst.received_count == 2 and inst.tags["ImageType"] == ["ORIGINAL", "PRIMARY"]
    assert inst.calling_ae == "CT01" and inst.called_ae == "DICOMNODE"
    s = store.get_series("S1")
    assert s.instance_count == 2 and s.state == "receiving" and s.generation == 1
    assert s.last_received_at == pytest.approx(t0 + 1)  # a duplicate does not restart the clock
    assert s.tags["Modality"] == "CT"
    assert [i.sop_instance_uid for i in store.series_instances("S1")] == ["1", "2"]
    assert len(store.indexed_paths()) == 2


def test_quiet_period_uses_persisted_clock(tmp_path):
    s = Store(tmp_path / "node.db")
    now = time.time()
    s.record_instance(rec("1", series="OLD", at=now - 30))
    s.record_instance(rec("2", series="NEW", at=now - 2))
    s.close()
    s = Store(tmp_path / "node.db")  # "restart"
    assert [x.series_uid for x in s.quiet_series(10)] == ["OLD"]
    assert s.complete_series("OLD", quiet_period_s=10)
    assert not s.complete_series("OLD", quiet_period_s=10)  # already complete
    assert not s.complete_series("NEW", quiet_period_s=10)  # not quiet yet
    assert (old := s.get_series("OLD")) is not None and old.state == "complete"
    assert s.quiet_series(10) == []
    assert [x.series_uid for x in s.quiet_series(1)] == ["NEW"]
    s.close()


def test_late_instance_reopens_series_new_generation(store):
    t0 = time.time() - 100
    store.record_instance(rec("1", at=t0))
    assert store.complete_series("S1", quiet_period_s=10)
    jid, created = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v1", generation=1)
    assert created
    store.record_instance(rec("9"))  # arrives after completion
    s = store.get_series("S1")
    assert s.state == "receiving" and s.generation == 2 and s.instance_count == 2
    assert store.get_job(jid).state == "superseded"
    # stale stage working on generation 1 cannot overwrite the state
    assert not store.set_series_state("S1", "routed", from_states=("complete",), generation=1)


def test_series_state_transitions(store):
    store.record_instance(rec("1", at=time.time() - 50))
    assert not store.set_series_state("S1", "routed", from_states=("complete",))
    assert store.complete_series("S1", quiet_period_s=1)
    assert store.set_series_state("S1", "routed", from_states=("complete",), generation=1)
    assert store.set_series_state("S1", "processing", from_states=("routed",))
    assert store.set_series_state("S1", "done", generation=1)
    s = store.get_series("S1")
    assert s.state == "done" and s.processed_generation == 1
    assert [x.series_uid for x in store.list_series("done")] == ["S1"]
    with pytest.raises(ValueError):
        store.set_series_state("S1", "bogus")


def test_job_unique_per_series_rule_version_generation(store):
    store.record_instance(rec("1"))
    a = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v1", generation=1)
    b = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v1", generation=1)
    assert a[1] and not b[1] and a[0] == b[0]
    c = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v2", generation=1)
    assert c[1] and c[0] != a[0]
    # the constraint holds in the database itself, not only in create_job
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute(
            "INSERT INTO jobs (series_uid, rule, profile, backend, rules_version, generation, created_at)"
            " VALUES ('S1','liver','p','b','v1',1,0)"
        )


def test_claim_fail_retry_complete(store):
    store.record_instance(rec("1"))
    jid, _ = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v", generation=1,
                              max_attempts=2, params=JobParams(destinations=("pacs",), share=True))
    job = store.claim_job("w1")
    assert job.id == jid and job.state == "running" and job.attempts == 1
    assert job.params == JobParams(destinations=("pacs",), share=True)
    assert store.claim_job("w2") is None
    assert store.fail_job(jid, "boom", retry_at=time.time() + 60) == "queued"
    assert store.claim_job("w1") is None  # not due yet
    job = store.claim_job("w1", now=time.time() + 61)
    assert job.attempts == 2
    assert store.fail_job(jid, "boom again", retry_at=time.time()) == "failed"  # attempts exhausted
    assert store.get_job(jid).error == "boom again"
    jid2, _ = store.create_job("S1", "spleen", profile="spleen", backend="b", rules_version="v", generation=1)
    store.claim_job("w1")
    assert store.complete_job(jid2, JobResult(seg=Path("/out/seg.dcm"), meshes=(Path("/out/m.stl"),),
                                              seg_series_uid="1.2.3"))
    j = store.get_job(jid2)
    assert j.state == "done" and j.result.seg == Path("/out/seg.dcm") and j.seg_series_uid == "1.2.3"
    assert j.result.meshes == (Path("/out/m.stl"),)
    assert not store.complete_job(jid2, JobResult())  # not running any more
    assert [x.id for x in store.list_jobs("failed")] == [jid]


def test_requeue_running_on_startup(tmp_path):
    s = Store(tmp_path / "node.db")
    s.record_instance(rec("1"))
    jid, _ = s.create_job("S1", "liver", profile="liver", backend="b", rules_version="v", generation=1)
    s.claim_job("w1")
    s.close()  # crash
    s = Store(tmp_path / "node.db")
    (running,) = s.list_jobs(JobState.RUNNING)
    assert s.requeue_job(running.id, "interrupted (node restarted)", counts_as_try=True)
    job = s.claim_job("w1")
    assert job is not None and job.id == jid and job.attempts == 2
    s.close()


def test_dispatch_bookkeeping(store):
    store.record_instance(rec("1"))
    jid, _ = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v", generation=1)
    d1, created = store.add_dispatch(jid, "pacs", "dicom")
    assert created and store.add_dispatch(jid, "pacs", "dicom") == (d1, False)
    d2, _ = store.add_dispatch(jid, "share", "share")
    with pytest.raises(ValueError):
        store.add_dispatch(jid, "x", "ftp")
    a = store.claim_dispatch(lease_s=60)
    b = store.claim_dispatch(lease_s=60)
    assert {a.id, b.id} == {d1, d2} and store.claim_dispatch() is None
    assert store.mark_dispatch_failed(d1, "peer down", retry_at=time.time() - 1) == "pending"
    again = store.claim_dispatch()
    assert again.id == d1 and again.attempts == 2 and again.last_error == "peer down"
    assert store.mark_dispatch_sent(d1)
    assert store.mark_dispatch_failed(d2, "rejected") == "failed"
    assert store.get_dispatch(d1).state == "sent" and store.get_dispatch(d1).sent_at
    assert [d.state for d in store.list_dispatches(job_id=jid)] == ["sent", "failed"]
    # a dispatcher that died: its lease expires and the dispatch is due again
    d3, _ = store.add_dispatch(jid, "pacs2", "dicom")
    store.claim_dispatch(lease_s=5)
    assert store.claim_dispatch() is None
    assert store.claim_dispatch(now=time.time() + 6).id == d3


def _claim_all(path: str, worker: str, q) -> None:
    s = Store(path)
    got = []
    while (job := s.claim_job(worker)) is not None:
        got.append(job.id)
    q.put(got)


def test_claim_is_exclusive_across_processes_and_threads(tmp_path):
    path = tmp_path / "node.db"
    s = Store(path)
    for i in range(40):
        s.record_instance(rec(str(i), series=f"S{i}"))
        s.create_job(f"S{i}", "r", profile="p", backend="b", rules_version="v", generation=1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(path), f"p{i}", q)) for i in range(3)]
    for p in procs:
        p.start()
    thread_got: list[int] = []

    def claim_in_thread() -> None:
        while (job := s.claim_job("thread")) is not None:
            thread_got.append(job.id)

    threads = [threading.Thread(target=claim_in_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [j for _ in procs for j in q.get(timeout=30)] + thread_got
    for p in procs:
        p.join(timeout=30)
    assert sorted(got) == sorted(j.id for j in s.list_jobs())
    assert len(got) == len(set(got)) == 40
    assert all(j.state == "running" and j.attempts == 1 for j in s.list_jobs())


def test_dispatch_attempts_are_logged_in_the_store(tmp_path):
    s = Store(tmp_path / "node.db")
    s.record_instance(rec("1"))
    job_id, _ = s.create_job("S1", "r", profile="bones", backend="hu_based", rules_version="v", generation=1)
    did, _ = s.add_dispatch(job_id, "pacs", "dicom")
    d = s.get_dispatch(did)
    assert d is not None
    s.record_dispatch_attempt(d, started_at=1.0, outcome="retry", detail="peer down", location=None)
    s.record_dispatch_attempt(d, started_at=2.0, outcome="sent", detail="ok", location="PACS@h:104")
    log = s.dispatch_attempts(job_id=job_id)
    assert [a["outcome"] for a in log] == ["retry", "sent"] and log[-1]["location"] == "PACS@h:104"
    assert s.dispatch_attempts(dispatch_id=did + 1) == []


def test_requeue_job_counts_the_try_or_gives_it_back(store):
    """One operation puts a job back in the queue: the try counted or not, due now or at retry_at,
    the result kept or discarded, the reason kept as the job's error."""
    store.record_instance(rec("1"))
    jid, _ = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v", generation=1,
                              max_attempts=3)
    assert not store.requeue_job(jid, "not running", counts_as_try=True)  # only from running (by default)
    job = store.claim_job("w1")
    store.set_job_early_seg(jid, Path("/results/1-seg.dcm"), "1.2.3")

    # not counted (the node stopped it itself): attempts given back, due at once, the early SEG stays
    assert store.requeue_job(jid, "interrupted (node shut down)", counts_as_try=False)
    j = store.get_job(jid)
    assert (j.state, j.attempts, j.next_attempt_at, j.error) == ("queued", 0, None, "interrupted (node shut down)")
    assert j.result.seg_early == Path("/results/1-seg.dcm")
    assert not store.requeue_job(jid, "again", counts_as_try=False)  # queued already: no change
    assert store.get_job(jid).attempts == 0

    # counted, with backoff: attempts kept, due at retry_at, the end of the failed try recorded
    job = store.claim_job("w1")
    assert job.attempts == 1
    retry_at = time.time() + 60
    assert store.requeue_job(jid, "boom", counts_as_try=True, retry_at=retry_at)
    j = store.get_job(jid)
    assert (j.state, j.attempts, j.error) == ("queued", 1, "boom")
    assert j.next_attempt_at == pytest.approx(retry_at) and j.finished_at is not None
    assert store.claim_job("w1") is None  # not due yet
    assert store.claim_job("w1", now=retry_at + 1).attempts == 2

    # counted, due at once (a crash cut the try short)
    assert store.requeue_job(jid, "interrupted (node restarted)", counts_as_try=True)
    j = store.get_job(jid)
    assert (j.state, j.attempts, j.next_attempt_at) == ("queued", 2, None)

    # a result computed on another instance set: discarded, the try not counted
    store.claim_job("w1")
    store.set_job_digest(jid, "0" * 16)
    assert store.complete_job(jid, JobResult(output_dir=Path("/results/1"), seg_series_uid="1.2.3"))
    assert not store.requeue_job(jid, "stale", counts_as_try=False, discard_result=True)  # done: not by default
    assert store.requeue_job(jid, "stale", counts_as_try=False, discard_result=True, from_states=("done",))
    j = store.get_job(jid)
    assert (j.state, j.attempts, j.error, j.result) == ("queued", 2, "stale", JobResult())
    assert (j.seg_series_uid, j.instances_digest, j.finished_at, j.next_attempt_at) == (None, None, None, None)


def test_attempts_given_back_never_go_below_zero(store):
    store.record_instance(rec("1"))
    jid, _ = store.create_job("S1", "liver", profile="liver", backend="b", rules_version="v", generation=1)
    assert store.requeue_job(jid, "x", counts_as_try=False, from_states=("queued",))
    assert store.get_job(jid).attempts == 0


def _insert_job(store: Store, params: str, result: str, state: str = "done") -> int:
    """A job row as written by the code before the typed records (raw JSON columns)."""
    return int(store.conn.execute(
        "INSERT INTO jobs (series_uid, rule, profile, backend, rules_version, generation, state, params, result,"
        " created_at) VALUES ('S1', ?, 'bones', 'hu_based', 'v', 1, ?, ?, ?, 0) RETURNING id",
        (f"r{time.monotonic_ns()}", state, params, result)).fetchone()[0])


def test_job_rows_in_the_json_shape_written_before_stay_readable(store):
    """params and result as the router and the worker pool wrote them (json_patch dropped nulls
    from the slot), and results naming their folder, SEG, report and meshes by the legacy keys."""
    import json

    store.record_instance(rec("1"))
    params = {"destinations": ["pacs", "origin"], "share": True, "backend_override": None, "calling_ae": "CT01",
              "rule_line": 12, "supersede": False,
              "slot": {"name": "cpu0", "kind": "cpu", "pid": 4242, "process": "job", "device": "auto",
                       "cuda_visible_devices": ""}}
    result = {"output_dir": "/var/results/7", "seg": "/var/results/7/bones_seg.dcm",
              "meshes": ["/var/results/7/bones_cortical.stl"], "report": "/var/results/7/report.json",
              "seg_series_uid": "1.2.3", "timings_s": {"total": 12.5}, "seg_early": "/var/results/7-seg.dcm",
              "backend": {"name": "hu_based", "process": {"pid": 4242, "persistent": False}},
              "origin": {"calling_ae": "CT01", "ae_title": "CT01", "host": "10.0.0.5", "port": 104}}
    job = store.get_job(_insert_job(store, json.dumps(params), json.dumps(result)))
    assert job.params.destinations == ("pacs", "origin") and job.params.share and not job.params.supersede
    assert (job.params.calling_ae, job.params.rule_line, job.params.backend_override) == ("CT01", 12, None)
    assert job.params.slot is not None and (job.params.slot.name, job.params.slot.pid) == ("cpu0", 4242)
    assert job.params.slot.gpu is None and job.params.slot.cuda_visible_devices == ""
    r = job.result
    assert r.output_dir == Path("/var/results/7") and r.seg == Path("/var/results/7/bones_seg.dcm")
    assert r.meshes == (Path("/var/results/7/bones_cortical.stl"),) and r.report == Path("/var/results/7/report.json")
    assert r.seg_early == Path("/var/results/7-seg.dcm") and r.timings_s == {"total": 12.5}
    assert r.backend["process"]["pid"] == 4242
    assert r.origin is not None and (r.origin.host, r.origin.port, r.origin.ae_title) == ("10.0.0.5", 104, "CT01")
    # written back, the same JSON
    assert r.to_json() == result
    assert job.params.to_json() == params

    # the legacy keys of the result folder, the SEG, the report and the meshes
    for key in ("result_dir", "dir", "folder", "outputs_dir"):
        legacy = store.get_job(_insert_job(store, "{}", json.dumps({key: "/old/3"}))).result
        assert legacy.output_dir == Path("/old/3"), key
    legacy = store.get_job(_insert_job(store, "{}", json.dumps(
        {"seg_path": "/old/4/x_seg.dcm", "report_path": "/old/4/r.json", "mesh_paths": ["/old/4/a.stl"]}))).result
    assert legacy.seg == Path("/old/4/x_seg.dcm") and legacy.output_dir == Path("/old/4")  # the SEG's folder
    assert legacy.report == Path("/old/4/r.json") and legacy.meshes == (Path("/old/4/a.stl"),)
    # output_dir comes first; rows without params or result, or with an empty mesh list
    both = store.get_job(_insert_job(store, "{}", json.dumps({"folder": "/b", "output_dir": "/a"}))).result
    assert both.output_dir == Path("/a")
    bare = store.get_job(_insert_job(store, "{}", json.dumps({"output_dir": "/c", "meshes": []}), "queued"))
    assert bare.params == JobParams() and bare.params.supersede and bare.result.meshes == ()
    assert store.get_job(_insert_job(store, "{}", "{}")).result == JobResult()


# -- group commit of the index (Store.record_instances, Store.record_instance_grouped) --------------

def _prefixed(r: InstanceRecord, p: str) -> InstanceRecord:
    return InstanceRecord(**{**r.__dict__, "sop_instance_uid": p + r.sop_instance_uid, "series_uid": p + r.series_uid,
                             "study_uid": p + r.study_uid, "path": r.path.replace("/spool/", f"/spool/{p}")})


def _index_state(store: Store, p: str) -> dict:
    """What the index holds for the UIDs starting with ``p`` (prefix cut off; job ids left out)."""
    like = (p + "%",)

    def rows(sql: str) -> list:
        # UIDs and paths without the prefix (tags and search text hold none)
        return sorted(tuple(x.replace(p, "") if isinstance(x, str) and k not in ("tags", "search") else x
                            for k, x in zip(r.keys(), r)) for r in store.conn.execute(sql, like))

    return {
        "instances": rows("SELECT sop_instance_uid, series_uid, path, size, received_at, last_received_at,"
                          " received_count, tags FROM instances WHERE sop_instance_uid LIKE ?"),
        "series": rows("SELECT series_uid, instance_count, state, generation, first_received_at, last_received_at,"
                       " tags, search, error FROM series WHERE series_uid LIKE ?"),
        "jobs": rows("SELECT series_uid, rule, state, attempts, provisional, error, result FROM jobs"
                     " WHERE series_uid LIKE ?"),
        "refused": rows("SELECT sop_instance_uid, reason FROM refused_instances WHERE sop_instance_uid LIKE ?"),
    }


def _index_scenario(store: Store, p: str, t0: float) -> list[InstanceRecord]:
    """Series in every state record_instance treats differently; returns the instances to index next."""
    # an early start that finished on EARLY's first instance (goes back to queued on a new one)
    store.record_instance(_prefixed(rec("e1", series="EARLY", at=t0), p))
    jid, _ = store.create_job(p + "EARLY", "r", profile="p", backend="b", rules_version="v", generation=1,
                              provisional=True, resource=Resource.GPU)
    claimed = store.claim_job("w", now=t0 + 60, early_quiet_s=1, kinds=[Resource.GPU])
    assert claimed is not None and claimed.id == jid and store.complete_job(jid)
    # a complete series with a queued job (a new instance: generation 2, the job superseded)
    store.record_instance(_prefixed(rec("d1", series="DONE", at=t0), p))
    assert store.complete_series(p + "DONE", quiet_period_s=1, now=t0 + 10)
    store.create_job(p + "DONE", "r", profile="p", backend="b", rules_version="v", generation=1)
    # an instance refused for want of space (its refusal row goes when it arrives)
    store.record_refusal(p + "r1", p + "REF", p + "T1", "disk full", now=t0)
    batch = [rec("e2", series="EARLY", at=t0 + 20), rec("d2", series="DONE", at=t0 + 21),
             rec("r1", series="REF", at=t0 + 22, tags={"Modality": "CT", "PatientID": "P123"}), rec("n1", series="NEW", at=t0 + 23),
             rec("n1", series="NEW", at=t0 + 24),  # the same SOP instance twice in one batch
             rec("n2", series="NEW", at=t0 + 25), rec("e1", series="EARLY", at=t0 + 26)]
    return [_prefixed(r, p) for r in batch]


def test_record_instances_in_one_transaction_as_one_by_one(store):
    t0 = time.time() - 1000
    one = _index_scenario(store, "a.", t0)
    many = _index_scenario(store, "b.", t0)
    outcomes_one = [store.record_instance(r) for r in one]
    outcomes_many = store.record_instances(many)
    assert outcomes_one == outcomes_many == ["new", "new", "new", "new", "duplicate", "new", "duplicate"]
    a, b = _index_state(store, "a."), _index_state(store, "b.")
    assert a == b
    assert a["refused"] == [] and {s[0]: s[3] for s in a["series"]} == {"DONE": 2, "EARLY": 1, "NEW": 1, "REF": 1}
    assert sorted((j[0], j[2]) for j in a["jobs"]) == [("DONE", "superseded"), ("EARLY", "queued")]
    # the series a refusal made gets its tags from its first instance; the others keep their first's
    assert {x[0]: (x[1], x[6]) for x in a["series"]}["REF"] == (1, '{"Modality": "CT", "PatientID": "P123"}')
    refused = store.get_series("b.REF")
    assert refused is not None and refused.tags["PatientID"] == "P123" and "p123" in (refused.search or "")


def test_one_failing_instance_of_a_batch_fails_alone(store):
    t0 = time.time() - 100
    store.record_refusal("bad", "S1", "T1", "disk full", now=t0)
    bad = InstanceRecord(**{**rec("bad", at=t0 + 1).__dict__, "sop_class_uid": None})  # NOT NULL in the table
    out = store.record_instances([rec("1", at=t0), bad, rec("2", at=t0 + 2)])
    assert out[0] == out[2] == "new" and isinstance(out[1], sqlite3.IntegrityError)
    assert store.get_instance("bad") is None and store.get_instance("1") and store.get_instance("2")
    # the failed instance's own statements before the failing one were undone (its savepoint)
    assert [r[0] for r in store.refused_instances("S1")] == ["bad"]
    assert store.get_series("S1").instance_count == 2
    # through the batching front: the error goes to its caller alone
    with pytest.raises(sqlite3.IntegrityError):
        store.record_instance_grouped(InstanceRecord(**{**bad.__dict__, "received_at": t0 + 3}))
    assert store.record_instance_grouped(rec("3", at=t0 + 4)) == "new"


def test_concurrent_callers_get_the_content_and_outcomes_of_one_by_one(store):
    threads, per_thread = 16, 12
    t0 = time.time() - 1000

    def work(k: int) -> list[InstanceRecord]:
        # 4 series shared by all threads (one receive time and the same tags per series, so that the
        # order of arrival does not matter), and every SOP instance sent by two threads
        return [rec(f"{(k // 2)}.{i}", series=f"S{i % 4}", at=t0 + i % 4) for i in range(per_thread)]

    for i in range(per_thread):
        store.record_instance(_prefixed(rec(f"x{i}", series=f"S{i % 4}", at=t0 + i % 4), "one."))
    expected: dict[str, list[str]] = {}
    for k in range(threads):
        for r in work(k):
            expected.setdefault(r.sop_instance_uid, []).append(store.record_instance(_prefixed(r, "one.")))

    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)
    for i in range(per_thread):
        store.record_instance(_prefixed(rec(f"x{i}", series=f"S{i % 4}", at=t0 + i % 4), "many."))

    def run(k: int) -> None:
        try:
            start.wait()
            for r in work(k):
                outcome = store.record_instance_grouped(_prefixed(r, "many."))
                with lock:
                    got.setdefault(r.sop_instance_uid, []).append(outcome)
        except BaseException as exc:  # noqa: BLE001 - any failure in a thread, asserted below
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    # each SOP instance: one "new", one "duplicate", whichever thread came first
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
    assert all(sorted(v) == ["duplicate", "new"] for v in got.values())
    assert _index_state(store, "many.") == _index_state(store, "one.")
    group = store._index_group
    assert group is not None and group.items == threads * per_thread and group.pending() == 0


def test_callers_waiting_meanwhile_are_indexed_in_one_transaction(store):
    """While one batch waits for the write lock, the callers arriving are all in the next one."""
    began: list[int] = []
    tx = store.engine.transaction

    def counted():  # every transaction the store begins, on either engine
        began.append(1)
        return tx()

    store.engine.transaction = counted
    out: dict[str, str] = {}
    callers = 8
    with store.transaction():  # another writer holds the lock
        began.clear()
        ts = [threading.Thread(target=lambda k=k: out.__setitem__(str(k), store.record_instance_grouped(rec(str(k)))))
              for k in range(callers)]
        ts[0].start()
        deadline = time.monotonic() + 10
        while not began and time.monotonic() < deadline:  # the first caller leads, waiting for the lock
            time.sleep(0.005)
        for t in ts[1:]:
            t.start()
        while store._index_group.pending() < callers - 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store._index_group.pending() == callers - 1
    for t in ts:
        t.join(30)
    assert out == {str(k): "new" for k in range(callers)}
    assert len(began) == 2  # the first caller alone, then the 7 that queued behind it
    assert (store._index_group.batches, store._index_group.items) == (2, callers)
    assert store.get_series("S1").instance_count == callers


def test_group_commit_a_failed_batch_is_done_again_item_by_item():
    """When a batch's transaction fails as a whole (nothing committed), each of its items is run
    alone: only the item that fails alone fails; and a lone caller never waits for company."""
    from node.store_group import GroupCommit

    gate = threading.Event()
    done_alone: list[str] = []

    def run_batch(items):
        if list(items) == ["first"]:
            gate.wait(10)  # the first batch is slow: the others queue meanwhile
        if "poison" in items:
            raise sqlite3.OperationalError("the transaction failed")
        return [f"{i}:batch" for i in items]

    def run_one(item):
        if item == "poison":
            raise ValueError("poison alone")
        done_alone.append(item)
        return f"{item}:alone"

    group: GroupCommit[str, str] = GroupCommit(run_batch, run_one)
    assert group.submit("solo") == "solo:batch" and (group.batches, group.items) == (1, 1)
    results: dict[str, object] = {}

    def call(item: str) -> None:
        try:
            results[item] = group.submit(item)
        except Exception as exc:  # noqa: BLE001 - the item's error is what the test checks
            results[item] = exc

    first = threading.Thread(target=call, args=("first",))
    first.start()
    while group._busy is False:
        time.sleep(0.001)
    others = [threading.Thread(target=call, args=(i,)) for i in ("a", "poison", "b")]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while group.pending() < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    for t in [first, *others]:
        t.join(10)
    assert results["first"] == "first:batch" and results["a"] == "a:alone" and results["b"] == "b:alone"
    assert isinstance(results["poison"], ValueError) and done_alone == ["a", "b"]
    assert (group.batches, group.items, group.pending(), group._busy) == (3, 5, 0, False)


def test_deferred_checkpoints_leave_the_wal_to_the_checkpoint_call(tmp_path):
    """The node's store (Store.defer_checkpoints): no commit checkpoints SQLite's write-ahead log
    (that commit synced the database file holding the write lock, and the C-STOREs behind it waited);
    Store.checkpoint() does it, and the log is then written from its start again."""
    from node.store import Store as S

    def fill(store: S, n: int) -> None:
        for k in range(n):  # about one 4 KB page each
            store.add_audit("test.fill", username="t", detail={"pad": "x" * 3800, "k": k})

    def wal_mb(store: S) -> float:
        return store.path.with_name(store.path.name + "-wal").stat().st_size / 1e6

    default = S(tmp_path / "default.db")
    deferred = S(tmp_path / "deferred.db")
    try:
        deferred.defer_checkpoints()
        fill(default, 3000)
        fill(deferred, 3000)
        assert wal_mb(default) < 6  # SQLite's autocheckpoint at 1000 pages kept reusing it
        grown = wal_mb(deferred)
        assert grown > 10  # nothing checkpointed it
        deferred.checkpoint()
        fill(deferred, 1000)
        assert wal_mb(deferred) <= grown  # checkpointed: written from its start again, not appended to
        assert deferred.count_audit("test.fill", since=0) == 4000
    finally:
        default.close()
        deferred.close()
