"""Several node processes, one PostgreSQL store, one shared spool/results folder.

Two ``dicom-node serve`` processes (different ports, AE titles, configuration and local storage)
share a throwaway PostgreSQL cluster (tests/pg_helpers.py) and ``shared_storage``.  DCMTK
``storescu`` sends each series in two halves, one to each node at the same time; Orthanc is the
PACS.  Each series must complete as one series with one job and one SEG, whichever node does
what; and with one node killed (SIGKILL) while it runs the job, the other runs it again once the
claim has run out, and Orthanc still ends with exactly one SEG.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from test_e2e_orthanc import DATA, DICOM_NODE, J2K, Node

from node.store import Store

SMALL_CT = DATA / "ct-body-3mm-small" / "ct.nii.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not DICOM_NODE.exists(), reason="dicom-node is not installed in this environment"),
]


class SharedNode(Node):
    """A node of the group: its own port, AE title and storage; the group's store and shared folder."""

    def __init__(self, workdir: Path, pacs: Any, *, ae: str, shared: Path, store_url: str) -> None:
        workdir.mkdir(parents=True)
        super().__init__(workdir, pacs, quiet_period_s=4.0)
        self.ae = ae
        self.config.update({
            "ae_title": ae,
            "shared_storage": str(shared),
            "store": {"url": store_url, "job_lease_s": 6, "work_lease_s": 4},
            "early_start_s": 1.0,
            "share": {"root": str(shared / "share")},
        })
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        self.store_url = store_url

    @property
    def store(self) -> Store:
        return Store(self.store_url, migrate=False)

    def kill(self) -> None:
        """SIGKILL the node process alone (its job processes notice and end themselves)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


def send(node: SharedNode, files: list[Path]) -> None:
    cmd = ["storescu", "-xv", "-aet", "MODALITY", "-aec", node.ae, "127.0.0.1", str(node.port), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def send_split(nodes: list[SharedNode], files: list[Path]) -> None:
    """Every other file to each node, both associations at once."""
    threads = [threading.Thread(target=send, args=(n, files[i::len(nodes)])) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def series_uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture
def group(tmp_path, orthanc, pg_url):
    shared = tmp_path / "shared"
    nodes = [SharedNode(tmp_path / name, orthanc, ae=ae, shared=shared, store_url=pg_url)
             for name, ae in (("a", "NODEA"), ("b", "NODEB"))]
    threads = [threading.Thread(target=n.start) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert all(n.proc is not None for n in nodes), "a node did not start"
        yield nodes, orthanc, shared
    finally:
        for n in nodes:
            n.stop()


def wait_settled(store: Store, uids: list[str], timeout_s: float, nodes: list[SharedNode]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [j for u in uids for j in store.list_jobs(series_uid=u)]
        ds = store.list_dispatches()
        if (jobs and all(j.state == "done" for j in jobs) and len({j.series_uid for j in jobs}) == len(uids)
                and ds and all(d.state == "sent" for d in ds)):
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {n.ae}\n{n.log()[-4000:]}" for n in nodes)
    raise AssertionError(f"not settled: {[(j.id, j.state, j.worker, j.error) for j in store.list_jobs()]}\n{logs}")


def check_one_of_each(store: Store, pacs: Any, sent: dict[str, int], shared: Path) -> None:
    """One series, one job, one sent dispatch per destination, one SEG instance in the PACS, per series."""
    segs = pacs.seg_series()
    assert len(segs) == len(sent), [s["MainDicomTags"] for s in segs]
    seg_uids = {s["MainDicomTags"]["SeriesInstanceUID"] for s in segs}
    for s in segs:
        assert len(pacs.series_instances(s["ID"])) == 1
    assert {s.series_uid for s in store.list_series()} == set(sent)
    for uid, n in sent.items():
        series = store.get_series(uid)
        assert series is not None and series.instance_count == n and series.state == "done", series
        insts = store.series_instances(uid)
        assert len(insts) == n and all(Path(i.path).is_file() for i in insts)
        assert all(Path(i.path).is_relative_to(shared / "spool") for i in insts)
        assert {i.called_ae for i in insts} == {"NODEA", "NODEB"}  # both nodes took part of it
        (job,) = store.list_jobs(series_uid=uid)
        assert job.state == "done" and job.seg_series_uid in seg_uids
        for d in store.list_dispatches(job_id=job.id):
            sent_attempts = [a for a in store.dispatch_attempts(dispatch_id=d.id) if a["outcome"] == "sent"]
            assert d.state == "sent" and len(sent_attempts) == 1, (d, sent_attempts)


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
