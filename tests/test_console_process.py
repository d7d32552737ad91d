"""The console in a process of its own (node/console/process.py, control.py) under a real
``dicom-node serve``: another pid, niced; the node's live figures and metrics reached over the
control channel; actions (route, retry) reach the node's pool; the console restarted when it dies,
gone when the node is; the node receiving all along."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import requests
import yaml
from console_helpers import login, password_of
from prometheus_client.parser import text_string_to_metric_families

from node.console.auth import Role, create_user
from node.console.process import CONSOLE_NICENESS
from node.store import Store
from test_node_flow import DICOM_NODE, J2K, REPO, STORESCU, mr_series, wait_for

pytestmark = [
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found: {J2K}"),
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu not installed"),
]

RULES = """
rules:
  - name: knee-liver
    match: {SeriesDescription: {regex: "never matches"}}
    profile: liver
    share: false
"""


class ServedNode:
    """``dicom-node serve`` in a subprocess with its console on a free port and the users of each role."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "rules.yaml").write_text(RULES)
        cfg = {"port": 0, "bind_address": "127.0.0.1", "storage": str(tmp / "var"), "quiet_period_s": 1,
               "early_start_s": 0, "workers": 1, "rules": str(tmp / "rules.yaml"), "profiles": str(REPO / "profiles"),
               "log_level": "INFO", "http": {"port": 0}, "job_retry": {"max_attempts": 1}}
        cfg.update(overrides)
        (tmp / "node.yaml").write_text(yaml.safe_dump(cfg))
        store = Store(tmp / "var" / "node.db")
        for name in ("viewer", "operator", "admin"):
            create_user(store, name, Role.parse(name), password_of(name))
        store.close()
        self.log = tmp / "node.log"
        self.proc = subprocess.Popen([*DICOM_NODE, "serve", "--config", str(tmp / "node.yaml")], stdout=subprocess.PIPE,
                                     stderr=open(self.log, "wb"), text=True, cwd=tmp)
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(2)]  # listening; then the console's line
        m = re.search(r"on port (\d+),", lines[0])
        assert m, f"unexpected {lines!r}; log:\n{self.log.read_text()[-3000:]}"
        self.port = int(m.group(1))
        self.console_line = lines[1]
        m = re.search(r"console at (http://[^/]+)/", lines[1])
        self.url = m.group(1) if m else ""
        self._clients: dict[str, requests.Session] = {}

    def client(self, name: str) -> requests.Session:
        if name not in self._clients:
            self._clients[name] = login(self.url, name, password_of(name))
        return self._clients[name]

    def get(self, path: str, who: str = "viewer") -> requests.Response:
        return self.client(who).get(self.url + path, timeout=30)

    def health(self) -> dict[str, Any]:
        r = self.get("/api/v1/health")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def console_pid(self) -> int:
        return int(self.health()["console_pid"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def storescu(port: int, files: list[Path]) -> None:
    r = subprocess.run([STORESCU, "-xv", "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _received(node: ServedNode) -> float:
    r = node.get("/metrics")
    assert r.status_code == 200, r.text
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == "dicomnode_received_instances_total" and s.labels.get("outcome") == "stored":
                return float(s.value)
    return 0.0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedNode]:
    node = ServedNode(tmp_path_factory.mktemp("console-process"))
    try:
        yield node
    finally:
        node.stop()


def test_console_runs_in_its_own_niced_process_and_shows_the_node(served: ServedNode) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # sop_class makes its names at import

    assert served.url, served.console_line
    h = served.health()
    assert h["pid"] == served.proc.pid and h["console_pid"] != served.proc.pid
    console = psutil.Process(h["console_pid"])
    assert console.ppid() == served.proc.pid
    assert console.nice() == psutil.Process(served.proc.pid).nice() + CONSOLE_NICENESS
    assert tuple(console.ionice()) == (psutil.IOPRIO_CLASS_BE, 7)
    assert h["receiver"]["up"] is True and h["receiver"]["port"] == served.port
    assert [s["slot"] for s in h["queue"]["slots"]] == ["cpu0"] and h["workers"]["executor"].startswith("local")
    # an association held open is counted by the node's receiver, seen through the console
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", served.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert served.health()["receiver"]["associations_now"] == 1
    finally:
        assoc.release()
    wait_for(lambda: served.health()["receiver"]["associations_now"] == 0, 10, "the association to end")
    assert served.get("/readyz").json()["checks"]["receiver"] == "ok"


def test_metrics_show_the_node_counters(served: ServedNode) -> None:
    before = _received(served)
    files = sorted(J2K.glob("*.dcm"))[:4]
    storescu(served.port, files)
    assert _received(served) - before == 4
    text = served.get("/metrics").text
    assert "dicomnode_jobs" in text and "dicomnode_spool_bytes" in text  # the store's gauges, read by the console


def test_route_and_retry_through_the_console_reach_the_node(served: ServedNode, tmp_path: Path) -> None:
    """Routing uses the node's rules in force (asked over the channel); a retry wakes the node's pool."""
    files, uid = mr_series(tmp_path / "mr", "MR knee")
    storescu(served.port, files)
    wait_for(lambda: served.get(f"/api/v1/series/{uid}").status_code == 200
             and served.get(f"/api/v1/series/{uid}").json()["state"] == "unrouted", 60, "the MR series unrouted")
    assert served.get("/api/v1/rules").status_code == 200
    operator = served.client("operator")
    r = operator.post(served.url + f"/api/v1/series/{uid}/route", json={"rule": "knee-liver"}, timeout=30)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]

    def job() -> dict[str, Any]:
        return dict(served.get(f"/api/v1/jobs/{job_id}").json())

    first = wait_for(lambda: (lambda j: j if j["state"] == "failed" else None)(job()), 60, "the job to fail")
    assert "bad input" in first["error"]
    r = operator.post(served.url + f"/api/v1/jobs/{job_id}/retry", timeout=30)
    assert r.status_code == 200, r.text
    again = wait_for(lambda: (lambda j: j if j["state"] == "failed" and j["finished_at"] != first["finished_at"]
                              else None)(job()), 60, "the retried job to run")
    assert again["attempts"] == 1 and "bad input" in again["error"]


def test_a_rule_change_is_in_force_in_the_node_when_the_answer_comes(served: ServedNode) -> None:
    """Applying reloads the node's rules over the channel (not at its next 2 s reload tick)."""
    admin = served.client("admin")
    for change in ("disable", "enable"):
        r = admin.post(served.url + f"/api/v1/rules/rule/knee-liver/{change}", json={"comment": "test"}, timeout=30)
        assert r.status_code == 200, r.text
        live = served.get("/api/v1/rules").json()
        assert live["loaded"]["version"] == live["version"] and live["rules"][0]["enabled"] is (change == "enable")


def test_a_killed_console_comes_back_and_the_node_receives_meanwhile(served: ServedNode) -> None:
    old = served.console_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _gone(old), 10, "the console process to end")
    before_log = served.log_text()
    storescu(served.port, sorted(J2K.glob("*.dcm"))[4:6])  # the receiver does not need the console

    def answers() -> bool:
        try:
            return requests.get(served.url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(answers, 60, "the console to answer again")
    new = served.console_pid()  # same URL, same cookie key: the session still holds
    assert new != old and psutil.Process(new).ppid() == served.proc.pid
    assert f"console process {old} ended" in before_log + served.log_text()


def test_the_console_process_ends_with_its_node(tmp_path: Path) -> None:
    node = ServedNode(tmp_path / "killed")
    try:
        pid = node.console_pid()
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        wait_for(lambda: _gone(pid), 10, "the console process to end after its node")
    finally:
        node.stop()
    node = ServedNode(tmp_path / "stopped")  # and a clean stop stops it too
    pid = node.console_pid()
    node.stop()
    assert node.proc.returncode == 0
    wait_for(lambda: _gone(pid), 5, "the console process to end at node stop")


def test_console_port_in_use_leaves_the_node_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = ServedNode(tmp_path, http={"port": taken.getsockname()[1]})
        try:
            assert "console off (it did not start, see the log)" in node.console_line
            assert "console not started" in node.log_text()
            storescu(node.port, sorted(J2K.glob("*.dcm"))[:1])
        finally:
            node.stop()
