"""End to end with real peers: DCMTK ``storescu`` (scanner) -> ``dicom-node serve`` -> Orthanc (PACS) + share.

The node runs as a subprocess with a temp ``node.yaml``; the J2K series is sent
with ``storescu -xv`` (Debian's DCMTK has no JPEG 2000 codec: it may only
propose JPEG 2000 lossless).  Results are checked where an operator would look:
Orthanc's REST API and the share folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from node.share import MANIFEST_NAME
from node.store import Store

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
DICOM_NODE = Path(sys.executable).with_name("dicom-node")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not DICOM_NODE.exists(), reason="dicom-node is not installed in this environment"),
]

RULES = {
    "rules": [
        {
            "name": "body-ct-bones",
            "match": {"Modality": "CT", "SeriesDescription": {"regex": "(?i)body"}},
            "profile": "bones",
            "destinations": ["pacs"],
            "share": True,
        }
    ]
}


class Node:
    """``dicom-node serve`` in a subprocess."""

    def __init__(self, workdir: Path, pacs, *, quiet_period_s: float = 2.0) -> None:
        from orthanc import free_port

        self.workdir = workdir
        self.port = free_port()
        (workdir / "routing_rules.yaml").write_text(yaml.safe_dump(RULES), encoding="utf-8")
        self.config: dict[str, Any] = {
            "ae_title": "DICOMNODE",
            "port": self.port,
            "bind_address": "127.0.0.1",
            "storage": str(workdir / "var"),
            "quiet_period_s": quiet_period_s,
            "workers": 1,
            "rules": str(workdir / "routing_rules.yaml"),
            "profiles": str(REPO / "profiles"),
            "share": {"root": str(workdir / "share")},
            "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            "dispatch_retry": {"max_attempts": 60, "backoff_base_s": 1, "backoff_max_s": 2},
            "timeouts": {"acse_s": 10, "dimse_s": 30, "network_s": 30, "connect_s": 3},
            "log_level": "INFO",
        }
        self.config_path = workdir / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(DICOM_NODE), "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir), start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while "listening as" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dicom-node serve did not come up:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def store(self) -> Store:
        return Store(Path(self.config["storage"]) / "node.db")


@pytest.fixture
def node_and_pacs(tmp_path, orthanc):
    (tmp_path / "node").mkdir()
    node = Node(tmp_path / "node", orthanc)
    node.start()
    try:
        yield node, orthanc
    finally:
        node.stop()


def storescu(port: int, files) -> subprocess.CompletedProcess:
    cmd = ["storescu", "-xv", "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def wait_for_seg(pacs, timeout_s: float, node: Node):
    found = pacs.wait_for(lambda: pacs.seg_series(), timeout_s=timeout_s)
    assert found, f"no SEG in Orthanc after {timeout_s} s; node log:\n{node.log()[-6000:]}"
    return found


def wait_job_settled(store, timeout_s: float = 60.0) -> list:
    """The jobs once none is running: the SEG reaches the PACS before the job's meshes are done
    (SEG first), so a SEG in the PACS does not mean its job has finished."""
    deadline = time.monotonic() + timeout_s
    while any(j.state == "running" for j in store.list_jobs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return store.list_jobs()


def check_result(node: Node, pacs, source_series_uid: str, n_files: int) -> None:
    (seg_series,) = pacs.seg_series()
    (inst,) = pacs.series_instances(seg_series["ID"])
    tags = pacs.instance_tags(inst["ID"])
    assert tags["Modality"] == "SEG"
    assert [r["SeriesInstanceUID"] for r in tags["ReferencedSeriesSequence"]] == [source_series_uid]

    store = node.store
    (job,) = wait_job_settled(store)
    assert job.state == "done" and job.profile == "bones" and job.rule == "body-ct-bones"
    assert job.seg_series_uid == seg_series["MainDicomTags"]["SeriesInstanceUID"]
    # the instance in the PACS is the one in the result folder (its UID is fixed by the job)
    result_seg = dcmread(job.result.seg, stop_before_pixels=True)
    assert result_seg.SOPInstanceUID == inst["MainDicomTags"]["SOPInstanceUID"]

    # the share drop may land a moment after the SEG (both are dispatches of the same job)
    share = Path(node.config["share"]["root"])
    deadline = time.monotonic() + 20
    while not list(share.rglob(MANIFEST_NAME)) and time.monotonic() < deadline:
        time.sleep(0.2)
    (manifest_path,) = list(share.rglob(MANIFEST_NAME))
    m = json.loads(manifest_path.read_text())
    folder = manifest_path.parent
    names = {p.name for p in folder.iterdir()}
    assert any(n.endswith(".stl") for n in names) and any(n.endswith("_colored.ply") for n in names)
    assert {"bones_seg.dcm", "report.json", MANIFEST_NAME} <= names
    for o in m["outputs"]:
        assert hashlib.sha256((folder / o["name"]).read_bytes()).hexdigest() == o["sha256"]
    assert m["input"]["series_instance_uid"] == source_series_uid and m["input"]["instance_count"] == n_files
    assert m["input"]["source_ae"] == "MODALITY"
    assert dcmread(folder / "bones_seg.dcm").SeriesInstanceUID == job.seg_series_uid
    deadline = time.monotonic() + 10
    while any(d.state != "sent" for d in store.list_dispatches()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted((d.destination, d.kind, d.state) for d in store.list_dispatches()) == [
        ("pacs", "dicom", "sent"),
        ("share", "share", "sent"),
    ]
    store.close()


def test_scanner_to_node_to_pacs_and_share(node_and_pacs):
    node, pacs = node_and_pacs
    files = sorted(J2K.glob("*.dcm"))
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    storescu(node.port, files)
    wait_for_seg(pacs, 90, node)
    check_result(node, pacs, uid, len(files))


def test_pacs_down_until_after_the_job(node_and_pacs):
    node, pacs = node_and_pacs
    files = sorted(J2K.glob("*.dcm"))
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    pacs.stop()
    storescu(node.port, files)

    # the job finishes, the C-STORE fails and is retried with backoff, the error is recorded
    deadline = time.monotonic() + 90
    tries = None
    while time.monotonic() < deadline:
        store = node.store
        ds = [d for d in store.list_dispatches() if d.kind == "dicom"]
        store.close()
        if ds and ds[0].attempts >= 3:
            tries = ds[0]
            break
        time.sleep(0.5)
    assert tries is not None, f"no retried dispatch; node log:\n{node.log()[-6000:]}"
    assert tries.state == "pending" and "cannot connect" in (tries.last_error or "")

    pacs.start()
    wait_for_seg(pacs, 30, node)
    time.sleep(3)  # a few more dispatcher rounds: still exactly one SEG instance
    check_result(node, pacs, uid, len(files))
