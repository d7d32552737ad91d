"""Early start: a series is processed while it is still inside its quiet period, and the
result is held until completion confirms it (same rule, same instances) or drops it.

In process, on a real job store and the real router; the job "runs" by claiming it and
recording a result, as the worker pool does (the pool and the pipeline with a real node
are covered in tests/test_node_flow.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from node.completion import sweep
from node.config import load_config
from node.contracts import FailureKind, JobResult
from node.jobs import ensure_dispatches, record_success
from node.router import Router
from node.routing.rules import RuleSetHolder
from node.store import InstanceRecord, Store

REPO = Path(__file__).resolve().parent.parent

RULES = """
rules:
  - name: body-bones
    match:
      Modality: CT
      SeriesDescription: {regex: "(?i)body"}
      instance_count: {min: 3}
    profile: bones
    destinations: [pacs]
    share: true
"""

QUIET, EARLY = 10.0, 2.0


@pytest.fixture
def env(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "storage": str(tmp_path / "var"), "rules": str(rules), "profiles": str(REPO / "profiles"),
        "quiet_period_s": QUIET, "early_start_s": EARLY,
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}}}))
    cfg = load_config(cfg_file)
    assert cfg.early_start_enabled
    store = Store(cfg.database_path)
    holder = RuleSetHolder(rules)
    router = Router(cfg, store, holder)
    yield cfg, store, router, rules, holder
    store.close()


def add(store: Store, tmp: Path, series: str, n: int, t: float, desc: str = "CT Body") -> None:
    """Instances ``<series>.1`` .. ``<series>.n`` received at ``t`` (files are not needed: the router
    falls back on the tags the receiver indexed)."""
    for i in range(1, n + 1):
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series,
            study_uid="1.2", path=str(tmp / "absent" / f"{series}.{i}.dcm"), transfer_syntax="1.2.840.10008.1.2.1",
            size=1, calling_ae="SCANNER", called_ae="DICOMNODE", received_at=t,
            tags={"Modality": "CT", "SeriesDescription": desc}))


def start_early(store: Store, router: Router, tmp: Path) -> tuple[float, list]:
    """Three instances of series 1.1 received at ``t0`` (100 s ago) and routed early 2.5 s later;
    returns ``(t0, route_early's outcomes)``."""
    t0 = time.time() - 100
    add(store, tmp, "1.1", 3, t0)
    return t0, router.route_early(EARLY, now=t0 + 2.5)


def jobs_list(cfg, capsys) -> str:
    """``dicom-node jobs list`` on the test database (the operator's view)."""
    from node.cli import main

    capsys.readouterr()
    assert main(["jobs", "list", "--db", str(cfg.database_path)]) == 0
    return capsys.readouterr().out


def run_job(store: Store, cfg, now: float):
    """What the pool does: claim (early starts allowed), record the instance set, finish."""
    job = store.claim_job("w", now=now, early_quiet_s=cfg.early_start_s)
    if job is None:
        return None, None
    store.set_job_digest(job.id, store.series_digest(job.series_uid))
    job = store.get_job(job.id)
    return job, JobResult(output_dir=Path("/nonexistent"), seg_series_uid="1.2.3")


def test_early_start_held_then_published_at_completion(env, tmp_path, capsys):
    cfg, store, router, _, _ = env
    t0 = time.time() - 100
    add(store, tmp_path, "1.1", 3, t0)

    # quiet for 1 s: too early
    assert router.route_early(EARLY, now=t0 + 1) == []
    # quiet for 2 s: a provisional job; the series stays receiving
    (o,) = router.route_early(EARLY, now=t0 + 2.5)
    (job,) = store.list_jobs(series_uid="1.1")
    assert o.jobs == [job.id] and job.provisional and job.state == "queued"
    assert store.get_series("1.1").state == "receiving"
    assert router.route_early(EARLY, now=t0 + 3) == []  # once per generation
    # the pool without early start, or while the series is not quiet enough, does not take it
    assert store.claim_job("w", now=t0 + 3) is None
    assert store.claim_job("w", now=t0 + 1, early_quiet_s=EARLY) is None

    running, result = run_job(store, cfg, t0 + 3)
    assert running is not None and running.id == job.id
    assert record_success(cfg, store, running, result) == "held"
    held = store.get_job(job.id)
    assert held.state == "done" and held.provisional
    assert store.list_dispatches(job_id=job.id) == []  # nothing is sent before completion
    assert ensure_dispatches(cfg, store) == 0  # not even after a restart
    assert store.get_series("1.1").state == "receiving"
    assert re.search(rf"^\s*{job.id}\s+done/early\s", jobs_list(cfg, capsys), re.M)

    # the quiet period passes: the router confirms and publishes the held result
    assert sweep(store, QUIET, now=t0 + QUIET + 1) == ["1.1"]
    router.route_pending()
    done = store.get_job(job.id)
    assert done.state == "done" and not done.provisional and done.attempts == 1
    assert {(d.destination, d.kind) for d in store.list_dispatches(job_id=job.id)} == {("pacs", "dicom"),
                                                                                        ("share", "share")}
    assert store.get_series("1.1").state == "done"
    assert len(store.list_jobs(series_uid="1.1")) == 1
    assert re.search(rf"^\s*{job.id}\s+done\s", jobs_list(cfg, capsys), re.M)


def test_instances_during_early_start_restart_the_job(env, tmp_path):
    cfg, store, router, _, _ = env
    t0, _ = start_early(store, router, tmp_path)
    running, result = run_job(store, cfg, t0 + 3)
    assert running is not None

    # more instances while it runs: its result is for another instance set -> queued again,
    # the try not counted, and not due until the series is quiet again
    add(store, tmp_path, "1.1", 5, t0 + 4)  # 1.1.4 and 1.1.5 are new
    assert record_success(cfg, store, running, result) == "restarted"
    again = store.get_job(running.id)
    assert (again.state, again.attempts, again.provisional) == ("queued", 0, True)
    assert store.claim_job("w", now=t0 + 5, early_quiet_s=EARLY) is None
    running, result = run_job(store, cfg, t0 + 6.5)
    assert running is not None and running.id == again.id
    assert record_success(cfg, store, running, result) == "held"

    # a finished early start goes back to the queue when an instance arrives
    add(store, tmp_path, "1.1", 6, t0 + 8)
    back = store.get_job(running.id)
    assert (back.state, back.result, back.instances_digest) == ("queued", JobResult(), None)
    running, result = run_job(store, cfg, t0 + 10.5)
    assert record_success(cfg, store, running, result) == "held"

    sweep(store, QUIET, now=t0 + 8 + QUIET + 1)
    router.route_pending()
    (final,) = store.list_jobs(series_uid="1.1")
    assert final.state == "done" and not final.provisional
    assert final.instances_digest == store.series_digest("1.1")
    assert len(store.list_dispatches(job_id=final.id)) == 2


def test_done_on_other_instances_runs_again_at_completion(env, tmp_path):
    """A held result whose instance set differs from the complete series (e.g. a restart lost the
    in-memory state) is not published: the confirmed job runs again."""
    cfg, store, router, _, _ = env
    t0, _ = start_early(store, router, tmp_path)
    running, result = run_job(store, cfg, t0 + 3)
    assert record_success(cfg, store, running, result) == "held"
    store.set_job_digest(running.id, "0" * 16)  # as if it had run on another set
    sweep(store, QUIET, now=t0 + QUIET + 1)
    router.route_pending()
    job = store.get_job(running.id)
    assert (job.state, job.provisional) == ("queued", False)
    assert store.list_dispatches(job_id=job.id) == []
    assert store.get_series("1.1").state == "routed"


def test_unmatched_at_completion_drops_the_early_start(env, tmp_path):
    """The rules are evaluated again on the complete series: an early start whose rule no longer
    matches (here: the rule file changed meanwhile) is dropped, with the reason."""
    cfg, store, router, rules, holder = env
    t0, _ = start_early(store, router, tmp_path)
    running, result = run_job(store, cfg, t0 + 3)
    assert record_success(cfg, store, running, result) == "held"

    rules.write_text(RULES.replace("{min: 3}", "{min: 4}"))
    assert holder.reload_if_changed() == (True, None)
    sweep(store, QUIET, now=t0 + QUIET + 1)
    router.route_pending()
    job = store.get_job(running.id)
    assert job.state == "superseded" and "early start not confirmed" in job.error
    assert store.get_series("1.1").state == "unrouted"
    assert store.list_dispatches(job_id=job.id) == []


def test_rules_edit_between_early_start_and_completion(env, tmp_path):
    """Rules changed but still matching: the early start (old rules version) is dropped and the
    complete series gets a job under the new version, which produces the one result."""
    cfg, store, router, rules, holder = env
    t0, _ = start_early(store, router, tmp_path)
    rules.write_text(RULES + "\n# edited\n")
    assert holder.reload_if_changed() == (True, None)
    sweep(store, QUIET, now=t0 + QUIET + 1)
    router.route_pending()
    jobs = store.list_jobs(series_uid="1.1")
    assert [(j.state, j.provisional) for j in jobs] == [("superseded", True), ("queued", False)]


def test_confirmed_jobs_are_claimed_before_early_starts(env, tmp_path):
    cfg, store, router, _, _ = env
    t0, _ = start_early(store, router, tmp_path)  # series 1.1 early-started
    add(store, tmp_path, "1.9", 3, t0 - 50)  # complete long ago
    sweep(store, QUIET, now=t0 + 3)
    router.route_pending()
    first = store.claim_job("w", now=t0 + 3, early_quiet_s=EARLY)
    assert first is not None and first.series_uid == "1.9" and not first.provisional
    second = store.claim_job("w", now=t0 + 3, early_quiet_s=EARLY)
    assert second is not None and second.series_uid == "1.1" and second.provisional
    assert store.claim_job("w", now=t0 + 3, confirmed_only=True) is None


def test_early_start_off_when_not_shorter_than_quiet_period(tmp_path):
    cfg_file = tmp_path / "node.yaml"
    for quiet, early, on in ((10, 2, True), (2, 2, False), (10, 0, False)):
        cfg_file.write_text(yaml.safe_dump({"quiet_period_s": quiet, "early_start_s": early}))
        assert load_config(cfg_file).early_start_enabled is on


def test_routing_twice_reads_each_header_once(env, tmp_path, monkeypatch):
    """Early start and completion both evaluate the rules on the series' headers; the router's
    tag cache means each spool file is parsed once (spool files never change)."""
    import pydicom

    cfg, store, router, _, _ = env
    files = sorted((REPO.parent / "shared" / "data" / "ct-abdomen-siemens-j2k" / "dicom").glob("*.dcm"))
    if not files:
        pytest.skip("test data not found")
    t0 = time.time() - 100
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.record_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID), path=str(f),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), size=f.stat().st_size, received_at=t0,
            tags={"Modality": "CT"}))
    reads: list[str] = []
    real = pydicom.dcmread
    def counting_dcmread(p, *a, **k):
        reads.append(str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)
    (o,) = router.route_early(EARLY, now=t0 + 2.5)  # the real series is "CT ... body": body-bones
    sweep(store, QUIET, now=t0 + QUIET + 1)
    (done,) = router.route_pending()
    assert done.jobs == o.jobs
    assert sorted(reads) == sorted(map(str, files))  # once each, not twice


def test_failed_early_start_runs_again_on_more_instances(env, tmp_path):
    """An early start that fails on part of a series (bad input such as too few slices) is run
    again when more instances arrive, or at completion when it failed on another instance set;
    a failure on exactly the complete series stands and fails the series."""
    from node.jobs import record_failure

    cfg, store, router, _, _ = env
    t0, _ = start_early(store, router, tmp_path)
    job, _ = run_job(store, cfg, t0 + 3)
    assert record_failure(cfg, store, job, FailureKind.INPUT, "a single slice") == "failed"
    add(store, tmp_path, "1.1", 4, t0 + 4)  # one more instance: the failure was on a part of the series
    again = store.get_job(job.id)
    assert (again.state, again.provisional, again.attempts) == ("queued", True, 0)

    job, _ = run_job(store, cfg, t0 + 7)
    assert record_failure(cfg, store, job, FailureKind.INPUT, "still bad") == "failed"
    store.set_job_digest(job.id, "0" * 16)  # as if it had failed on another instance set
    sweep(store, QUIET, now=t0 + 4 + QUIET + 1)
    router.route_pending()
    assert (store.get_job(job.id).state, store.get_job(job.id).provisional) == ("queued", False)
    assert store.get_series("1.1").state == "routed"

    # on exactly the complete series the failure stands: the series fails with the reason
    job = store.claim_job("w")
    store.set_job_digest(job.id, store.series_digest("1.1"))
    assert record_failure(cfg, store, store.get_job(job.id), FailureKind.INPUT, "bad for good") == "failed"
    series = store.get_series("1.1")
    assert series.state == "failed" and "bad for good" in series.error


def test_failed_early_start_on_the_same_instances_fails_the_series_at_completion(env, tmp_path):
    from node.jobs import record_failure

    cfg, store, router, _, _ = env
    t0, _ = start_early(store, router, tmp_path)
    job, _ = run_job(store, cfg, t0 + 3)
    record_failure(cfg, store, job, FailureKind.INPUT, "not a CT")
    assert store.get_series("1.1").state == "receiving"  # nothing is decided before completion
    sweep(store, QUIET, now=t0 + QUIET + 1)
    router.route_pending()
    final = store.get_job(job.id)
    assert (final.state, final.provisional) == ("failed", False)
    series = store.get_series("1.1")
    assert series.state == "failed" and "not a CT" in series.error


def test_crash_in_the_middle_of_a_reconciliation(env, tmp_path):
    """Two early starts of one series; the node dies after confirming the first: on the next pass
    the second is confirmed too and its held result published (not left held forever)."""
    cfg, store, router, rules, holder = env
    rules.write_text(RULES.replace("    share: true", "    share: true\n    stop: false") + """
  - name: body-liver
    match:
      SeriesDescription: {regex: "(?i)body"}
    profile: liver
    destinations: [pacs]
""")
    assert holder.reload_if_changed() == (True, None)
    t0, _ = start_early(store, router, tmp_path)
    for _ in range(2):
        running, result = run_job(store, cfg, t0 + 3)
        assert record_success(cfg, store, running, result) == "held"
    first, second = store.list_jobs(series_uid="1.1")
    sweep(store, QUIET, now=t0 + QUIET + 1)
    store.confirm_job(first.id)  # ... and the node died here
    router.route_pending()
    for j in (first, second):
        j = store.get_job(j.id)
        assert (j.state, j.provisional) == ("done", False)
    assert {d.job_id for d in store.list_dispatches()} >= {second.id}
    assert store.get_series("1.1").state == "done"


def test_rule_with_early_start_false_waits_for_the_quiet_period(env, tmp_path):
    """A rule with ``early_start: false`` (a sender that pauses inside a series) gets its job at
    completion only; the other matching rules still start early."""
    cfg, store, router, rules, holder = env
    rules.write_text(RULES.replace("    share: true", "    share: true\n    stop: false\n    early_start: false")
                     + """
  - name: body-liver
    match:
      SeriesDescription: {regex: "(?i)body"}
    profile: liver
""")
    assert holder.reload_if_changed() == (True, None)
    assert [r.early_start for r in holder.ruleset.rules] == [False, True]
    t0, (o,) = start_early(store, router, tmp_path)
    assert [store.get_job(i).rule for i in o.jobs] == ["body-liver"]
    sweep(store, QUIET, now=t0 + QUIET + 1)
    router.route_pending()
    jobs = {j.rule: j for j in store.list_jobs(series_uid="1.1")}
    assert set(jobs) == {"body-bones", "body-liver"}
    assert not jobs["body-bones"].provisional and jobs["body-bones"].state == "queued"
    assert not jobs["body-liver"].provisional  # confirmed at completion


def test_rule_early_start_must_be_a_boolean(tmp_path):
    from node.routing.rules import RulesError, load_rules

    f = tmp_path / "r.yaml"
    f.write_text(RULES.replace("    share: true", "    share: true\n    early_start: maybe"))
    with pytest.raises(RulesError, match="'early_start' must be true or false"):
        load_rules(f)
