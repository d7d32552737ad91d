"""The console's series, jobs and quarantine (node/console/routes_series.py, routes_jobs.py,
routes_quarantine.py) on a real node: series sent with DCMTK storescu, refused instances sent raw
with pynetdicom; every endpoint as viewer, operator and anonymous; every change in the audit log;
and the pages in headless Debian chromium (screenshots in tests/.artifacts/console/)."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from console_helpers import ConsoleNode, browser_login, password_of, screenshot, start_console_node

from test_node_flow import J2K, STORESCU, ct_files, ct_series_uid, mr_series, wait_for
from test_qc import SMALL_CT
from test_operations import PUBLISHED, send_as_published

pytestmark = [
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found: {J2K}"),
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu not installed"),
]

RULES = """
rules:
  - name: body-liver
    match: {Modality: CT, SeriesDescription: {regex: "(?i)body"}}
    profile: liver
    share: false
  - name: knee-liver
    match: {SeriesDescription: {regex: "never matches"}}
    profile: liver
    share: false
"""


def storescu(port: int, files: list[Path]) -> None:
    import subprocess

    r = subprocess.run([STORESCU, "-xv", "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def jnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    tmp = tmp_path_factory.mktemp("console-jobs")
    (tmp / "rules.yaml").write_text(RULES)
    node = start_console_node(tmp / "var", rules=tmp / "rules.yaml", quiet_period_s=2,
                              job_retry={"max_attempts": 2, "backoff_base_s": 1, "backoff_max_s": 2})
    try:
        yield node
    finally:
        node.service.stop()


def _port(node: ConsoleNode) -> int:
    rx = node.service.receiver
    assert rx is not None
    return int(rx.port)


def _job(node: ConsoleNode, job_id: int) -> dict[str, Any]:
    r = node.client("viewer").get(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _finished(node: ConsoleNode, job_id: int, timeout: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (lambda j: j if j["state"] in ("done", "failed") else None)(_job(node, job_id)), timeout,
                    f"job {job_id} to finish")


@pytest.fixture(scope="module")
def ct_job(jnode: ConsoleNode) -> dict[str, Any]:
    """The J2K CT sent with storescu, its job done."""
    storescu(_port(jnode), ct_files())
    uid = ct_series_uid()
    viewer = jnode.client("viewer")
    first = wait_for(lambda: viewer.get("/api/v1/jobs", params={"series": uid}).json()["items"], 90, "the CT job")
    job = _finished(jnode, first[0]["id"])
    assert job["state"] == "done", job["error"]
    return job


def test_lists_filters_and_pages(jnode: ConsoleNode, ct_job: dict[str, Any]) -> None:
    viewer = jnode.client("viewer")
    items = viewer.get("/api/v1/jobs", params={"q": "anon0001"}).json()["items"]  # the series' PatientID, any case
    assert ct_job["id"] in [j["id"] for j in items]
    row = next(j for j in items if j["id"] == ct_job["id"])
    assert row["patient_id"] == "ANON0001" and row["rule"] == "body-liver" and row["calling_ae"] == "SCANNER"
    for params in ({"state": "done"}, {"rule": "body-liver"}, {"profile": "liver"}, {"calling_ae": "SCANNER"},
                   {"since": time.strftime("%Y-%m-%d"), "until": time.strftime("%Y-%m-%d")}):
        assert ct_job["id"] in [j["id"] for j in viewer.get("/api/v1/jobs", params=params).json()["items"]], params
    for params in ({"state": "failed"}, {"rule": "knee-liver"}, {"calling_ae": "OTHER"}, {"q": "nobody"},
                   {"until": "2000-01-01"}):
        assert ct_job["id"] not in [j["id"] for j in viewer.get("/api/v1/jobs", params=params).json()["items"]], params
    assert viewer.get("/api/v1/jobs", params={"state": "bogus"}).status_code == 422
    assert viewer.get("/api/v1/jobs", params={"since": "yesterday"}).status_code == 422
    series = viewer.get("/api/v1/series", params={"q": "ANON"}).json()["items"]
    assert [s["series_uid"] for s in series] == [ct_series_uid()]
    assert series[0]["jobs"][0]["id"] == ct_job["id"] and series[0]["instances"] == 20
    one = viewer.get(f"/api/v1/series/{ct_series_uid()}").json()
    assert "body-liver" in one["rules"] and "bones" in one["profiles"] and one["jobs"][0]["id"] == ct_job["id"]
    assert viewer.get("/api/v1/series/1.2.3.4").status_code == 404
    # pages: one job a page, every job once, newest first
    seen, after = [], None
    while True:
        page = viewer.get("/api/v1/jobs", params={"limit": 1, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == sorted(seen, reverse=True) and ct_job["id"] in seen
    # the HTML pages
    for path in ("/jobs", f"/jobs/{ct_job['id']}", "/series", f"/series/{ct_series_uid()}", "/quarantine",
                 "/jobs?state=done&q=anon"):
        r = viewer.get(path)
        assert r.status_code == 200 and "<h1>" in r.text, path


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_job_detail_and_qc_pictures(jnode: ConsoleNode, ct_job: dict[str, Any]) -> None:
    job = ct_job
    assert {"load", "segment", "seg", "mesh", "qc", "total"} <= set(job["report"]["timings_s"])
    assert set(job["report"]["tissues"]) == {"tissue", "vessels"}
    planes = {(q["tissue"], q["plane"] or q["kind"]) for q in job["qc"]}
    assert {("tissue", "axial"), ("tissue", "coronal"), ("tissue", "sagittal"), ("tissue", "mesh")} <= planes
    viewer, anon = jnode.client("viewer"), jnode.anonymous()
    for q in job["qc"]:
        r = viewer.get(q["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", q
        assert _png_size(r.content) == (q["width"], q["height"])
        assert anon.get(q["url"]).status_code == 401
    assert viewer.get(f"/api/v1/jobs/{job['id']}/qc/..%2Freport.json").status_code == 404
    assert viewer.get(f"/api/v1/jobs/{job['id']}/qc/report.json").status_code == 404
    assert job["can_retry"] and not job["can_cancel"] and job["attempts"] == 1


def test_actions_by_role_and_audit(jnode: ConsoleNode, ct_job: dict[str, Any], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    viewer, operator = jnode.client("viewer"), jnode.client("operator")
    uid = ct_series_uid()
    jid = ct_job["id"]
    # a viewer reads only
    for path, body in ((f"/api/v1/jobs/{jid}/retry", None), (f"/api/v1/jobs/{jid}/cancel", None),
                       (f"/api/v1/series/{uid}/rerun", {"profile": "bones"}), (f"/api/v1/series/{uid}/route", {"rule": "x"}),
                       ("/api/v1/quarantine/x.dcm/release", None), ("/api/v1/quarantine/x.dcm/delete", None)):
        assert viewer.post(path, json=body).status_code == 403, path
    assert operator.post(f"/api/v1/jobs/{jid}/cancel").status_code == 409  # done: nothing to cancel
    assert operator.post("/api/v1/jobs/999999/retry").status_code == 404
    # re-run with another profile, and cancel it while it is queued or running; retry it to done
    assert operator.post(f"/api/v1/series/{uid}/rerun", json={"profile": "bonez"}).status_code == 409
    r = operator.post(f"/api/v1/series/{uid}/rerun", json={"profile": "bones"})
    assert r.status_code == 200, r.text
    rerun_id = r.json()["job_id"]
    r = operator.post(f"/api/v1/jobs/{rerun_id}/cancel")
    assert r.status_code == 200, r.text
    j = _job(jnode, rerun_id)
    assert j["state"] == "failed" and j["error"] == "cancelled by operator"
    assert operator.post(f"/api/v1/jobs/{rerun_id}/retry").status_code == 200
    j = _finished(jnode, rerun_id)
    assert j["state"] == "done" and j["profile"] == "bones" and j["qc"], j["error"]
    # an unrouted series routed now with a chosen rule: its job fails (an MR for a CT profile)
    files, mr_uid = mr_series(tmp_path / "mr", "MR knee")
    storescu(_port(jnode), files)
    wait_for(lambda: viewer.get(f"/api/v1/series/{mr_uid}").status_code == 200
             and viewer.get(f"/api/v1/series/{mr_uid}").json()["state"] == "unrouted", 60, "the MR series unrouted")
    assert operator.post(f"/api/v1/series/{mr_uid}/route", json={}).status_code == 409  # no rule chosen
    r = operator.post(f"/api/v1/series/{mr_uid}/route", json={"rule": "knee-liver"})
    assert r.status_code == 200, r.text
    failed = _finished(jnode, r.json()["job_id"])
    assert failed["state"] == "failed" and "bad input" in failed["error"]
    assert operator.post(f"/api/v1/series/{mr_uid}/route", json={"rule": "knee-liver"}).status_code == 409  # routed
    # the quarantine: refused instances listed with the reason; release refused, delete
    assert send_as_published(_port(jnode), sorted(PUBLISHED.iterdir())[:2], monkeypatch) == [0xA900] * 2
    items = viewer.get("/api/v1/quarantine").json()["items"]
    assert len(items) == 2 and all("missing or empty" in e["reason"] for e in items)
    r = operator.post(f"/api/v1/quarantine/{items[0]['name']}/release")
    assert r.status_code == 409 and "missing or empty" in r.json()["detail"]
    assert operator.post(f"/api/v1/quarantine/{items[0]['name']}/delete").json()["ok"]
    assert [e["name"] for e in viewer.get("/api/v1/quarantine").json()["items"]] == [items[1]["name"]]
    assert operator.post("/api/v1/quarantine/..%2Fnode.db/delete").status_code == 404
    # every change in the audit log, by whom
    audit = jnode.store.list_audit(limit=100, username="operator")
    actions = [(a["action"], a["detail"]["ok"]) for a in audit if a["action"].split(".")[0] in ("job", "series",
                                                                                                "quarantine")]
    for want in (("job.cancel", True), ("job.retry", True), ("series.rerun", True), ("series.rerun", False),
                 ("series.route", True), ("quarantine.release", False), ("quarantine.delete", True)):
        assert want in actions, (want, actions)
    assert all(a["client"] == "127.0.0.1" for a in audit)


def test_pages_in_a_browser(jnode: ConsoleNode, ct_job: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    """A series sent with storescu reaches done with its QC pictures on the job page; a failed job is
    retried from its page; a viewer sees no buttons."""
    from node.tools.synth_series import write_series

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    browser_login(page, jnode.url, "operator", password_of("operator"))
    # a series sent now (the real trunk CT written as a DICOM series), watched on the pages until done
    files = write_series(SMALL_CT, tmp_path / "trunk", series_description="CT Body trunk")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    storescu(_port(jnode), files)

    def job_link() -> str | None:
        page.goto(jnode.url + f"/jobs?series={uid}")
        links = page.locator("table.list a[href^='/jobs/']")
        return links.first.get_attribute("href") if links.count() else None

    href = wait_for(job_link, 90, "the new job in the list", interval=1.0)
    screenshot(page, "jobs-list")
    page.goto(jnode.url + str(href))

    def done_on_page() -> bool:
        page.reload()
        state = page.locator("#job-state").inner_text()
        assert not state.startswith("failed"), page.locator("#job-error").inner_text()
        return state.startswith("done")

    wait_for(done_on_page, 180, "the job page to say done", interval=2.0)
    job = _job(jnode, int(str(href).rsplit("/", 1)[1]))
    imgs = page.locator("#qc img")
    assert imgs.count() == len(job["qc"]) >= 4
    page.wait_for_function("() => [...document.querySelectorAll('#qc img')].every(i => i.complete && i.naturalWidth > 0)")
    page.locator("#qc").scroll_into_view_if_needed()
    screenshot(page, "job-done-qc")
    # a failed job (an MR routed to a CT profile), retried from its page
    files, mr_uid = mr_series(tmp_path / "mr2", "MR elbow")
    storescu(_port(jnode), files)
    viewer = jnode.client("viewer")
    wait_for(lambda: viewer.get(f"/api/v1/series/{mr_uid}").status_code == 200
             and viewer.get(f"/api/v1/series/{mr_uid}").json()["state"] == "unrouted", 60, "unrouted")
    page.goto(jnode.url + f"/series/{mr_uid}")
    page.select_option("#route-rule", "knee-liver")
    screenshot(page, "series-unrouted")
    page.click("#route")
    page.wait_for_url("**/jobs/*")
    job_id = int(page.url.split("/jobs/")[1].split("?")[0])
    _finished(jnode, job_id)
    page.reload()
    assert page.locator("#job-state").inner_text() == "failed"
    assert "bad input" in page.locator("#job-error").inner_text()
    screenshot(page, "job-failed")
    page.click("#retry")
    page.wait_for_load_state()
    assert "re-queued" in page.locator(".flash").inner_text()
    screenshot(page, "job-retried")
    assert _finished(jnode, job_id)["attempts"] == 1  # ran again from fresh attempts (and failed again)
    page.goto(jnode.url + "/series")
    screenshot(page, "series-list")
    page.goto(jnode.url + "/quarantine")
    screenshot(page, "quarantine")
    page.close()
    # a viewer: no buttons
    vpage = browser.new_page()
    browser_login(vpage, jnode.url, "viewer", password_of("viewer"))
    vpage.goto(jnode.url + f"/jobs/{job_id}")
    assert vpage.locator("#retry").count() == 0 and vpage.locator("form[action$='/retry']").count() == 0
    vpage.goto(jnode.url + f"/series/{mr_uid}")
    assert vpage.locator("#rerun").count() == 0
    vpage.close()
