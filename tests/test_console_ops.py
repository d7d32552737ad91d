"""Console operations on a real node: Prometheus metrics counted where things happen (DCMTK
storescu/echoscu against the receiver), destinations with C-ECHO against a real storescp and
dispatch pause honoured by the dispatcher, users by API and shell, the audit export, the login
rate limit."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from console_helpers import ConsoleNode, start_console_node
from prometheus_client.parser import text_string_to_metric_families

from node.config import NodeConfig
from node.console.auth import verify_password
from node.dispatcher import Dispatcher
from node.metrics import REGISTRY
from node.store import InstanceRecord, Store

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO.parent / "shared" / "data" / "ct-abdomen-siemens-j2k" / "dicom"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")
needs_data = pytest.mark.skipif(not SERIES.is_dir(), reason="shared data not present")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK not installed")
    out = tmp_path_factory.mktemp("storescp")
    port = _free_port()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ops_node(tmp_path_factory: pytest.TempPathFactory, storescp: int) -> Iterator[ConsoleNode]:
    """A node whose series never complete (quiet period of an hour: no job runs), a `pacs` destination
    that answers (storescp) and a `down` one that does not."""
    node = start_console_node(
        tmp_path_factory.mktemp("ops") / "var", quiet_period_s=3600, early_start_s=0,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp},
                      "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": _free_port()}},
        allowed_calling_aes=[{"ae_title": "STORESCU"}, {"ae_title": "MODALITY1", "host": "127.0.0.1"}],
    )
    try:
        yield node
    finally:
        node.service.stop()


def _metrics(node: ConsoleNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = node.token_client("viewer", "prometheus").get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain"), text.text[:300]
    out = {}
    for fam in text_string_to_metric_families(text.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@needs_dcmtk
@needs_data
def test_metrics_count_what_the_receiver_saw(ops_node: ConsoleNode) -> None:
    before = _metrics(ops_node)
    files = sorted(SERIES.glob("*.dcm"))[:5]
    port = str(ops_node.service.port)
    subprocess.run(["storescu", "-xv", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", port, *map(str, files)],
                   check=True, capture_output=True, timeout=60)
    # the calling AE is not on the allow-list: A-ASSOCIATE-RJ
    subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", port], capture_output=True, timeout=30)
    ops_node.service.console.ctx.clear_cache()  # the spool bytes are cached for 15 s
    after = _metrics(ops_node)
    stored = _get(after, "dicomnode_received_instances_total", outcome="stored") - \
        _get(before, "dicomnode_received_instances_total", outcome="stored")
    assert stored == 5
    size = sum(f.stat().st_size for f in files)
    got_bytes = _get(after, "dicomnode_received_bytes_total") - _get(before, "dicomnode_received_bytes_total")
    assert 0.9 * size < got_bytes < 1.1 * size  # data sets without the file meta header
    assert _get(after, "dicomnode_associations_total", outcome="accepted", reason="") >= 1
    assert _get(after, "dicomnode_associations_total", outcome="rejected", reason="calling_ae") == \
        _get(before, "dicomnode_associations_total", outcome="rejected", reason="calling_ae") + 1
    assert _get(after, "dicomnode_spool_bytes") >= size * 0.9
    # Prometheus naming: counters end in _total, durations in seconds; no UID in any label value
    names = {n for n, _ in after}
    assert "dicomnode_job_duration_seconds_bucket" in names or "dicomnode_job_duration_seconds_count" in names \
        or not any(n.startswith("dicomnode_job_duration") for n in names)
    for (_name, labels) in after:
        for _k, v in labels:
            assert not re.fullmatch(r"[0-9]+(\.[0-9]+){3,}", v), f"a UID as a label value: {v}"


def test_metrics_need_a_login(ops_node: ConsoleNode) -> None:
    assert ops_node.anonymous().get("/metrics").status_code == 401


@needs_dcmtk
def test_destinations_echo_and_allowed_aes(ops_node: ConsoleNode) -> None:
    op = ops_node.client("operator")
    ok = op.post("/api/v1/destinations/pacs/echo").json()
    assert ok["ok"] is True and ok["detail"] == "status 0x0000"
    bad = op.post("/api/v1/destinations/down/echo").json()
    assert bad["ok"] is False and bad["detail"]
    assert ops_node.client("viewer").post("/api/v1/destinations/pacs/echo").status_code == 403
    report = ops_node.client("viewer").get("/api/v1/destinations").json()
    names = {d["name"]: d for d in report["destinations"]}
    assert names["pacs"]["port"] > 0 and names["pacs"]["kind"] == "dimse"
    assert report["allowed_calling_aes"] == [{"ae_title": "STORESCU", "host": None},
                                             {"ae_title": "MODALITY1", "host": "127.0.0.1"}]
    page = ops_node.client("viewer").get("/destinations")
    assert page.status_code == 200 and "MODALITY1" in page.text and "C-ECHO" not in page.text  # no buttons for viewers
    echoes = ops_node.store.list_audit(action="destination.echo")
    assert {e["target"] for e in echoes[:2]} == {"destination pacs", "destination down"}


def _queue_dispatch(store: Store, destination: str) -> int:
    """A job with one pending dispatch row to ``destination``."""
    uid = f"1.2.826.0.1.3680043.8.498.{time.time_ns()}"
    store.record_instance(InstanceRecord(
        sop_instance_uid=uid + ".1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=uid, study_uid=uid + ".9",
        path="/nonexistent.dcm", transfer_syntax="1.2.840.10008.1.2.1", size=1, calling_ae="MODALITY",
        called_ae="DICOMNODE", peer_address="127.0.0.1", tags={}))
    job_id, _ = store.create_job(uid, "r", profile="bones", backend="hu_based", rules_version="v", generation=1)
    dispatch_id, _ = store.add_dispatch(job_id, destination, "dicom")
    return dispatch_id


def test_dispatcher_skips_paused_destinations(tmp_path: Path) -> None:
    config = NodeConfig(storage=tmp_path / "var", destinations={"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 9},
                                                               "other": {"ae_title": "O", "host": "127.0.0.1", "port": 9}},
                        dispatch_retry={"max_attempts": 1})
    store = Store(config.database_path)
    paused, other = _queue_dispatch(store, "pacs"), _queue_dispatch(store, "other")
    store.set_destination_paused("pacs", True, by="test")
    assert store.paused_destinations() == {"pacs"}
    dispatcher = Dispatcher(config, store)

    def attempts_counted(dest: str) -> float:
        return sum(REGISTRY.get_sample_value("dicomnode_dispatch_attempts_total",
                                             {"outcome": o, "destination": dest, "kind": "dicom"}) or 0.0
                   for o in ("sent", "retry", "failed"))

    counted = attempts_counted("other"), attempts_counted("pacs")
    assert dispatcher.run_due() == 1  # only the other destination's
    assert (attempts_counted("other"), attempts_counted("pacs")) == (counted[0] + 1, counted[1])
    p, o = store.get_dispatch(paused), store.get_dispatch(other)
    assert p is not None and p.attempts == 0 and p.state == "pending"
    assert o is not None and o.attempts == 1
    store.set_destination_paused("pacs", False, by="test")
    assert dispatcher.run_due() == 1
    p = store.get_dispatch(paused)
    assert p is not None and p.attempts == 1
    stats = store.destination_stats()
    assert stats["pacs"]["paused"] is False and stats["pacs"]["changed_by"] == "test" and stats["pacs"]["last_error"]
    store.close()


def test_pause_and_resume_by_api(ops_node: ConsoleNode) -> None:
    op = ops_node.client("operator")
    assert op.post("/api/v1/destinations/down/pause").json() == {"name": "down", "paused": True}
    assert ops_node.store.paused_destinations() == {"down"}
    row = {x["name"]: x for x in op.get("/api/v1/destinations").json()["destinations"]}["down"]
    assert row["paused"] is True and row["changed_by"] == "operator"
    page = op.get("/destinations")
    assert "Resume" in page.text and "paused" in page.text
    assert op.post("/api/v1/destinations/down/resume").json()["paused"] is False
    assert ops_node.store.paused_destinations() == set()
    actions = [e["action"] for e in ops_node.store.list_audit(username="operator", limit=10)]
    assert "destination.pause" in actions and "destination.resume" in actions
    assert ops_node.client("viewer").post("/api/v1/destinations/down/pause").status_code == 403
    assert op.post("/api/v1/destinations/nosuch/pause").status_code == 404


def test_users_by_api_one_time_password_and_last_admin(ops_node: ConsoleNode) -> None:
    admin = ops_node.client("admin")
    r = admin.post("/api/v1/users", json={"username": "carol", "role": "operator"})
    assert r.status_code == 201, r.text
    one_time = r.json()["one_time_password"]
    assert ops_node.client("operator").get("/api/v1/users").status_code == 403
    from console_helpers import login
    carol = login(ops_node.url, "carol", one_time)
    # must change first: everything else is refused
    assert carol.get(ops_node.url + "/api/v1/health").status_code == 403
    assert carol.post(ops_node.url + "/api/v1/account/password", json={"current": one_time, "new": "carol-new-pass-1"}).ok
    assert carol.get(ops_node.url + "/api/v1/health").status_code == 200
    assert admin.patch("/api/v1/users/carol", json={"role": "viewer"}).ok
    assert admin.patch("/api/v1/users/admin", json={"role": "viewer"}).status_code == 400  # the last admin
    assert admin.delete("/api/v1/users/admin").status_code == 400
    assert admin.delete("/api/v1/users/carol").ok
    assert carol.get(ops_node.url + "/api/v1/health").status_code == 401  # sessions end with the user
    actions = [e["action"] for e in ops_node.store.list_audit(limit=30)]
    for a in ("user.add", "user.role", "user.remove", "user.password"):
        assert a in actions


def test_audit_export_is_json_lines_oldest_first(ops_node: ConsoleNode) -> None:
    r = ops_node.client("admin").get("/api/v1/audit/export")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert len(rows) >= 3 and [x["id"] for x in rows] == sorted(x["id"] for x in rows)
    assert {"at", "time", "username", "client", "action", "target", "detail"} <= set(rows[0])
    assert any(x["action"] == "login.success" and x["username"] == "admin" for x in rows)
    assert ops_node.client("operator").get("/api/v1/audit/export").status_code == 403


def test_failed_logins_are_rate_limited(tmp_path: Path) -> None:
    node = start_console_node(tmp_path / "var", users=("viewer",), http={"login_max_failures": 2})
    try:
        s = node.anonymous()

        def attempt(password: str) -> int:
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', s.get("/login").text).group(1)  # type: ignore[union-attr]  # the form has one
            return s.post("/login", data={"username": "viewer", "password": password, "csrf_token": csrf}).status_code

        assert attempt("wrong-one-1") == 401
        assert attempt("wrong-one-2") == 401
        assert attempt("viewer-pass-1234") == 429  # even the right password, until the window passed
        refused = node.store.list_audit(action="login.refused")
        assert refused and refused[0]["username"] == "viewer"
        # the user, from another address, is not locked out by the guesser's failures
        assert _login_from("127.0.0.2", node.url, "viewer", "viewer-pass-1234") == 303
        assert node.store.list_audit(action="login.success")[0]["client"] == "127.0.0.2"
    finally:
        node.service.stop()


def _login_from(source: str, url: str, username: str, password: str) -> int:
    """Log in over a connection from ``source`` (another loopback address: another client to the
    console); returns the login answer's status."""
    import http.client
    import urllib.parse

    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    conn = http.client.HTTPConnection(str(host), port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", "/login")
        page = conn.getresponse()
        cookie = page.getheader("Set-Cookie", "").split(";", 1)[0]
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.read().decode()).group(1)  # type: ignore[union-attr]  # the form has one
        body = urllib.parse.urlencode({"username": username, "password": password, "csrf_token": csrf})
        conn.request("POST", "/login", body=body, headers={"Cookie": cookie,
                                                           "Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def test_users_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``dicom-node users`` through its entry point, in this process (one CLI process costs seconds of imports)."""
    from node.cli import main

    db = ["--db", str(tmp_path / "node.db")]

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["users", *args, *db])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("add", "dave", "--role", "admin", "--one-time")
    assert code == 0 and "one-time password" in out
    assert run("passwd", "dave", "--password-stdin", stdin="dave-strong-pw\n")[0] == 0
    code, _, err = run("add", "eve", "--password-stdin", stdin="short\n")
    assert code == 1 and "at least 10 characters" in err
    code, out, _ = run("list")
    assert re.search(r"^dave\s+admin\s+set\b", out, re.M), out
    code, _, err = run("remove", "dave")
    assert code == 1 and "last admin" in err
    store = Store(tmp_path / "node.db")
    user = store.get_user("dave")
    actions = [(e["action"], e["client"], e["username"]) for e in store.list_audit()]
    store.close()
    assert user is not None and verify_password(user.password_hash, "dave-strong-pw") and not user.must_change
    assert ("user.add", "shell") == actions[-1][:2] and actions[-1][2].startswith("shell:")
    assert ("user.password.reset", "shell") in [a[:2] for a in actions]


def test_health_shows_slots_and_last_errors(ops_node: ConsoleNode) -> None:
    logging.getLogger("node.test").error("console health test: something broke")
    h = ops_node.client("viewer").get("/api/v1/health").json()
    assert h["receiver"]["up"] is True and h["receiver"]["port"] == ops_node.service.port
    assert h["receiver"]["associations_now"] == 0 and h["spool"]["free_bytes"] > 0
    assert [s["slot"] for s in h["queue"]["slots"]] == ["cpu0"]
    assert h["last_errors"][-1]["message"] == "console health test: something broke"
    assert h["last_errors"][-1]["logger"] == "node.test"
    page = ops_node.client("viewer").get("/")
    assert "console health test: something broke" in page.text and "cpu0" in page.text


@pytest.mark.slow
@needs_dcmtk
@needs_data
def test_metrics_of_a_job_and_its_dispatch(tmp_path: Path) -> None:
    """A real series through a real job: series completed, the try's duration and stage histograms,
    the jobs gauge, and the dispatch attempt to a destination nobody listens on."""
    import yaml

    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{"name": "ct-bones", "match": {"Modality": "CT"}, "profile": "bones",
                                                "destinations": ["pacs"]}]}))
    node = start_console_node(tmp_path / "var", users=("viewer",), quiet_period_s=1, early_start_s=0, rules=str(rules),
                              destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": _free_port()}},
                              dispatch_retry={"max_attempts": 5, "backoff_base_s": 60})
    try:
        before = _metrics(node)
        subprocess.run(["storescu", "-xv", "-aec", "DICOMNODE", "127.0.0.1", str(node.service.port),
                        *map(str, sorted(SERIES.glob("*.dcm")))], check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            jobs = node.store.list_jobs()
            if jobs and jobs[0].state in ("done", "failed") and node.store.dispatch_attempts(job_id=jobs[0].id):
                break
            time.sleep(0.5)
        jobs = node.store.list_jobs()
        assert jobs and jobs[0].state == "done", [(j.state, j.error) for j in jobs]
        after = _metrics(node)

        def grew(name: str, **labels: str) -> float:
            return _get(after, name, **labels) - _get(before, name, **labels)

        assert grew("dicomnode_series_completed_total") == 1
        assert grew("dicomnode_job_tries_total", backend="hu_based", outcome="done") == 1
        assert grew("dicomnode_job_duration_seconds_count", backend="hu_based", outcome="done") == 1
        assert grew("dicomnode_job_duration_seconds_sum", backend="hu_based", outcome="done") > 0
        stages = {dict(labels)["stage"] for name, labels in after if name == "dicomnode_job_stage_duration_seconds_count"}
        assert {"load", "segment"} & stages, stages
        assert _get(after, "dicomnode_jobs", state="done", backend="hu_based") == 1
        assert grew("dicomnode_dispatch_attempts_total", outcome="retry", destination="pacs", kind="dicom") >= 1
        assert _get(after, "dicomnode_dispatches", state="pending", destination="pacs") >= 1
    finally:
        node.service.stop()


def test_spool_bytes_leave_out_series_retention_cleaned(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    _queue_dispatch(store, "pacs")  # one instance of size 1 in a receiving series
    assert store.spool_bytes() == 1
    # the series went done two days ago: with a retention of one day its files are gone
    store.conn.execute("UPDATE series SET state = 'done', state_changed_at = ?", (time.time() - 2 * 86400,))
    assert store.spool_bytes(retention_cutoff=time.time() - 86400) == 0
    assert store.spool_bytes(retention_cutoff=time.time() - 3 * 86400) == 1
    g = store.gauges()
    assert g["jobs"] == [("queued", "hu_based", 1)] and g["dispatches"] == [("pending", "pacs", 1)]
    store.close()


def test_audit_export_streams_page_by_page(tmp_path: Path) -> None:
    """The export reads the log a page (1000 entries) at a time, oldest first, and writes each page as
    it is read: a long audit log is never held whole in the console's memory."""
    import asyncio

    from node.console.context import ConsoleContext
    from node.console.routes_audit import audit_export

    store = Store(tmp_path / "node.db")
    try:
        for k in range(2500):
            store.add_audit("job.retry", username="op", client="10.0.0.9", target=f"job {k}", detail={"k": k})
        reads: list[int] = []
        real = store.list_audit

        def counted(**kw):  # the real query, counted
            page = real(**kw)
            reads.append(len(page))
            return page

        store.list_audit = counted  # type: ignore[method-assign]  # counts the real store's reads
        resp = audit_export(since=None, _p=None, ctx=ConsoleContext(config=NodeConfig(storage=tmp_path), store=store))  # type: ignore[arg-type]  # the route's function, without its login

        async def read_all() -> list[bytes]:
            out: list[bytes] = []
            async for chunk in resp.body_iterator:
                if not out:
                    assert reads == [1000]  # the first line goes out after one page was read
                out.append(chunk if isinstance(chunk, bytes) else str(chunk).encode())
            return out

        lines = asyncio.run(read_all())
        assert [json.loads(line)["detail"]["k"] for line in lines] == list(range(2500))  # oldest first
        assert reads == [1000, 1000, 500, 0]
    finally:
        store.close()


def test_the_console_process_own_errors_are_on_the_health_page(tmp_path: Path) -> None:
    """In its own process the console keeps its own ERROR records (an unhandled request is logged
    there, not in the node); the health report shows them with the node's, in time order."""
    from node import logsafe
    from node.console.context import ConsoleContext
    from node.console.routes_health import health_report

    store = Store(tmp_path / "node.db")
    ctx = ConsoleContext(config=NodeConfig(storage=tmp_path), store=store)
    handler = logsafe.RecentErrors(ctx.own_errors)
    logger = logging.getLogger("test.console.errors")
    logger.addHandler(handler)
    try:
        logger.error("Exception in ASGI application: %s", "boom")
        logger.warning("not an error")
        got = health_report(ctx)["last_errors"]
        assert [(e["logger"], e["message"]) for e in got] == [("test.console.errors", "Exception in ASGI application: boom")]
        for k in range(logsafe.RECENT_ERRORS_KEPT + 5):
            logger.error("error %d", k)
        got = health_report(ctx)["last_errors"]
        assert len(got) == logsafe.RECENT_ERRORS_KEPT and got[-1]["message"] == f"error {logsafe.RECENT_ERRORS_KEPT + 4}"
    finally:
        logger.removeHandler(handler)
        store.close()
