"""The node as a whole, with real processes: ``dicom-node serve`` as a subprocess, DCMTK
``storescu`` as the scanner, the real pipeline in the worker pool.  No mocks.

Covers: receive -> quiet period -> routing -> job -> results (SEG, STL, report) and
dispatch rows; unrouted series kept and visible; bad input failed without retry
(and ``jobs retry``); SIGKILL of the node while a job runs and while instances
arrive; a per-job timeout that really kills the job process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pydicom
import pytest
import yaml

from node.contracts import JobResult
from node.jobs import seg_series_uid
from node.store import Store

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
MR_NII = DATA / "mr-small" / "mr.nii.gz"
DICOM_NODE = [sys.executable, "-c", "import sys; from node.cli import main; sys.exit(main())"]
STORESCU = "/usr/bin/storescu"  # DCMTK's (the venv also has pynetdicom's storescu)

pytestmark = [
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found: {J2K}"),
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu not installed"),
]

RULES = """
rules:
  - name: body-bones
    match:
      Modality: CT
      SeriesDescription: {regex: "(?i)body"}
    profile: bones
    destinations: [origin]
    share: true
  - name: forced-bones
    match:
      SeriesDescription: {regex: "force-bones"}
    profile: bones
    share: false
"""


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Node:
    """``dicom-node serve`` in a subprocess, on a temp storage folder."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        self.tmp = tmp
        self.storage = tmp / "var"
        (tmp / "rules.yaml").write_text(RULES)
        cfg = {
            "port": 0,
            "storage": str(self.storage),
            "quiet_period_s": 2,
            "workers": 1,
            "rules": str(tmp / "rules.yaml"),
            "profiles": str(REPO / "profiles"),
            "log_level": "INFO",
            "share": {"root": str(tmp / "share")},
            "job_retry": {"max_attempts": 3, "backoff_base_s": 1, "backoff_max_s": 2},
        }
        cfg.update(overrides)
        self.config = tmp / "node.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> "Node":
        self.starts += 1
        self.log = self.tmp / f"node-{self.starts}.log"
        self.proc = subprocess.Popen(
            [*DICOM_NODE, "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True, cwd=self.tmp,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # one line once listening
        m = re.search(r"listening as DICOMNODE on port (\d+), storage (.+)$", line.strip())
        assert m, f"unexpected first line {line!r}; log:\n{self.log.read_text()[-3000:]}"
        self.port = int(m.group(1))
        assert Path(m.group(2)) == self.storage
        return self

    def kill(self) -> list[int]:
        """SIGKILL the node (not its children); returns the pids of its descendants at that moment."""
        assert self.proc is not None
        kids = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return kids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def store(self) -> Store:
        return Store(self.storage / "node.db", migrate=False)

    def send(self, files: list[Path], *, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([STORESCU, "-xv", "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(self.port),
                            *map(str, files)], capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, r.stdout + r.stderr
        return r

    def cli(self, *args: str) -> str:
        r = subprocess.run([*DICOM_NODE, "jobs", *args, "--config", str(self.config)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def jobs(self, **kw: Any) -> list:
        s = self.store()
        try:
            return s.list_jobs(**kw)
        finally:
            s.close()

    def series(self, uid: str):
        s = self.store()
        try:
            return s.get_series(uid)
        finally:
            s.close()


@pytest.fixture
def node_factory(tmp_path: Path):
    nodes: list[Node] = []

    def make(**overrides: Any) -> Node:
        n = Node(tmp_path, **overrides)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


def ct_files() -> list[Path]:
    return sorted(J2K.glob("*.dcm"))


def ct_series_uid() -> str:
    return str(pydicom.dcmread(ct_files()[0], stop_before_pixels=True).SeriesInstanceUID)


def mr_series(out: Path, description: str) -> tuple[list[Path], str]:
    from node.tools.synth_series import write_series

    files = write_series(MR_NII, out, modality="MR", series_description=description, size=(48, 48, 6))
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def job_of(node: Node, series_uid: str, states: tuple[str, ...]) -> Any:
    jobs = [j for j in node.jobs(series_uid=series_uid) if j.state in states]
    return jobs[0] if jobs else None


def kill_inside_pipeline(node: Node, job_id: int) -> tuple[list[int], int]:
    """SIGKILL the node while job *job_id*'s pipeline runs, however fast this machine runs it.

    Waits for the pipeline's folder (``.<id>.tmp-<job pid>``: the job process is inside
    ``run_pipeline``), holds the job's process group (a session of its own) with SIGSTOP,
    kills the node, then lets the job go on: it is left to its node watch.  Returns the
    node's descendants at the kill and the job's pid.
    """
    results = node.storage / "results"
    try:
        tmp = wait_for(lambda: list(results.glob(f".{job_id}.tmp-*")), 60, "the pipeline to start", 0.01)[0]
    except AssertionError as exc:  # say what the job did instead
        job = next((j for j in node.jobs() if j.id == job_id), None)
        raise AssertionError(f"{exc}; job {job_id}: {job and (job.state, job.attempts, job.error)}; node log:\n"
                             f"{node.log.read_text()[-4000:]}") from None
    job_pid = int(tmp.name.rsplit("-", 1)[1])
    os.killpg(job_pid, signal.SIGSTOP)
    try:
        assert not (results / str(job_id)).exists(), "the job finished before it could be held"
        kids = node.kill()
    finally:
        os.killpg(job_pid, signal.SIGCONT)
    return kids, job_pid


def test_flow_done_unrouted_and_bad_input(node_factory, tmp_path):
    """CT -> done with SEG/STL/report and dispatch rows; MR to a CT profile -> failed, not retried;
    MR no rule matches -> unrouted, kept and listed; the jobs command shows all of it."""
    node = node_factory().start()
    bad_files, bad_uid = mr_series(tmp_path / "mr-bad", "MR force-bones")
    other_files, other_uid = mr_series(tmp_path / "mr-other", "MR knee")
    node.send(ct_files())
    node.send(bad_files)
    node.send(other_files)
    ct_uid = ct_series_uid()

    job = wait_for(lambda: job_of(node, ct_uid, ("done", "failed")), 90, "the CT job to finish")
    assert job.state == "done", job.error
    assert job.attempts == 1 and job.rule == "body-bones" and job.profile == "bones"
    assert len(job.rules_version) == 16
    # result files
    out = node.storage / "results" / str(job.id)
    seg = out / "bones_seg.dcm"
    assert seg.is_file() and (out / "report.json").is_file()
    assert sorted(p.name for p in out.glob("*.stl")), "no STL written"
    assert job.result.seg == seg
    ds = pydicom.dcmread(seg, stop_before_pixels=True)
    assert ds.Modality == "SEG"
    assert ds.SeriesInstanceUID == job.seg_series_uid == seg_series_uid(job)
    # dispatch rows: share, and origin (SCANNER has no known address -> failed with the reason)
    s = node.store()
    try:
        disp = {(d.kind, d.destination): d for d in s.list_dispatches(job_id=job.id)}
        ct_series = s.get_series(ct_uid)
    finally:
        s.close()
    assert set(disp) == {("share", "share"), ("dicom", "origin")}
    # the SEG was handed on before the meshes were done: its C-STORE row predates the job's end,
    # the share drop (the whole result) follows it
    assert disp[("dicom", "origin")].created_at <= job.finished_at <= disp[("share", "share")].created_at
    assert job.result.seg_early == node.storage / "results" / f"{job.id}-seg.dcm"
    assert os.path.samefile(job.result.seg_early, seg)  # a hard link, not a copy
    assert disp[("dicom", "origin")].state == "failed"
    assert "known_aes" in (disp[("dicom", "origin")].last_error or "")
    assert ct_series.state == "done" and ct_series.instance_count == 20

    # bad input: failed at once, with the reason, not retried
    bad = wait_for(lambda: job_of(node, bad_uid, ("failed", "done")), 60, "the MR job to fail")
    assert bad.state == "failed" and bad.attempts == 1
    assert bad.error.startswith("bad input") and "MR" in bad.error, bad.error
    assert node.series(bad_uid).state == "failed"

    # unrouted: kept, visible, no job, files still in the spool
    other = wait_for(lambda: (lambda s: s if s and s.state == "unrouted" else None)(node.series(other_uid)), 30,
                     "the unmatched series to be unrouted")
    assert "no rule matched" in (other.error or "")
    assert node.jobs(series_uid=other_uid) == []
    assert len(list((node.storage / "spool").rglob(f"{other_uid}/*.dcm"))) == len(other_files)

    # the operator's view
    listing = node.cli("list")
    assert re.search(rf"^\s*{job.id}\s+done\s", listing, re.M), listing
    assert re.search(rf"^\s*{bad.id}\s+failed\s", listing, re.M), listing
    assert "bad input" in node.cli("list", "--state", "failed")
    shown = node.cli("show", str(job.id))
    assert job.seg_series_uid in shown and "share:share" in shown and "origin" in shown
    # what was sent where and when: the share drop's attempt names its folder
    shown = wait_for(lambda: (lambda out: out if re.search(r"attempt 1 \S+ \S+ sent -> /", out) else None)(
        node.cli("show", str(job.id))), 30, "the share attempt in jobs show")
    line = next(ln for ln in shown.splitlines() if re.search(r"attempt 1 \S+ \S+ sent -> /", ln))
    folder = line.split(" -> ", 1)[1].split(": ", 1)[0]
    assert line.count(folder) == 1 and "manifest.json" in line, line  # the folder once, then what went there
    series_out = node.cli("series", "--state", "unrouted")
    assert other_uid in series_out and "unrouted" in series_out

    # retry of the failed job: re-queued, runs again, fails again for the same reason
    assert "re-queued" in node.cli("retry", str(bad.id))
    wait_for(lambda: (lambda j: j if j.state == "failed" and j.attempts == 1 and j.finished_at != bad.finished_at
                      else None)(node.jobs(series_uid=bad_uid)[0]), 60, "the retried job to fail again")
    node.stop()
    assert "node stopped" in node.log.read_text()


@pytest.mark.slow
def test_sigkill_while_job_runs_completes_once(node_factory):
    """The node is SIGKILLed while the pipeline runs: the job process dies with it; after a restart
    the job is re-queued and completes once, with the same SEG identity."""
    node = node_factory().start()
    node.send(ct_files())
    uid = ct_series_uid()
    running = wait_for(lambda: job_of(node, uid, ("running",)), 60, "the job to start")
    results = node.storage / "results"
    kids, job_pid = kill_inside_pipeline(node, running.id)
    # the work really stopped: every process of the node is gone, none finishes the job
    wait_for(lambda: not [p for p in kids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"],
             15, "the node's child processes to die")
    assert job_pid in kids
    stale = node.jobs(series_uid=uid)
    assert [j.state for j in stale] == ["running"]
    assert not (results / str(running.id)).exists()
    assert not (results / f"{running.id}-seg.dcm").exists()

    node.start()
    job = wait_for(lambda: job_of(node, uid, ("done", "failed")), 90, "the job to finish after restart")
    assert job.state == "done", job.error
    jobs = node.jobs(series_uid=uid)
    assert len(jobs) == 1 and jobs[0].id == running.id
    assert job.attempts == 2  # the interrupted try counts
    seg = pydicom.dcmread(node.storage / "results" / str(job.id) / "bones_seg.dcm", stop_before_pixels=True)
    assert seg.SeriesInstanceUID == job.seg_series_uid == seg_series_uid(job)
    leftovers = [p.name for p in (node.storage / "results").iterdir() if p.name != str(job.id)]
    assert leftovers == [f"{job.id}-seg.dcm"]  # the SEG handed on before the meshes (no tmp folder left)
    early = pydicom.dcmread(node.storage / "results" / f"{job.id}-seg.dcm", stop_before_pixels=True)
    assert early.SOPInstanceUID == seg.SOPInstanceUID  # one SEG instance, whichever try wrote it
    s = node.store()
    try:
        assert len(s.list_dispatches(job_id=job.id)) == 2
    finally:
        s.close()


# A job process whose node dies while its pipeline runs (after the watch thread's look, before
# the publish step): the node is a stand-in process the job ends itself once its SEG is handed on.
_PUBLISH_AFTER_NODE_DIED = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from node import job_process
from node.config import ModelsConfig
from node.contracts import JobSpec

d = json.loads(sys.argv[1])
spec = JobSpec(**{**d, "paths": tuple(d["paths"]), "profiles_dir": Path(d["profiles_dir"]),
                  "output_dir": Path(d["output_dir"]), "models": ModelsConfig()})
node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
job_process._PROC.update(job_id=spec.job_id, node=(node.pid, job_process.process_started(node.pid)))

def notify(msg):
    print("NOTIFY", type(msg).__name__, flush=True)
    node.kill()  # the node dies while the meshes are being made
    node.wait()

job_process._PROC["notify"] = notify
job_process._run_spec(spec)
print("PUBLISHED", flush=True)
"""


@pytest.mark.slow
def test_job_does_not_publish_after_its_node_died(tmp_path):
    """The node dies between the job's SEG and its result folder: the job ends its process group
    at the publish step; results/<id>/ does not appear (the restarted node runs the job again)."""
    results = tmp_path / "results"
    spec = {"job_id": 7, "series_uid": ct_series_uid(), "paths": [str(p) for p in ct_files()],
            "profile": "bones", "profiles_dir": str(REPO / "profiles"), "backend": None,
            "output_dir": str(results / "7"), "seg_series_uid": "1.2.826.0.1.3680043.8.498.7",
            "decode_workers": 1}
    proc = subprocess.run([sys.executable, "-c", _PUBLISH_AFTER_NODE_DIED, json.dumps(spec)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert "NOTIFY SegReady" in out, out[-3000:]  # the node was alive when the early SEG was handed on
    assert "PUBLISHED" not in out and proc.returncode == -signal.SIGKILL, out[-3000:]
    assert "is gone: the result folder" in out and "is not published" in out, out[-3000:]
    assert not (results / "7").exists()
    assert [p.name for p in results.glob(".7.tmp-*")], "the cut-short try leaves its tmp folder for the next"


@pytest.mark.slow
def test_sigkill_while_instances_arrive(node_factory):
    """The node is SIGKILLed in the middle of an association: every instance it acknowledged is
    still there after the restart; the sender sends the series again; one job, done."""
    node = node_factory(quiet_period_s=6).start()
    files = ct_files()
    uid = ct_series_uid()
    sender = subprocess.Popen([STORESCU, "-xv", "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1",
                               str(node.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def count() -> int:
        try:
            s = node.store()
            try:
                return s.count_instances()
            finally:
                s.close()
        except Exception:  # noqa: BLE001 - database not created yet
            return 0

    wait_for(lambda: count() >= 3, 30, "the first instances", interval=0.01)
    node.kill()
    sender.wait(60)
    s = node.store()
    try:
        before = {i.sop_instance_uid: i.path for i in s.series_instances(uid)}
    finally:
        s.close()
    assert 3 <= len(before) <= len(files)
    print(f"instances indexed when the node was killed: {len(before)}/{len(files)}; sender rc {sender.returncode}")
    assert all(Path(p).is_file() for p in before.values())

    node.start()
    node.send(files)  # the scanner sends the series again (duplicates are counted, stored once)
    job = wait_for(lambda: job_of(node, uid, ("done", "failed")), 90, "the job")
    assert job.state == "done", job.error
    s = node.store()
    try:
        after = {i.sop_instance_uid: i.path for i in s.series_instances(uid)}
        series = s.get_series(uid)
        jobs = s.list_jobs(series_uid=uid)
    finally:
        s.close()
    assert set(before) <= set(after) and len(after) == len(files)
    assert all(Path(p).is_file() for p in after.values())
    assert series.instance_count == len(files) and series.generation == 1
    assert [(j.state, j.generation) for j in jobs] == [("done", 1)]


@pytest.mark.slow
def test_job_timeout_kills_the_job_process(node_factory):
    """job_timeout_s far below the pipeline's run time: each try is killed (its process is gone,
    no result written), retried with backoff up to max_attempts, then failed with the reason."""
    node = node_factory(job_timeout_s=1, job_retry={"max_attempts": 2, "backoff_base_s": 0.5,
                                                   "backoff_max_s": 1}).start()
    node.send(ct_files())
    uid = ct_series_uid()
    job = wait_for(lambda: job_of(node, uid, ("done", "failed")), 60, "the job to fail")
    assert job.state == "failed" and job.attempts == 2
    assert "timeout" in job.error and "job_timeout_s" in job.error
    assert not (node.storage / "results" / str(job.id)).exists()
    pids = [int(p) for p in re.findall(rf"job {job.id} started \(.*?pid (\d+)\)", node.log.read_text())]
    assert len(pids) == 2, pids
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", f"job process {pid} alive"
    assert node.series(uid).state == "failed"


def test_router_generations_supersede_and_idempotence(tmp_path):
    """In process: routing twice creates no second job; late instances -> new generation, new job,
    the older queued job superseded; a rule with supersede: false ignores them; unmatched -> unrouted."""
    from node.completion import sweep
    from node.config import load_config
    from node.router import Router
    from node.routing.rules import RuleSetHolder, rules_version
    from node.store import InstanceRecord

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + """
  - name: keep-first
    match:
      SeriesDescription: {regex: "keep"}
    profile: bones
    supersede: false
""")
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text(yaml.safe_dump({"storage": str(tmp_path / "var"), "rules": str(rules),
                                        "profiles": str(REPO / "profiles")}))
    cfg = load_config(cfg_file)
    store = Store(cfg.database_path)
    router = Router(cfg, store, RuleSetHolder(rules))
    assert router.rules.ruleset.version == rules_version(rules)

    def add(series: str, sop: str, desc: str, t: float) -> None:
        store.record_instance(InstanceRecord(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series, study_uid="1.2",
            path=str(tmp_path / "missing" / f"{sop}.dcm"), transfer_syntax="1.2.840.10008.1.2.1", size=1,
            calling_ae="SCANNER", called_ae="DICOMNODE", received_at=t,
            tags={"Modality": "CT", "SeriesDescription": desc}))

    t0 = time.time() - 100
    add("1.1", "1.1.1", "CT Body", t0)
    add("1.3", "1.3.1", "keep", t0 - 10)  # first received: routed first, its job is the oldest
    add("1.4", "1.4.1", "scout", t0)
    assert set(sweep(store, 10)) == {"1.1", "1.3", "1.4"}
    router.route_pending()
    router.route_pending()  # idempotent
    (j1,) = store.list_jobs(series_uid="1.1")
    assert (j1.rule, j1.generation, j1.state, j1.rules_version) == ("body-bones", 1, "queued", rules_version(rules))
    assert (s4 := store.get_series("1.4")) is not None and s4.state == "unrouted" and store.list_jobs(series_uid="1.4") == []
    assert len(store.list_jobs(series_uid="1.3")) == 1

    first = store.claim_job("w")
    assert first is not None and first.series_uid == "1.3"
    assert store.complete_job(first.id, JobResult())

    # late instances: generation 2, a new job; the older queued job is superseded
    add("1.1", "1.1.2", "CT Body", t0 + 1)
    add("1.3", "1.3.2", "keep", t0 + 1)
    sweep(store, 10)
    router.route_pending()
    jobs = {(j.generation, j.state) for j in store.list_jobs(series_uid="1.1")}
    assert jobs == {(1, "superseded"), (2, "queued")}
    assert (s1 := store.get_series("1.1")) is not None and (s1.state, s1.generation) == ("routed", 2)
    # supersede: false -> the late instances of 1.3 are ignored: its done job stands
    assert [(j.generation, j.state) for j in store.list_jobs(series_uid="1.3")] == [(1, "done")]
    assert (s3 := store.get_series("1.3")) is not None and (s3.state, s3.generation) == ("done", 2)
    store.close()


def test_early_start_result_held_until_the_quiet_period_confirms_it(node_factory):
    """early_start_s 1 with a 6 s quiet period: the job starts while the series is still inside
    its quiet period, its result is held (no dispatch row) until the series is complete, then
    published: one job, one try, the SEG identity of an ordinary job."""
    node = node_factory(quiet_period_s=6, early_start_s=1).start()
    uid = ct_series_uid()
    node.send(ct_files())
    held = wait_for(lambda: job_of(node, uid, ("done",)), 60, "the early-started job to finish")
    series = node.series(uid)
    s = node.store()
    try:
        dispatches = s.list_dispatches(job_id=held.id)
    finally:
        s.close()
    if series.state == "receiving":  # still inside the quiet period: held, nothing sent yet
        assert held.provisional and dispatches == []
    assert held.started_at < series.last_received_at + 6, "the job did not start inside the quiet period"

    job = wait_for(lambda: (lambda j: j if j and not j.provisional and node.series(uid).state == "done" else None)(
        job_of(node, uid, ("done",))), 60, "the result to be confirmed at completion")
    assert job.id == held.id and job.attempts == 1
    assert [j.id for j in node.jobs(series_uid=uid)] == [job.id]
    assert job.instances_digest and job.seg_series_uid == seg_series_uid(job)
    s = node.store()
    try:
        assert job.instances_digest == s.series_digest(uid)
        assert {(d.kind, d.destination) for d in s.list_dispatches(job_id=job.id)} == {("share", "share"),
                                                                                        ("dicom", "origin")}
    finally:
        s.close()
    log = node.log.read_text()
    assert f"job {job.id} started early" in log
    assert f"early-start job {job.id} (rule body-bones) confirmed" in log


def test_instances_arriving_after_an_early_start_restart_it(node_factory):
    """Half the series, an early start, then the other half: the early work is thrown away
    (stopped or re-queued, the try not counted) and the one result covers all 20 instances."""
    node = node_factory(quiet_period_s=8, early_start_s=1).start()
    uid = ct_series_uid()
    files = ct_files()
    node.send(files[:10])
    first = wait_for(lambda: job_of(node, uid, ("running", "done")), 60, "the early start on 10 instances")
    assert first.provisional
    node.send(files[10:])
    job = wait_for(lambda: (lambda j: j if j and not j.provisional and node.series(uid).state == "done" else None)(
        job_of(node, uid, ("done", "failed"))), 120, "the job on the whole series")
    assert job.state == "done", job.error
    assert job.id == first.id and job.attempts == 1
    assert [j.id for j in node.jobs(series_uid=uid)] == [job.id]
    report = (node.storage / "results" / str(job.id) / "report.json").read_text()
    assert '"files": 20' in report
    log = node.log.read_text()
    # stopped while running, or its finished result discarded (by the receiver or at the end of the run)
    assert re.search(r"received more instances|early-start result\(s\) discarded|no longer has; queued again",
                     log), log[-3000:]


@pytest.mark.slow
def test_sigkill_during_an_early_start(node_factory):
    """The node is SIGKILLed while an early-started (provisional) job runs: after the restart the
    series completes, the job is confirmed, runs again and completes once, with the SEG identity
    an ordinary job would have."""
    node = node_factory(quiet_period_s=30, early_start_s=1).start()
    uid = ct_series_uid()
    node.send(ct_files())
    running = wait_for(lambda: (lambda j: j if j and j.provisional else None)(job_of(node, uid, ("running",))),
                       60, "the early start")
    kill_inside_pipeline(node, running.id)
    assert [(j.state, j.provisional) for j in node.jobs(series_uid=uid)] == [("running", True)]
    assert node.series(uid).state == "receiving"

    # a shorter quiet period after the restart: the series is complete at once (persisted times)
    cfg = yaml.safe_load(node.config.read_text())
    cfg["quiet_period_s"] = 6
    node.config.write_text(yaml.safe_dump(cfg))
    node.start()
    job = wait_for(lambda: (lambda j: j if j and j.state in ("done", "failed") and not j.provisional
                            and node.series(uid).state in ("done", "failed") else None)(
        job_of(node, uid, ("done", "failed"))), 120, "the job to finish after the restart")
    assert job.state == "done", job.error
    assert [j.id for j in node.jobs(series_uid=uid)] == [running.id]
    assert job.seg_series_uid == seg_series_uid(job)
    s = node.store()
    try:
        assert job.instances_digest == s.series_digest(uid)
        assert len(s.list_dispatches(job_id=job.id)) == 2
    finally:
        s.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_in_a_burst_stop_the_node(node_factory, sig):
    """Ctrl-C twice, or `timeout` and a kill: a second signal came while the first one's handler
    held a lock (Event.set), the handler ran again in the same thread and waited for itself: the
    node never stopped.  Signals in a burst now stop it like one, console process included."""
    node = node_factory().start()
    assert node.proc is not None
    pid = node.proc.pid
    console = [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]
    end = time.monotonic() + 3.0  # signals keep coming while the node stops
    while time.monotonic() < end and node.proc.poll() is None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
    try:
        node.proc.wait(60)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        raise AssertionError(f"the node did not stop after a burst of {sig.name}; log:\n"
                             f"{node.log.read_text()[-3000:]}") from None
    assert "node stopped" in node.log.read_text()
    gone = psutil.wait_procs(console, timeout=15)[1]
    assert not gone, f"the console process outlived its node: {gone}"
