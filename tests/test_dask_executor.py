"""``executor: {kind: dask}`` with the real things: a ``dask scheduler`` and two workers started with
``dicom-node worker`` (one with the ``GPU`` resource, running the tiny nnU-Net on the CPU, the other
without), ``dicom-node serve`` with the Dask executor, DCMTK ``storescu`` sending real and
synthetic series, Orthanc as the PACS.

HU jobs run on any worker, model jobs only on the GPU worker, one at a time and with a warm model
cache; timeouts and bad input fail as with the local pool; a worker and the scheduler killed with
SIGKILL mid-job lose nothing: the jobs finish and Orthanc holds exactly one SEG per series.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from dask_cluster import running_job, try_pid
from pydicom import dcmread

from node.config import ConfigError, NodeConfig, load_config

HAVE_AI = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("nnunetv2") is not None
HAVE_DASK = importlib.util.find_spec("distributed") is not None
REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
SMALL = DATA / "ct-body-3mm-small" / "ct.nii.gz"
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
MR_NII = DATA / "mr-small" / "mr.nii.gz"

RULES = {"rules": [
    {"name": "synth-ai", "match": {"SeriesDescription": {"regex": "^synth"}}, "profile": "synth",
     "backend": "nnunet", "destinations": ["pacs"], "share": False},
    {"name": "ct-bones", "match": {"Modality": "CT"}, "profile": "bones", "destinations": ["pacs"], "share": False},
    {"name": "forced-bones", "match": {"SeriesDescription": {"regex": "force-bones"}}, "profile": "bones",
     "share": False},
]}


# ----------------------------------------------------------------------------- config (no cluster)


def test_executor_config_is_validated_at_the_door(tmp_path):
    assert NodeConfig().executor.kind == "local"
    cfg = NodeConfig(executor={"kind": "dask", "scheduler": "tcp://10.0.0.5:8786"})
    assert cfg.executor.scheduler == "tcp://10.0.0.5:8786"
    bad = {
        "executor:\n  kind: dask\n": "needs scheduler",
        "executor:\n  kind: dask\n  scheduler: 10.0.0.5\n": "tcp://host:8786",
        "executor:\n  kind: local\n  scheduler: tcp://h:1\n": "only used with kind: dask",
        "executor:\n  kind: spark\n": "executor.kind",
        "gpus: [0]\nexecutor:\n  kind: dask\n  scheduler: tcp://h:1\n": "dicom-node worker --gpus",
    }
    for text, expected in bad.items():
        (tmp_path / "node.yaml").write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / "node.yaml")
        assert expected in str(err.value), (text, str(err.value))


def test_worker_command_line(tmp_path):
    from node.cli.worker import worker_command

    cmd, env = worker_command("tcp://10.0.0.5:8786", gpus=2, nthreads=4, name="gpu-host-1")
    text = " ".join(cmd)
    assert "tcp://10.0.0.5:8786" in text and "--preload node.dask_worker" in text
    assert "--resources GPU=2" in text and "--nthreads 6" in text and "--name gpu-host-1" in text
    assert env["DASK_DISTRIBUTED__WORKER__DAEMON"] == "False"  # the tries are processes of the worker's
    cmd, _ = worker_command("tcp://h:8786")
    assert "--resources" not in cmd


def test_dask_timers_are_slowed_unless_the_operator_sets_them(monkeypatch):
    from node.cli.worker import scheduler_command, worker_command
    from node.dask_worker import QUIET_DASK_CONFIG, quiet_dask_env

    quiet = quiet_dask_env()
    assert quiet["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"] == "1s"
    assert quiet["DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL"] == "1s"  # '-' is '_' for Dask
    assert len(quiet) == len(QUIET_DASK_CONFIG)
    for _, env in (worker_command("tcp://h:8786"), scheduler_command(host="0.0.0.0", port=8786, dashboard_address=":0")):
        assert quiet.items() <= env.items()
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "20ms")  # the operator's own choice stays
    _, env = worker_command("tcp://h:8786")
    assert "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL" not in env and "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED" in env


def test_slot_info_where_is_shown():
    from node.contracts import JobParams, Resource, SlotInfo

    s = SlotInfo(name="dask-gpu0", kind=Resource.GPU, gpu=0, pid=42, process="slot", device="cuda",
                 cuda_visible_devices="0", host="gpu-host-1", worker="tcp://10.0.0.7:40001")
    back = JobParams.from_json(JobParams(slot=s).to_json()).slot
    assert back == s
    assert back.where() == "slot dask-gpu0, host gpu-host-1, Dask worker tcp://10.0.0.7:40001, GPU 0, pid 42 (long-lived)"


# ----------------------------------------------------------------------------- the real cluster

needs_cluster = [
    pytest.mark.skipif(not HAVE_DASK, reason="dask/distributed not installed (pip install -e .[dask])"),
    pytest.mark.skipif(not HAVE_AI, reason="torch/nnunetv2 not installed (AI extras)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not SMALL.is_file(), reason=f"test data not found at {DATA}"),
]


def _skip_without_cluster() -> None:
    for mark in needs_cluster:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _skip_without_cluster()
    from dask_cluster import DaskCluster

    with DaskCluster(tmp_path_factory.mktemp("dask")) as c:
        c.add_gpu_and_cpu_workers()
        yield c


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """name -> (files, series UID): two synthetic cases for the model, the small real CT, the real
    J2K abdomen, an MR forced to a CT profile (bad input)."""
    from ai_helpers import HELD_OUT_SEEDS, write_case_series

    from node.tools.synth_series import write_series
    from node.tools.synth_shapes import make_case

    root = tmp_path_factory.mktemp("series")
    out: dict[str, list[Path]] = {}
    for n, seed in enumerate(HELD_OUT_SEEDS):
        out[f"synth{n}"] = write_case_series(make_case(seed), root / f"synth{n}", series_description=f"synth {n}")
    out["small"] = write_series(SMALL, root / "small", series_description="body small")
    out["j2k"] = sorted(J2K.glob("*.dcm"))
    out["mr"] = write_series(MR_NII, root / "mr", modality="MR", series_description="MR force-bones",
                             size=(48, 48, 6))
    return {k: (list(v), str(dcmread(v[0], stop_before_pixels=True).SeriesInstanceUID)) for k, v in out.items()}


def _node(tmp_path: Path, pacs: Any, cluster: Any, **overrides: Any) -> Any:
    from multinode_helpers import ai_profiles
    from test_node_flow import Node

    profiles = ai_profiles(tmp_path / "profiles")
    cfg = {"profiles": str(profiles), "executor": {"kind": "dask", "scheduler": cluster.address},
           "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
           "dispatch_retry": {"max_attempts": 30, "backoff_base_s": 1, "backoff_max_s": 2},
           "early_start_s": 0, "quiet_period_s": 1.5}
    cfg.update(overrides)
    node = Node(tmp_path, **cfg)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(RULES))
    return node


def _start(node: Any) -> Any:
    """Start the node and wait until its Dask client is connected."""
    node.start()
    end = time.monotonic() + 60
    while "connected to the Dask scheduler" not in node.log.read_text():
        assert time.monotonic() < end, node.log.read_text()[-3000:]
        time.sleep(0.1)
    return node


def _wait_settled(node: Any, uids: list[str], timeout_s: float) -> dict[str, Any]:
    """series UID -> its job, once every one of them is done or failed."""
    end = time.monotonic() + timeout_s
    while True:
        jobs = {j.series_uid: j for j in node.jobs() if j.series_uid in uids}
        if len(jobs) == len(uids) and all(j.state in ("done", "failed") for j in jobs.values()):
            return jobs
        if time.monotonic() > end:
            raise AssertionError(f"jobs not settled after {timeout_s} s: "
                                 f"{[(j.id, j.state, j.error) for j in node.jobs()]}\n{node.log.read_text()[-5000:]}")
        time.sleep(0.3)


def _one_seg_per_series(pacs: Any, jobs: dict[str, Any], timeout_s: float = 60) -> None:
    """Orthanc ends with exactly one SEG series per job, each the job's own SEG identity."""
    want = {j.seg_series_uid for j in jobs.values()}
    pacs.wait_for(lambda: len(pacs.seg_series()) >= len(want), timeout_s=timeout_s)
    time.sleep(1.0)  # anything sent twice would arrive now
    segs = pacs.seg_series()
    got = [s["MainDicomTags"]["SeriesInstanceUID"] for s in segs]
    assert sorted(got) == sorted(want), (got, want)
    for s in segs:
        assert len(s["Instances"]) == 1, s


def _instances_kept(node: Any, series: dict[str, tuple[list[Path], str]], names: list[str]) -> None:
    store = node.store()
    try:
        for n in names:
            files, uid = series[n]
            assert len(store.series_instances(uid)) == len(files), n
    finally:
        store.close()


@pytest.mark.slow
def test_hu_anywhere_model_only_on_the_gpu_worker_one_at_a_time(tmp_path, orthanc, cluster, series):
    _skip_without_cluster()
    workers = cluster.wait_workers(2)
    node = _start(_node(tmp_path, orthanc, cluster))
    try:
        names = ["synth0", "synth1", "small", "j2k", "mr"]
        for n in names:
            node.send(series[n][0])
        jobs = _wait_settled(node, [series[n][1] for n in names], 300)
        _instances_kept(node, series, names)
        by = {n: jobs[series[n][1]] for n in names}
        mr = by.pop("mr")
        assert mr.state == "failed" and mr.error.startswith("bad input") and mr.attempts == 1, mr.error
        for n, j in by.items():
            assert j.state == "done", (n, j.error)
            slot = j.params.slot
            assert slot.worker in {w["address"] for w in workers.values()} and slot.host, slot
        gpu_addr = workers["gpu"]["address"]
        ai = [by["synth0"], by["synth1"]]
        for j in ai:
            s = j.params.slot
            assert (s.worker, s.kind, s.gpu, s.process, s.cuda_visible_devices) == (gpu_addr, "gpu", 0, "slot", "0"), s
            assert j.result.backend["name"] == "nnunet" and j.result.backend["device"] == "cpu"
        for n in ("small", "j2k"):
            s = by[n].params.slot
            assert s.kind == "cpu" and s.gpu is None and s.process == "job", s
            if s.worker == gpu_addr:  # HU work on the GPU worker keeps off its GPU
                assert s.cuda_visible_devices == "", s
        # one model job per GPU: never overlapping, both in the same long-lived process, the second warm
        first, second = sorted(ai, key=lambda j: j.started_at)
        assert second.started_at >= first.finished_at
        assert first.params.slot.pid == second.params.slot.pid
        assert second.result.backend["model_cache"] == "hit", second.result.backend
        _one_seg_per_series(orthanc, {k: v for k, v in jobs.items() if v.state == "done"})
        # the SEG went to the PACS while the meshes were still being made (a Dask event from the worker)
        store = node.store()
        try:
            for n in ("small", "j2k"):
                (seg_dispatch,) = [d for d in store.list_dispatches(job_id=by[n].id) if d.kind == "dicom"]
                mesh_s = float(by[n].result.timings_s["mesh"])  # meshing left after the SEG was written
                assert mesh_s > 0 and by[n].finished_at - seg_dispatch.created_at > 0.3 * mesh_s, n
        finally:
            store.close()
        shown = node.cli("show", str(by["synth1"].id))
        assert f"Dask worker {gpu_addr}" in shown and "GPU 0" in shown, shown
    finally:
        node.stop()


@pytest.mark.slow
def test_timeout_on_dask_kills_the_try_where_it_runs(tmp_path, orthanc, cluster, series):
    _skip_without_cluster()
    node = _start(_node(tmp_path, orthanc, cluster, job_timeout_s=1.0,
                        job_retry={"max_attempts": 2, "backoff_base_s": 0.5, "backoff_max_s": 1}))
    try:
        files, uid = series["small"]
        node.send(files)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            (job,) = node.jobs(series_uid=uid) or (None,)
            if job is not None and job.state == "failed":
                break
            time.sleep(0.3)
        assert job is not None and job.state == "failed", (job and (job.state, job.error))
        assert "timeout: killed after 1 s" in job.error and job.attempts == 2, job.error
        pid = job.params.slot.pid
        assert pid and job.params.slot.worker
        time.sleep(0.5)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        node.stop()



@pytest.mark.slow
def test_kill_9_the_gpu_worker_mid_job_then_the_scheduler(tmp_path, orthanc, cluster, series):
    """SIGKILL the Dask worker process under a running model job: its try dies with it, Dask runs
    the task again on the restarted worker, the job is done once.  Then SIGKILL the scheduler under
    a running job and start it again: the node gets the try back and runs it again.  Every
    acknowledged instance is kept; Orthanc ends with exactly one SEG per series."""
    _skip_without_cluster()
    node = _start(_node(tmp_path, orthanc, cluster))
    results = node.storage / "results"
    try:
        files, uid = series["synth0"]
        node.send(files)
        job = running_job(node.jobs, uid)
        pid = try_pid(results, job.id)
        try_proc = psutil.Process(pid)
        forkserver = try_proc.parent()
        assert forkserver is not None
        worker_proc = forkserver.parent()  # try <- forkserver <- Dask worker process
        assert worker_proc is not None and "python" in worker_proc.name()
        os.kill(worker_proc.pid, signal.SIGKILL)
        try_proc.wait(10)  # the try dies with its worker (it watches the worker process)
        uids = [uid]
        jobs = _wait_settled(node, uids, 300)
        assert all(j.state == "done" for j in jobs.values()), [(j.state, j.error) for j in jobs.values()]
        assert jobs[uid].params.slot.pid != pid and jobs[uid].attempts == 1  # Dask re-ran it: no try lost

        # the scheduler: SIGKILL under a running job, then back on the same port
        files2, uid2 = series["j2k"]
        node.send(files2)
        job2 = running_job(node.jobs, uid2)
        try_pid(results, job2.id)
        cluster.kill_scheduler()
        time.sleep(1.0)
        cluster.start_scheduler()
        jobs = _wait_settled(node, uids + [uid2], 300)
        assert all(j.state == "done" for j in jobs.values()), [(j.state, j.error) for j in jobs.values()]
        assert "lost the try" in node.log.read_text()
        _instances_kept(node, series, ["synth0", "j2k"])
        _one_seg_per_series(orthanc, jobs)
        cluster.wait_workers(2)
    finally:
        node.stop()


@pytest.mark.slow
def test_early_start_overtaken_on_dask_kills_the_try_on_the_worker(tmp_path, orthanc, cluster, series):
    """An early start running on a worker when more instances of its series arrive: the node
    cancels the task, the worker kills the try's process, the job runs again on the whole series
    once it is quiet, and Orthanc gets one SEG (as with the local pool)."""
    _skip_without_cluster()
    node = _start(_node(tmp_path, orthanc, cluster, early_start_s=0.5, quiet_period_s=20))
    try:
        files, uid = series["j2k"]
        node.send(files[:10])
        job = running_job(node.jobs, uid)
        pid = try_pid(node.storage / "results", job.id)
        node.send(files[10:])
        try:
            psutil.Process(pid).wait(30)  # killed on the worker, not left to finish
        except psutil.NoSuchProcess:  # gone already
            pass
        assert "received more instances; it starts again" in node.log.read_text()
        end = time.monotonic() + 300
        while not [j for j in node.jobs(series_uid=uid) if j.state == "done" and not j.provisional]:
            assert time.monotonic() < end, [(j.id, j.state, j.error) for j in node.jobs()]
            time.sleep(0.3)
        jobs = _wait_settled(node, [uid], 60)
        assert jobs[uid].id == job.id and jobs[uid].instances_digest != job.instances_digest  # ran on all 20
        _instances_kept(node, series, ["j2k"])
        _one_seg_per_series(orthanc, jobs)
    finally:
        node.stop()


@pytest.mark.slow
def test_the_cluster_runs_with_dasks_timers_slowed(cluster):
    """The scheduler (``dicom-node scheduler``) and the workers (``dicom-node worker``) run with
    :data:`node.dask_worker.QUIET_DASK_CONFIG`: Dask's diagnostic timers woke every process of the
    cluster dozens of times a second, CPU taken from the jobs (bench/README.md, cluster)."""
    import dask

    from node.dask_worker import QUIET_DASK_CONFIG

    def config() -> dict:
        return {k: dask.config.get(k) for k in QUIET_DASK_CONFIG}

    client = cluster.client()
    assert client.run_on_scheduler(config) == QUIET_DASK_CONFIG
    seen = client.run(config)
    assert len(seen) == 2 and all(c == QUIET_DASK_CONFIG for c in seen.values()), seen
