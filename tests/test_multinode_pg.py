"""Several node processes, one PostgreSQL store, one shared spool/results folder.

Two ``dicom-node serve`` processes (different ports, AE titles, configuration and local storage)
share a throwaway PostgreSQL cluster (tests/pg_helpers.py) and ``shared_storage``.  DCMTK
``storescu`` sends each series in two halves, one to each node at the same time; Orthanc is the
PACS.  Each series must complete as one series with one job and one SEG, whichever node does
what; and with one node killed (SIGKILL) while it runs the job, the other runs it again once the
claim has run out, and Orthanc still ends with exactly one SEG.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from multinode_helpers import SharedNode, check_one_of_each, send, send_split, series_uid, start_all, wait_settled
from test_e2e_orthanc import DATA, DICOM_NODE, J2K

SMALL_CT = DATA / "ct-body-3mm-small" / "ct.nii.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not DICOM_NODE.exists(), reason="dicom-node is not installed in this environment"),
]


@pytest.fixture
def group(tmp_path, orthanc, pg_url):
    shared = tmp_path / "shared"
    nodes = [SharedNode(tmp_path / name, orthanc, ae=ae, shared=shared, store_url=pg_url)
             for name, ae in (("a", "NODEA"), ("b", "NODEB"))]
    start_all(nodes)
    try:
        yield nodes, orthanc, shared
    finally:
        for n in nodes:
            n.stop()


def test_two_nodes_share_store_and_spool(group, tmp_path):
    from node.tools.synth_series import write_series

    nodes, pacs, shared = group
    real = sorted(J2K.glob("*.dcm"))
    synth = sorted(write_series(SMALL_CT, tmp_path / "synth", series_description="CT Body synth 3mm",
                                size=(96, 96, 14)))
    for files in (real, synth):
        send_split(nodes, files)
    sent = {series_uid(real): len(real), series_uid(synth): len(synth)}
    store = nodes[0].store
    try:
        wait_settled(store, list(sent), 120, nodes)
        time.sleep(3)  # more ticks on both nodes: nothing is routed, run or sent twice
        check_one_of_each(store, pacs, sent, shared)
        # one node at a time did the series work; both ran the store-wide claim sweep
        holders = [n for n in nodes if "does the series work" in n.log()]
        assert len(holders) >= 1
        assert [name for name, _, _ in store.node_leases()] == ["retention", "series"]
    finally:
        store.close()


def test_node_killed_while_running_the_job(group):
    nodes, pacs, shared = group
    files = sorted(J2K.glob("*.dcm"))
    uid = series_uid(files)
    send_split(nodes, files)  # every instance acknowledged by one node or the other
    store = nodes[0].store
    try:
        deadline = time.monotonic() + 60
        job = None
        while time.monotonic() < deadline:
            running = [j for j in store.list_jobs(series_uid=uid) if j.state == "running"]
            if running:
                job = running[0]
                break
            time.sleep(0.05)
        assert job is not None and job.worker, [(j.id, j.state) for j in store.list_jobs()]
        pid = int(job.worker.split(":")[1])
        (victim,) = [n for n in nodes if n.proc is not None and n.proc.pid == pid]
        (survivor,) = [n for n in nodes if n is not victim]
        victim.kill()
        wait_settled(store, [uid], 120, [survivor])
        time.sleep(3)
        # the try on the killed node counted: the job ran again, on the survivor
        (done,) = store.list_jobs(series_uid=uid)
        assert done.attempts >= 2 and done.worker is not None
        assert int(done.worker.split(":")[1]) == survivor.proc.pid
        check_one_of_each(store, pacs, {uid: len(files)}, shared)
        assert "claim ran out" in survivor.log()
    finally:
        store.close()


def test_node_killed_while_receiving(group, tmp_path):
    """SIGKILL of the node a scanner is sending to, halfway through: every instance it acknowledged
    is in the shared spool and the store; the scanner sends the series again to the other node, and
    it completes as one series with one job and one SEG."""
    from node.tools.synth_series import write_series

    nodes, pacs, shared = group
    files = sorted(write_series(SMALL_CT, tmp_path / "synth", series_description="CT Body synth 3mm",
                                size=(96, 96, 40)))
    uid = series_uid(files)
    victim, survivor = nodes
    cmd = ["storescu", "-xv", "-aet", "MODALITY", "-aec", victim.ae, "127.0.0.1", str(victim.port),
           *map(str, files)]
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = survivor.store
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(store.series_instances(uid)) < 10:
            time.sleep(0.02)
        victim.kill()
        out, _ = sender.communicate(timeout=60)
        acknowledged = len(store.series_instances(uid))
        assert 10 <= acknowledged < len(files), out[-2000:]
        kept = {i.sop_instance_uid: Path(i.path) for i in store.series_instances(uid)}
        assert all(p.is_file() for p in kept.values())
        # the scanner sends the whole series again, to the other node; the instances the victim never
        # got first, so the series clock restarts at once (duplicates do not restart it) and the
        # series is not completed in between with part of its instances (that would be a second
        # generation with a SEG of its own, by design)
        send(survivor, files[::-1])
        wait_settled(store, [uid], 120, [survivor])
        time.sleep(3)
        segs = pacs.seg_series()
        assert len(segs) == 1 and len(pacs.series_instances(segs[0]["ID"])) == 1
        series = store.get_series(uid)
        assert series is not None and series.instance_count == len(files) and series.state == "done"
        assert set(kept) <= {i.sop_instance_uid for i in store.series_instances(uid)}
        (job,) = store.list_jobs(series_uid=uid)
        assert job.state == "done"
    finally:
        if sender.poll() is None:
            sender.kill()
        store.close()
