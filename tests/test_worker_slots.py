"""Worker pool slots: GPU slots beside CPU slots, the store's slot-kind claim, long-lived model
processes with a warm nnU-Net cache.  Real processes, the real pipeline and store; no GPU needed
(a slot's GPU is only what its processes see in ``CUDA_VISIBLE_DEVICES``).

In an environment without torch/nnunetv2 (.venv) the nnU-Net jobs fail at once with the install
command; the slot assignment, the environment given to each process and the store's claim logic
are still checked.  With the AI extras (.venv-ai) the nnU-Net jobs really run on the committed
tiny model: never two at a time on the one GPU slot, an HU job beside them, the second one
reports a warm model cache in the same slot process, and a timeout kills and replaces the slot
process.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from pydicom import dcmread

from node.config import NodeConfig
from node.contracts import JobParams, Resource, SeriesState
from node.pool import WorkerPool, job_resource
from node.store import _MIGRATIONS, SCHEMA_VERSION, InstanceRecord, Store

from ai_helpers import NNUNET_TINY, SYNTH_TISSUES  # tests/ is on sys.path

HAVE_AI = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("nnunetv2") is not None


def _profile(name: str, model_type: str, device: str | None = None) -> dict:
    model = {"folder": str(NNUNET_TINY), "folds": [0]}
    if device:
        model["device"] = device
    return {"name": name, "description": f"synthetic shapes ({model_type})", "model_type": model_type,
            "model": model, "tissues": SYNTH_TISSUES}


@pytest.fixture
def setup(tmp_path):
    """A store holding one received synthetic CT series, a profiles folder and a config factory."""
    from ai_helpers import write_case_series

    from node.tools.synth_shapes import make_case

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name, mt, dev in (("synth_hu", "hu_based", None), ("synth_ai", "nnunet", None),
                          ("synth_ai_cpu", "nnunet", "cpu")):
        (profiles / f"{name}.yaml").write_text(yaml.safe_dump(_profile(name, mt, dev), sort_keys=False))
    files = write_case_series(make_case(7), tmp_path / "dicom")
    store = Store(tmp_path / "var" / "node.db")
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        store.record_instance(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID), path=str(f),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), size=f.stat().st_size, calling_ae="SCANNER"))
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert store.complete_series(series_uid, quiet_period_s=0)
    store.set_series_state(series_uid, SeriesState.ROUTED, from_states=(SeriesState.COMPLETE,))

    def config(**kw) -> NodeConfig:
        base = dict(storage=tmp_path / "var", profiles=profiles, workers=2, gpus=[0], job_timeout_s=300,
                    job_retry={"max_attempts": 1, "backoff_base_s": 0, "backoff_max_s": 0},
                    models={"threads": 1}, log_level="INFO")
        base.update(kw)
        return NodeConfig(**base)

    def job(rule: str, profile: str, backend: str) -> int:
        jid, created = store.create_job(series_uid, rule, profile=profile, backend=backend, rules_version="v1",
                                        generation=1, max_attempts=1,
                                        params=JobParams(destinations=(), share=False, backend_override=None))
        assert created
        return jid

    yield store, config, job
    store.close()


def _run_until_finished(pool: WorkerPool, store: Store, ids: list[int], timeout_s: float) -> dict:
    pool.start()
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            jobs = {j.id: j for j in store.list_jobs() if j.id in ids}
            if all(j.state in ("done", "failed") for j in jobs.values()):
                return jobs
            time.sleep(0.2)
        raise AssertionError(f"jobs not finished after {timeout_s} s: "
                             f"{[(j.id, j.state, j.error) for j in store.list_jobs()]}")
    finally:
        pool.stop()


# ----------------------------------------------------------------------------------- store


def _v1_database(path: Path, *, with_column: bool = False) -> None:
    c = sqlite3.connect(path)
    c.executescript(_MIGRATIONS[0])
    c.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    c.execute("INSERT INTO schema_version VALUES (1)")
    if with_column:  # a database where the ALTER already happened (e.g. re-run after a crash)
        c.execute("ALTER TABLE jobs ADD COLUMN resource TEXT")
    c.execute("INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at, state,"
              " state_changed_at) VALUES ('1.2.3', '1.2', 0, 0, 'routed', 0)")
    for n, backend in enumerate(("nnunet", "hu_based", "monai")):
        c.execute("INSERT INTO jobs (series_uid, rule, profile, backend, rules_version, generation, created_at)"
                  " VALUES ('1.2.3', ?, 'p', ?, 'v', 1, ?)", (f"r{n}", backend, float(n)))
    c.commit()
    c.close()


@pytest.mark.parametrize("with_column", [False, True])
def test_schema_migration_adds_resource_and_legacy_rows_claim_by_backend(tmp_path, with_column):
    db = tmp_path / "node.db"
    _v1_database(db, with_column=with_column)
    store = Store(db)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION  # idempotent
    # schema 5 fills the slot kind of legacy rows from their backend once (the store no longer
    # knows backends): model backends gpu, the rest cpu
    assert [j.resource for j in store.list_jobs()] == ["gpu", "cpu", "gpu"]
    # schema 4: rows from before early start are ordinary (confirmed) jobs with no instance digest
    assert [(j.provisional, j.instances_digest) for j in store.list_jobs()] == [(False, None)] * 3
    assert store.unclassified_jobs() == []
    # legacy rows: model backends count as gpu, the rest as cpu
    assert (j := store.claim_job("w", kinds=(Resource.CPU,))) is not None and j.backend == "hu_based"
    assert store.claim_job("w", kinds=(Resource.CPU,)) is None
    assert (j := store.claim_job("w", kinds=(Resource.GPU,))) is not None and j.backend == "nnunet"
    assert (j := store.claim_job("w")) is not None and j.backend == "monai"  # kinds=None: any job (the old call)
    store.close()


def test_claim_respects_resource_column(tmp_path):
    store = Store(tmp_path / "node.db")
    store.record_instance(InstanceRecord("1.1", "1.2.840.10008.5.1.4.1.1.2", "9.9", "9", "/x", "1.2", 1))

    def mk(rule: str, backend: str, res: Any = None) -> int:  # res: a plain string too, "tpu" to be refused
        return store.create_job("9.9", rule, profile="p", backend=backend, rules_version="v", generation=1,
                                resource=res)[0]

    a = mk("ai-on-cpu", "nnunet", "cpu")
    b = mk("ai", "nnunet", None)
    with pytest.raises(ValueError, match="resource"):
        mk("bad", "nnunet", "tpu")
    assert store.set_job_resource(b, "gpu") and not store.set_job_resource(b, "cpu")
    assert (j := store.claim_job("w", kinds=(Resource.GPU,))) is not None and j.id == b
    assert store.claim_job("w", kinds=(Resource.GPU,)) is None
    assert (j := store.claim_job("w", kinds=(Resource.CPU,))) is not None and j.id == a
    assert store.claim_job("w", kinds=()) is None
    store.close()


def _claimer(db: str, kind: Resource, out) -> None:
    s = Store(db, migrate=False)
    got = []
    while True:
        j = s.claim_job(f"{kind}-{os.getpid()}", kinds=(kind,))
        if j is None:
            break
        got.append((j.id, j.resource))
    out.put(got)
    s.close()


def test_claim_by_kind_is_atomic_across_processes(tmp_path):
    db = tmp_path / "node.db"
    store = Store(db)
    store.record_instance(InstanceRecord("1.1", "1.2.840.10008.5.1.4.1.1.2", "9.9", "9", "/x", "1.2", 1))
    for n in range(60):
        store.create_job("9.9", f"r{n}", profile="p", backend="nnunet" if n % 3 else "hu_based",
                         rules_version="v", generation=1, resource=Resource.GPU if n % 3 else Resource.CPU)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(db), k, q)) for k in (Resource.GPU, Resource.GPU, Resource.CPU, Resource.CPU)]
    for p in procs:
        p.start()
    claims = [c for _ in procs for c in q.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(i for i, _ in claims) == list(range(1, 61))  # each job exactly once
    by_id = {j.id: j for j in store.list_jobs()}
    assert all(by_id[i].resource == r and (by_id[i].worker or "").startswith(r) for i, r in claims)
    store.close()


def test_config_gpus(tmp_path):
    from node.config import ConfigError, load_config

    (tmp_path / "a.yaml").write_text("gpus: [0, 1]\nworkers: 3\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.gpus == [0, 1] and cfg.workers == 3
    assert load_config(None).gpus == []
    (tmp_path / "b.yaml").write_text("gpus: [1, 1]\n")
    with pytest.raises(ConfigError, match="gpus"):
        load_config(tmp_path / "b.yaml")


def test_job_resource_from_backend_profile_and_node_device(setup):
    store, config, job = setup
    cfg = config()
    ids = {"hu": job("hu", "synth_hu", "hu_based"), "ai": job("ai", "synth_ai", "nnunet"),
           "ai_cpu": job("ai-cpu", "synth_ai_cpu", "nnunet")}
    override = store.create_job(store.list_jobs()[0].series_uid, "override", profile="synth_hu", backend="nnunet",
                                rules_version="v1", generation=1, params=JobParams(backend_override="nnunet"))[0]
    jobs = {j.id: j for j in store.list_jobs()}
    assert job_resource(cfg, jobs[ids["hu"]]) == "cpu"
    assert job_resource(cfg, jobs[ids["ai"]]) == "gpu"
    assert job_resource(cfg, jobs[ids["ai_cpu"]]) == "cpu"  # profile model.device: cpu
    assert job_resource(cfg, jobs[override]) == "gpu"  # a rule's backend override
    assert job_resource(config(models={"device": "cpu"}), jobs[ids["ai"]]) == "cpu"  # node-wide cpu


# ----------------------------------------------------------------------------------- pool


def _overlap(a, b) -> bool:
    return a.started_at < b.finished_at and b.started_at < a.finished_at


def test_gpu_slot_one_model_job_at_a_time_hu_beside_it_warm_cache(setup):
    """gpus: [0], workers: 2.  Two nnU-Net jobs and one HU job queued together: the nnU-Net jobs
    both run in slot gpu0 (CUDA_VISIBLE_DEVICES=0, device cuda), one after the other in the same
    long-lived process, the second with a warm model cache; the HU job runs in a CPU slot
    (CUDA_VISIBLE_DEVICES='') beside the first, and the second CPU slot stays idle rather than
    take a model job."""
    store, config, job = setup
    ai1 = job("ai-1", "synth_ai", "nnunet")
    ai2 = job("ai-2", "synth_ai", "nnunet")
    hu = job("hu", "synth_hu", "hu_based")
    pool = WorkerPool(config(), store, poll_s=0.1)
    jobs = _run_until_finished(pool, store, [ai1, ai2, hu], timeout_s=240)

    assert jobs[hu].state == "done", jobs[hu].error
    assert jobs[hu].resource == "cpu" and jobs[hu].worker.endswith(":cpu0")
    assert jobs[hu].params.slot.process == "job"
    seen = jobs[hu].result.backend["process"]
    assert seen["cuda_visible_devices"] == "" and not seen["persistent"]  # what the job process saw
    for jid in (ai1, ai2):
        j = jobs[jid]
        assert j.resource == "gpu" and j.worker.endswith(":gpu0"), (j.worker, j.resource)
        slot = j.params.slot
        assert (slot.name, slot.kind, slot.gpu, slot.process, slot.device, slot.cuda_visible_devices) == (
            "gpu0", "gpu", 0, "slot", "cuda", "0")
    # one model job per GPU: the second started only after the first finished
    first, second = sorted((jobs[ai1], jobs[ai2]), key=lambda j: j.started_at)
    assert second.started_at >= first.finished_at
    assert jobs[ai1].params.slot.pid == jobs[ai2].params.slot.pid  # the same slot process

    if not HAVE_AI:
        for jid in (ai1, ai2):
            assert jobs[jid].state == "failed" and "not available" in jobs[jid].error, jobs[jid].error
        return
    # real inference: both done, HU beside the first model job, the second one warm
    assert first.state == "done" and second.state == "done", (first.error, second.error)
    assert _overlap(jobs[hu], first), "the HU job did not run beside the model job"
    b1, b2 = first.result.backend, second.result.backend
    for b in (b1, b2):
        assert b["name"] == "nnunet"
        assert b["process"]["cuda_visible_devices"] == "0" and b["process"]["persistent"]
        assert b["process"]["pid"] == first.params.slot.pid
    assert b1["model_cache"] == "miss" and b1["load_s"] > 0 and b1["process"]["jobs_in_process"] == 1
    assert b2["model_cache"] == "hit" and b2["load_s"] == 0.0 and b2["process"]["jobs_in_process"] == 2
    import json

    report = json.loads(second.result.report.read_text())
    assert report["backend"]["model_cache"] == "hit"
    assert b2["device"] == "cpu"  # no CUDA here: the profile's device auto falls back to the CPU
    assert not psutil.pid_exists(b1["process"]["pid"]) or \
        psutil.Process(b1["process"]["pid"]).status() == psutil.STATUS_ZOMBIE  # ended with the pool


@pytest.mark.skipif(not HAVE_AI, reason="torch/nnunetv2 not installed (AI extras)")
def test_timeout_kills_the_slot_process_and_the_next_model_job_gets_a_fresh_one(setup):
    store, config, job = setup
    cfg = config(job_timeout_s=1.5, gpus=[])  # no GPUs: model jobs in CPU slots, still long-lived
    cfg.workers = 1
    slow = job("ai-timeout", "synth_ai", "nnunet")
    pool = WorkerPool(cfg, store, poll_s=0.1)
    pool.start()
    try:
        end = time.monotonic() + 60
        while store.get_job(slow).state != "failed" and time.monotonic() < end:
            time.sleep(0.1)
        j = store.get_job(slow)
        assert j.state == "failed" and "timeout" in j.error, (j.state, j.error)
        killed = j.params.slot.pid
        assert j.params.slot.name == "cpu0" and j.params.slot.process == "slot"
        assert j.params.slot.cuda_visible_devices is None  # no GPUs configured: env untouched
        time.sleep(0.5)
        assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
        cfg.job_timeout_s = 300
        ok = job("ai-after", "synth_ai", "nnunet")
        pool.wake()
        end = time.monotonic() + 180
        while store.get_job(ok).state not in ("done", "failed") and time.monotonic() < end:
            time.sleep(0.2)
        j2 = store.get_job(ok)
        assert j2.state == "done", j2.error
        assert j2.params.slot.pid != killed
        assert j2.result.backend["model_cache"] == "miss"  # a fresh process: cold again
    finally:
        pool.stop()


_POOL_SCRIPT = """
import sys, time
from node.config import NodeConfig
from node.store import Store
from node.pool import WorkerPool
cfg = NodeConfig(storage=sys.argv[1], profiles=sys.argv[2], workers=1, gpus=[0], job_timeout_s=300,
                 job_retry={"max_attempts": 1, "backoff_base_s": 0, "backoff_max_s": 0})
store = Store(cfg.database_path)
pool = WorkerPool(cfg, store, poll_s=0.1)
pool.start()
while True:
    time.sleep(0.2)
    j = store.get_job(int(sys.argv[3]))
    if j.state in ("done", "failed"):
        print("SLOT", j.params.slot.pid, flush=True)
        time.sleep(3600)
"""


def test_slot_process_dies_with_the_node(setup, tmp_path):
    """SIGKILL of the node process: its idle long-lived slot process kills itself (node watch)."""
    import signal
    import subprocess
    import sys

    store, config, job = setup
    jid = job("ai", "synth_ai", "nnunet")
    cfg = config()
    proc = subprocess.Popen([sys.executable, "-c", _POOL_SCRIPT, str(cfg.storage), str(cfg.profiles), str(jid)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        line = ""
        while not line.startswith("SLOT "):  # libraries in the slot process print to stdout too
            line = proc.stdout.readline()
            assert line, "the pool script ended"
        slot_pid = int(line.split()[1])
        assert psutil.pid_exists(slot_pid) and psutil.Process(slot_pid).status() != psutil.STATUS_ZOMBIE
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if not psutil.pid_exists(slot_pid) or psutil.Process(slot_pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"slot process {slot_pid} outlived the node")


def test_on_done_hook_runs_after_a_successful_job_is_recorded(setup):
    """The pool calls on_done once the job is done (so the node dispatches at once); a failing hook is only logged."""
    store, config, job = setup
    hu = job("hu", "synth_hu", "hu_based")
    seen: list[str] = []

    def hook():
        seen.append(next(j.state for j in store.list_jobs() if j.id == hu))
        raise RuntimeError("a broken hook must not stop the supervisor")

    pool = WorkerPool(config(gpus=[]), store, poll_s=0.1, on_done=hook)
    jobs = _run_until_finished(pool, store, [hu], timeout_s=120)
    assert jobs[hu].state == "done", jobs[hu].error
    assert seen == ["done"]


def test_dispatch_now_runs_the_dispatch_tick_at_once(tmp_path):
    import threading

    from apscheduler.schedulers.background import BackgroundScheduler

    from node.service import NodeService

    svc = NodeService(NodeConfig(storage=tmp_path / "var"))
    svc.dispatch_now()  # no scheduler yet: nothing to do, no error
    ran = threading.Event()
    svc.scheduler = BackgroundScheduler()
    svc.scheduler.add_job(ran.set, "interval", hours=1, id="dispatch")
    svc.scheduler.start()
    try:
        assert not ran.wait(0.5)
        svc.dispatch_now()
        assert ran.wait(5), "dispatch did not run after dispatch_now()"
    finally:
        svc.scheduler.shutdown(wait=False)


def test_gpu_slot_maps_any_cuda_index_to_its_own_gpu():
    """In a GPU slot only the slot's GPU is visible (as cuda:0): a profile's cuda:N is mapped to it."""
    from node.pipeline.ai.common import GPU_SLOT_ENV, slot_device

    slot = {"CUDA_VISIBLE_DEVICES": "3", GPU_SLOT_ENV: "3"}
    assert slot_device("cuda:3", slot) == "cuda:0"
    assert slot_device("cuda:1", slot) == "cuda:0"
    assert slot_device("cuda", slot) == "cuda" and slot_device("cpu", slot) == "cpu"
    # outside a node GPU slot the request stands (the operator may have set CUDA_VISIBLE_DEVICES)
    assert slot_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "0,1"}) == "cuda:1"
    assert slot_device("cuda:1", {}) == "cuda:1"


def test_gpu_slots_mark_their_processes(setup):
    store, config, _job = setup
    pool = WorkerPool(config(gpus=[0, 2]), store, poll_s=0.1)
    from node.pipeline.ai.common import GPU_SLOT_ENV

    gpu_envs = [s.env for s in pool.slots if s.kind == "gpu"]
    assert gpu_envs == [{"CUDA_VISIBLE_DEVICES": "0", GPU_SLOT_ENV: "0"}, {"CUDA_VISIBLE_DEVICES": "2", GPU_SLOT_ENV: "2"}]
    assert all(GPU_SLOT_ENV not in s.env for s in pool.slots if s.kind == "cpu")


# ------------------------------------------------------------------------------- priority


def _report_priority(conn: Any, info: Any) -> None:
    """What a job or slot process runs first (node.job_process._setup_process), then its priority."""
    from node.job_process import _setup_process

    _setup_process(info, "")
    conn.send((os.getpriority(os.PRIO_PROCESS, 0), tuple(psutil.Process().ionice())))
    conn.close()


@pytest.mark.parametrize("nice", [0, 7])
def test_job_processes_run_below_the_node(setup, nice):
    """``job_nice``: job and slot processes (forkserver children, as the pool starts them) lower
    their CPU priority by it and take the lowest best-effort I/O priority, so the receiver keeps
    the CPU and the disk it needs while jobs run (bench/README.md, soak)."""
    store, config, _job = setup
    assert NodeConfig(storage=Path("var")).job_nice == 10  # on by default
    pool = WorkerPool(config(job_nice=nice), store)
    from node.executor import LocalExecutor

    executor = pool.executor  # the local one: its processes start as the pool's did
    assert isinstance(executor, LocalExecutor)
    info = executor._process_info(pool.slots[0])
    ctx = mp.get_context("forkserver")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_report_priority, args=(child, info))
    proc.start()
    child.close()
    got_nice, (io_class, io_level) = parent.recv()
    proc.join(10)
    node_nice = os.getpriority(os.PRIO_PROCESS, 0)
    node_io = psutil.Process().ionice()
    if nice:
        assert got_nice == min(19, node_nice + nice)
        assert (io_class, io_level) == (psutil.IOPRIO_CLASS_BE, 7)
    else:
        assert got_nice == node_nice
        assert (io_class, io_level) == tuple(node_io)
