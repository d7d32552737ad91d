"""Scale-out with everything real at once (issue 13): a throwaway PostgreSQL cluster
(tests/pg_helpers.py), a ``dask scheduler`` with two ``dicom-node worker`` processes (``gpu`` with
one GPU resource, running the tiny nnU-Net on the CPU, and ``cpu`` without; tests/dask_cluster.py),
two ``dicom-node serve`` processes sharing the store and ``shared_storage``, both with
``executor: {kind: dask}`` (tests/multinode_helpers.py), DCMTK ``storescu`` sending parts of each
series to both nodes, Orthanc as the PACS.

A burst of series split across both nodes ends as one series, one job and one SEG each, HU jobs on
any worker and the model job on the GPU worker; then SIGKILL a Dask worker, the scheduler, and a
node process (mid-job and mid-receive): every instance storescu had acknowledged is in the store
and the shared spool, and Orthanc ends with exactly one SEG per series.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from dask_cluster import running_job, try_pid
from multinode_helpers import (
    SharedNode,
    acknowledged,
    ai_profiles,
    check_one_of_each,
    send,
    send_split,
    series_uid,
    start_all,
    wait_settled,
)
from test_e2e_orthanc import DICOM_NODE, J2K
from test_e2e_orthanc import RULES as HU_RULES


HAVE_AI = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("nnunetv2") is not None
HAVE_DASK = importlib.util.find_spec("distributed") is not None
SMALL_CT = J2K.parent.parent / "ct-body-3mm-small" / "ct.nii.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_DASK, reason="dask/distributed not installed (pip install -e .[dask])"),
    pytest.mark.skipif(not HAVE_AI, reason="torch/nnunetv2 not installed (AI extras)"),
    pytest.mark.skipif(not J2K.is_dir() or not SMALL_CT.is_file(), reason="test data not found (NODE_TEST_DATA)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not DICOM_NODE.exists(), reason="dicom-node is not installed in this environment"),
]

#: HU rule of the e2e tests (CT "body") plus a model rule for the synthetic cases ("synth ...")
RULES = {"rules": [
    {"name": "synth-ai", "match": {"SeriesDescription": {"regex": "^synth"}}, "profile": "synth",
     "backend": "nnunet", "destinations": ["pacs"], "share": False},
    *HU_RULES["rules"],
]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from dask_cluster import DaskCluster

    with DaskCluster(tmp_path_factory.mktemp("dask")) as c:
        c.add_gpu_and_cpu_workers()
        yield c


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, list[Path]]:
    """name -> files: ``j2k`` (the real J2K abdomen, 20 slices), ``small`` (the small real body CT
    written as a 14-slice series), ``synth`` (a synthetic case for the tiny model)."""
    from ai_helpers import HELD_OUT_SEEDS, write_case_series

    from node.tools.synth_series import write_series
    from node.tools.synth_shapes import make_case

    root = tmp_path_factory.mktemp("series")
    return {
        "j2k": sorted(J2K.glob("*.dcm")),
        "small": sorted(write_series(SMALL_CT, root / "small", series_description="CT Body small 3mm",
                                     size=(96, 96, 14))),
        "synth": sorted(write_case_series(make_case(HELD_OUT_SEEDS[0]), root / "synth",
                                          series_description="synth 0")),
    }


@pytest.fixture
def group(tmp_path, orthanc, pg_url, cluster):
    """Two nodes on the Dask cluster, one PostgreSQL store, one shared folder; a fresh store,
    shared folder and Orthanc per test (the Dask cluster is the module's)."""
    shared = tmp_path / "shared"
    profiles = ai_profiles(tmp_path / "profiles")
    extra = {"executor": {"kind": "dask", "scheduler": cluster.address}, "profiles": str(profiles),
             "early_start_s": 0}
    nodes = [SharedNode(tmp_path / name, orthanc, ae=ae, shared=shared, store_url=pg_url, quiet_period_s=4.0,
                        extra=extra, rules=RULES)
             for name, ae in (("a", "NODEA"), ("b", "NODEB"))]
    start_all(nodes)
    try:
        for n in nodes:
            n.wait_log("connected to the Dask scheduler")
        cluster.wait_workers(2)
        yield nodes, orthanc, shared
    finally:
        for n in nodes:
            n.stop()



def jobs_show(node: SharedNode, job_id: int) -> str:
    r = subprocess.run([str(DICOM_NODE), "jobs", "show", str(job_id), "--config", str(node.config_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_burst_split_across_both_nodes(group, cluster, series):
    nodes, pacs, shared = group
    names = ["synth", "j2k", "small"]
    acked: dict[str, int] = {}
    threads = [threading.Thread(target=lambda n=n: acked.__setitem__(n, send_split(nodes, series[n])))
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acked == {n: len(series[n]) for n in names}  # storescu: every C-STORE acknowledged
    uids = {n: series_uid(series[n]) for n in names}
    store = nodes[0].store
    try:
        wait_settled(store, list(uids.values()), 180, nodes)
        time.sleep(2)  # more ticks on both nodes: nothing is routed, run or sent twice
        check_one_of_each(store, pacs, {uids[n]: acked[n] for n in names}, shared)
        workers = cluster.wait_workers(2)
        gpu = workers["gpu"]["address"]
        jobs = {n: store.list_jobs(series_uid=uids[n])[0] for n in names}
        model = jobs["synth"].params.slot
        assert (model.worker, model.kind, model.gpu) == (gpu, "gpu", 0), model
        assert jobs["synth"].result.backend["name"] == "nnunet"
        for n in ("j2k", "small"):
            s = jobs[n].params.slot
            assert s.kind == "cpu" and s.gpu is None and s.worker in {w["address"] for w in workers.values()}, s
        shown = jobs_show(nodes[1], jobs["synth"].id)
        assert f"Dask worker {gpu}" in shown and "GPU 0" in shown, shown
        shown = jobs_show(nodes[0], jobs["j2k"].id)
        assert f"Dask worker {jobs['j2k'].params.slot.worker}" in shown, shown
    finally:
        store.close()


def test_kill_9_a_dask_worker_mid_job(group, cluster, series):
    """SIGKILL the GPU worker's process under the running model job: Dask runs the task again on
    the restarted worker, not counted as a try; one SEG."""
    nodes, pacs, shared = group
    files = series["synth"]
    uid = series_uid(files)
    acked = send_split(nodes, files)
    store = nodes[0].store
    try:
        job = running_job(store.list_jobs, uid, 60)
        pid = try_pid(shared / "results", job.id)
        try_proc = psutil.Process(pid)
        forkserver = try_proc.parent()
        assert forkserver is not None
        worker_proc = forkserver.parent()  # try <- forkserver <- Dask worker process
        assert worker_proc is not None and "python" in worker_proc.name()
        os.kill(worker_proc.pid, signal.SIGKILL)
        try_proc.wait(10)  # the try dies with its worker
        wait_settled(store, [uid], 180, nodes)
        time.sleep(2)
        check_one_of_each(store, pacs, {uid: acked}, shared)
        (done,) = store.list_jobs(series_uid=uid)
        assert done.params.slot.pid != pid and done.attempts == 1, done.params.slot
        # ran again on the restarted GPU worker (a new Dask worker address), on its GPU slot
        slot = done.params.slot
        assert (slot.worker, slot.kind) == (cluster.wait_workers(2)["gpu"]["address"], "gpu"), slot
    finally:
        store.close()
        cluster.wait_workers(2)


def test_kill_9_the_scheduler_mid_job_and_restart_it(group, cluster, series):
    nodes, pacs, shared = group
    files = series["j2k"]
    uid = series_uid(files)
    acked = send_split(nodes, files)
    store = nodes[0].store
    try:
        job = running_job(store.list_jobs, uid, 60)
        try_pid(shared / "results", job.id)
        cluster.kill_scheduler()
        time.sleep(1.0)
        cluster.start_scheduler()
        wait_settled(store, [uid], 180, nodes)
        time.sleep(2)
        check_one_of_each(store, pacs, {uid: acked}, shared)
        assert any("lost the try" in n.log() for n in nodes)
        (done,) = store.list_jobs(series_uid=uid)
        assert done.attempts == 1  # a lost try is not counted
    finally:
        store.close()
        cluster.wait_workers(2)


def test_kill_9_a_node_mid_job(group, cluster, series):
    """SIGKILL the node whose pool claimed the running job: its claim runs out (job_lease_s) and the
    other node runs the job again on the cluster; one SEG."""
    nodes, pacs, shared = group
    files = series["j2k"]
    uid = series_uid(files)
    acked = send_split(nodes, files)
    store = nodes[0].store
    try:
        job = running_job(store.list_jobs, uid, 60)
        try_pid(shared / "results", job.id)  # the try is running on a worker
        assert job.worker, job
        pid = int(job.worker.split(":")[1])
        (victim,) = [n for n in nodes if n.proc is not None and n.proc.pid == pid]
        (survivor,) = [n for n in nodes if n is not victim]
        victim.kill()
        wait_settled(store, [uid], 180, [survivor])
        time.sleep(2)
        check_one_of_each(store, pacs, {uid: acked}, shared)
        (done,) = store.list_jobs(series_uid=uid)
        assert done.worker is not None and int(done.worker.split(":")[1]) == survivor.proc.pid
        assert "claim ran out" in survivor.log()
    finally:
        store.close()


def acknowledged_files(storescu_output: str) -> list[str]:
    """The files storescu -v reports as sent and acknowledged with Success, in order."""
    out: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current is not None:
            out.append(current)
            current = None
    return out


def test_kill_9_a_node_mid_receive(group, series, tmp_path):
    """SIGKILL the node a scanner is sending to, halfway through the series: every instance
    storescu saw acknowledged is in the store and the shared spool; the scanner sends the series
    again to the other node and it completes as one series, one job, one SEG (on the cluster)."""
    from pydicom import dcmread

    nodes, pacs, shared = group
    files = series["j2k"]
    uid = series_uid(files)
    victim, survivor = nodes
    cmd = ["storescu", "-xv", "-v", "-aet", "MODALITY", "-aec", victim.ae, "127.0.0.1", str(victim.port),
           *map(str, files)]
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = survivor.store
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(store.series_instances(uid)) < 6:
            time.sleep(0.01)
        victim.kill()
        out, _ = sender.communicate(timeout=60)
        kept = {i.sop_instance_uid: Path(i.path) for i in store.series_instances(uid)}
        # the scanner sends the whole series again to the other node, at once (within the quiet
        # period, else the part received would complete as a generation with a SEG of its own)
        resend = threading.Thread(target=send, args=(survivor, files[::-1]))
        resend.start()
        acked = acknowledged_files(out)
        # the node may have stored an instance it had no time to acknowledge; never the reverse
        assert acknowledged(out) == len(acked) and 0 < len(acked) <= len(kept) < len(files), out[-2000:]
        acked_sops = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in acked}
        assert acked_sops <= set(kept)  # nothing acknowledged is lost ...
        assert all(p.is_file() and p.is_relative_to(shared / "spool") for p in kept.values())  # ... on disk too
        resend.join()
        wait_settled(store, [uid], 180, [survivor])
        time.sleep(2)
        check_one_of_each(store, pacs, {uid: len(files)}, shared, both_nodes=False)
        assert set(kept) <= {i.sop_instance_uid for i in store.series_instances(uid)}
    finally:
        if sender.poll() is None:
            sender.kill()
        store.close()
