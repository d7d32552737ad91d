"""Test helpers for a group of ``dicom-node serve`` processes sharing one PostgreSQL store and one
shared spool/results folder (``shared_storage``), fed by DCMTK ``storescu`` with Orthanc as the PACS.

Used by tests/test_multinode_pg.py (local pool) and tests/test_cluster_e2e.py (the same group on a
Dask cluster).  Not a test file.  Also: :func:`ai_profiles` writes the profiles folder with the
tiny nnU-Net model profile (``synth``) used by the Dask tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread
from test_e2e_orthanc import REPO, Node

from node.store import Store

__all__ = ["SharedNode", "send", "send_split", "acknowledged", "series_uid", "start_all", "wait_settled",
           "check_one_of_each", "ai_profiles"]


class SharedNode(Node):
    """A node of the group: its own port, AE title and storage; the group's store and shared folder.

    ``extra`` is merged into its node.yaml (e.g. ``executor``, ``profiles``); ``rules`` replaces the
    routing rules.
    """

    def __init__(self, workdir: Path, pacs: Any, *, ae: str, shared: Path, store_url: str,
                 quiet_period_s: float = 4.0, extra: dict[str, Any] | None = None,
                 rules: dict[str, Any] | None = None) -> None:
        workdir.mkdir(parents=True)
        super().__init__(workdir, pacs, quiet_period_s=quiet_period_s)
        self.ae = ae
        self.config.update({
            "ae_title": ae,
            "shared_storage": str(shared),
            "store": {"url": store_url, "job_lease_s": 6, "work_lease_s": 4},
            "early_start_s": 1.0,
            "share": {"root": str(shared / "share")},
        })
        self.config.update(extra or {})
        if rules is not None:
            (workdir / "routing_rules.yaml").write_text(yaml.safe_dump(rules), encoding="utf-8")
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

    def wait_log(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert time.monotonic() < deadline, f"{self.ae}: no {text!r} in its log:\n{self.log()[-3000:]}"
            time.sleep(0.1)


def send(node: SharedNode, files: list[Path]) -> subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-xv", "-v", "-aet", "MODALITY", "-aec", node.ae, "127.0.0.1", str(node.port), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def acknowledged(storescu_output: str) -> int:
    """How many C-STOREs the peer acknowledged with Success, from ``storescu -v`` output."""
    return len(re.findall(r"Received Store Response \(Success\)", storescu_output))


def send_split(nodes: list[SharedNode], files: list[Path]) -> int:
    """Every other file to each node, both associations at once; returns how many were acknowledged."""
    outs: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda n=n, i=i: outs.append(send(n, files[i::len(nodes)])))
               for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == len(nodes), "a storescu failed"
    return sum(acknowledged(o.stdout + o.stderr) for o in outs)


def series_uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def start_all(nodes: list[SharedNode]) -> None:
    """Start the nodes at once (each waits for its own 'listening as')."""
    threads = [threading.Thread(target=n.start) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(n.proc is not None for n in nodes), "a node did not start"


def wait_settled(store: Store, uids: list[str], timeout_s: float, nodes: list[SharedNode]) -> None:
    """Until every series in ``uids`` has its jobs done and every dispatch is sent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [j for u in uids for j in store.list_jobs(series_uid=u)]
        ds = [d for j in jobs for d in store.list_dispatches(job_id=j.id)]
        if (jobs and all(j.state == "done" for j in jobs) and len({j.series_uid for j in jobs}) == len(uids)
                and ds and all(d.state == "sent" for d in ds)):
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {n.ae}\n{n.log()[-4000:]}" for n in nodes)
    raise AssertionError(f"not settled: {[(j.id, j.state, j.worker, j.error) for j in store.list_jobs()]}\n{logs}")


def check_one_of_each(store: Store, pacs: Any, sent: dict[str, int], shared: Path, *,
                      both_nodes: bool = True) -> None:
    """One series, one job, one sent dispatch per destination, one SEG instance in the PACS, per
    series; ``sent`` is series UID -> how many instances the senders had acknowledged, and must
    name every series the store and the PACS hold.  ``both_nodes``: each series was received in
    part by each node."""
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
        assert len(insts) == n and len({i.path for i in insts}) == n  # in the store ...
        assert all(Path(i.path).is_file() for i in insts)  # ... and in the shared spool
        assert all(Path(i.path).is_relative_to(shared / "spool") for i in insts)
        if both_nodes:
            assert {i.called_ae for i in insts} == {"NODEA", "NODEB"}  # both nodes took part of it
        (job,) = store.list_jobs(series_uid=uid)
        assert job.state == "done" and job.seg_series_uid in seg_uids
        for d in store.list_dispatches(job_id=job.id):
            sent_attempts = [a for a in store.dispatch_attempts(dispatch_id=d.id) if a["outcome"] == "sent"]
            assert d.state == "sent" and len(sent_attempts) == 1, (d, sent_attempts)


def ai_profiles(folder: Path) -> Path:
    """The repository's profiles plus ``synth``: the tiny nnU-Net model (tests/fixtures), as a
    profiles folder for a node's ``profiles:``."""
    from ai_helpers import NNUNET_TINY, SYNTH_TISSUES

    folder.mkdir(parents=True, exist_ok=True)
    for f in (REPO / "profiles").glob("*.yaml"):
        shutil.copy(f, folder / f.name)
    (folder / "synth.yaml").write_text(yaml.safe_dump({
        "name": "synth", "description": "synthetic organ and bone (tiny nnU-Net)", "model_type": "hu_based",
        "model": {"folder": str(NNUNET_TINY), "folds": [0]}, "tissues": SYNTH_TISSUES}, sort_keys=False))
    return folder
