"""Rule administration in the console (node/console/routes_rules.py): every endpoint as each role
and anonymous, apply/rollback/reorder/enable/disable audited and picked up by the running node,
dry runs on a series received over DICOM (DCMTK storescu, the real J2K abdomen from
../shared/data), and the page driven in headless Debian chromium: a typo shown at its line, a dry
run, apply, history and the audit entry."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from console_helpers import ConsoleNode, browser_login, password_of, screenshot, start_console_node

from node.routing.rules import parse_rules, rules_version

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DICOM_NODE_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
SHIPPED = (REPO / "routing_rules.yaml").read_text()
BODY = '{regex: "(?i)bone|skelet|spine|ortho|body|knochen|wirbel"}'

pytestmark = pytest.mark.skipif(not J2K.is_dir() or shutil.which("storescu") is None,
                                reason="needs ../shared/data and DCMTK storescu")


@pytest.fixture(scope="module")
def rules_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConsoleNode, Path, str]]:
    """A node with its console, its own copy of the shipped rules, and the real J2K series received
    (a long quiet period: it stays stored, unrouted, no job runs)."""
    tmp = tmp_path_factory.mktemp("rules-console")
    rules = tmp / "rules.yaml"
    rules.write_text(SHIPPED)
    node = start_console_node(tmp / "var", rules=str(rules), quiet_period_s=3600, early_start_s=0)
    try:
        files = sorted(J2K.glob("*.dcm"))
        r = subprocess.run(["storescu", "-xv", "-aec", "DICOMNODE", "-aet", "CT1", "127.0.0.1",
                            str(node.service.port), *map(str, files)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        assert node.store.get_series(uid) is not None
        yield node, rules, uid
    finally:
        node.service.stop()


def _reset(node: ConsoleNode, rules: Path) -> None:
    """The shipped rules live again (through the admin, so the node reloads them)."""
    r = node.client("admin").post("/api/v1/rules/apply", json={"text": SHIPPED, "comment": "test reset"})
    assert r.status_code == 200, r.text
    assert rules.read_text() == SHIPPED


# --------------------------------------------------------------------------------- roles


def _calls(uid: str, version_id: int) -> list[tuple[str, str, dict[str, Any], str]]:
    """(method, path, json, the lowest role that may) of every JSON endpoint."""
    return [
        ("GET", "/api/v1/rules", {}, "viewer"),
        ("GET", "/api/v1/rules/rule/ct-liver", {}, "viewer"),
        ("POST", "/api/v1/rules/validate", {"text": SHIPPED}, "viewer"),
        ("GET", "/api/v1/rules/history", {}, "viewer"),
        ("GET", f"/api/v1/rules/versions/{version_id}", {}, "viewer"),
        ("GET", f"/api/v1/rules/diff?a={version_id}", {}, "viewer"),
        ("POST", "/api/v1/rules/dry-run", {"series_uids": [uid]}, "operator"),
        ("POST", "/api/v1/rules/apply", {"text": SHIPPED}, "admin"),
        ("POST", f"/api/v1/rules/versions/{version_id}/rollback", {}, "admin"),
        ("POST", "/api/v1/rules/order", {"order": [r.name for r in parse_rules(SHIPPED).rules]}, "admin"),
        ("POST", "/api/v1/rules/rule/ct-liver/move", {"position": 3}, "admin"),
        ("POST", "/api/v1/rules/rule/ct-liver/disable", {}, "admin"),
        ("POST", "/api/v1/rules/rule/ct-liver/enable", {}, "admin"),
    ]


def test_every_endpoint_as_each_role_and_anonymous(rules_node):
    node, rules, uid = rules_node
    _reset(node, rules)
    node.client("admin").post("/api/v1/rules/rule/ct-heart/disable", json={})
    version_id = node.client("admin").get("/api/v1/rules/history").json()["versions"][-1]["id"]
    _reset(node, rules)
    rank = {"viewer": 1, "operator": 2, "admin": 3}
    for method, path, body, least in _calls(uid, version_id):
        assert node.anonymous().request(method, path, json=body).status_code == 401, path
        for role in ("viewer", "operator", "admin"):
            for client in (node.client(role), node.token_client(role, name=f"rules-{role}")):
                r = client.request(method, path, json=body)
                want = 200 if rank[role] >= rank[least] else 403
                assert r.status_code == want, f"{role} {method} {path}: {r.status_code} {r.text[:300]}"
        if method == "POST" and least == "admin":
            _reset(node, rules)
    # a cookie session without its CSRF token changes nothing
    import requests

    bare = requests.Session()
    bare.cookies = node.client("admin").cookies
    r = bare.post(node.url + "/api/v1/rules/rule/ct-liver/disable", json={}, timeout=10)
    assert r.status_code == 403 and rules.read_text() == SHIPPED
    # the upload dry run: operator yes, viewer no
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(J2K.glob("*.dcm"))[:5]]
    assert node.client("viewer").post("/api/v1/rules/dry-run/upload", files=files).status_code == 403
    r = node.client("operator").post("/api/v1/rules/dry-run/upload", files=files, data={"calling_ae": "CT1"})
    assert r.status_code == 200, r.text
    (s,) = r.json()["series"]
    assert s["series_uid"] == uid and s["facts"]["instance_count"] == 5 and s["note"] == "files"
    assert [j["rule"] for j in s["jobs"]] == ["ct-body-bones"]
    # the page's dry-run form with a folder chosen in the browser (multipart, like the API)
    r = node.client("operator").post("/rules/dry-run", files=files, data={"text": SHIPPED, "last": "5"})
    assert r.status_code == 200 and "Dry run of the draft on 1 series" in r.text and "&#39;CT Body 3.0&#39;" in r.text
    assert node.client("viewer").post("/rules/dry-run", files=files, data={"text": SHIPPED}).status_code == 403
    # a rule that is not (or no longer) in the file: said so, never a server error
    r = node.client("viewer").post("/rules/validate", data={"text": "  - name: ghost\n", "rule": "ghost"})
    assert r.status_code == 400 and "no rule named &#39;ghost&#39;" in r.text
    r = node.client("viewer").get("/rules?edit=ct-livr")
    assert r.status_code == 200 and "did you mean &#39;ct-liver&#39;?" in r.text


# ------------------------------------------------------------------------------- changes


def test_apply_invalid_then_valid_rollback_conflict_audited_and_loaded(rules_node):
    node, rules, uid = rules_node
    _reset(node, rules)
    admin = node.client("admin")
    live = admin.get("/api/v1/rules").json()
    assert live["version"] == rules_version(rules) == live["loaded"]["version"]
    assert [r["name"] for r in live["rules"]][-1] == "ct-body-bones"

    typo = SHIPPED.replace("    profile: bones\n", "    profile: bonez\n").replace(
        "      Modality: CT\n      SeriesDescription: " + BODY, "      Modalty: CT\n      SeriesDescription: " + BODY)
    r = admin.post("/api/v1/rules/apply", json={"text": typo})
    assert r.status_code == 422
    issues = r.json()["detail"]["validation"]["issues"]
    lines = typo.splitlines()
    assert [(i["line"], i["column"]) for i in issues if i["severity"] == "error"] == [
        (lines.index("      Modalty: CT") + 1, 7), (lines.index("    profile: bonez") + 1, 14)]
    assert "'Modalty' (did you mean 'Modality'" in issues[0]["message"]
    assert rules.read_text() == SHIPPED

    narrow = SHIPPED.replace(BODY, '{regex: "(?i)bone|skelet|spine"}')
    before = admin.get("/api/v1/rules").json()["version"]
    audits = len(node.store.list_audit(action="rules.apply"))
    r = admin.post("/api/v1/rules/apply", json={"text": narrow, "comment": "no more body", "expected_version": before})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["changed"] and out["previous_version"] == before and rules.read_text() == narrow
    assert node.service.rules is not None and node.service.rules.ruleset.version == rules_version(rules)
    entry = node.store.list_audit(action="rules.apply")[0]
    assert len(node.store.list_audit(action="rules.apply")) == audits + 1
    assert entry["username"] == "admin" and entry["detail"]["comment"] == "no more body"
    assert entry["detail"]["previous_version"] == before and '+      SeriesDescription: {regex: "(?i)bone|skelet|spine"}' \
        in entry["detail"]["diff"]
    # a stale editor: 409, nothing written
    r = admin.post("/api/v1/rules/apply", json={"text": SHIPPED, "expected_version": before})
    assert r.status_code == 409 and rules.read_text() == narrow

    hist = admin.get("/api/v1/rules/history").json()["versions"]
    assert hist[0]["live"] and hist[0]["comment"] == "no more body" and hist[0]["added"] == 1 == hist[0]["removed"]
    target = next(h for h in hist if h["version"] == before)
    r = admin.post(f"/api/v1/rules/versions/{target['id']}/rollback", json={"comment": "back"})
    assert r.status_code == 200 and rules.read_text() == SHIPPED
    assert node.store.list_audit(action="rules.rollback")[0]["detail"]["comment"].endswith(": back")

    # reorder, move, disable, enable: each audited, the node loads each
    names = [x.name for x in parse_rules(SHIPPED).rules]
    r = admin.post("/api/v1/rules/order", json={"order": names[::-1]})
    assert r.status_code == 200 and [x.name for x in parse_rules(rules.read_bytes()).rules] == names[::-1]
    r = admin.post("/api/v1/rules/rule/ct-body-bones/move", json={"position": 8})
    assert r.status_code == 200 and parse_rules(rules.read_bytes()).rules[-1].name == "ct-body-bones"
    r = admin.post("/api/v1/rules/rule/ct-liver/disable", json={"comment": "radiology asked"})
    assert r.status_code == 200 and not next(x for x in parse_rules(rules.read_bytes()).rules if x.name == "ct-liver").enabled
    assert node.service.rules.ruleset.version == rules_version(rules)
    # one rule's text, as GET /api/v1/rules/rule/{name} gives it, edited and applied alone
    one = admin.get("/api/v1/rules/rule/ct-lungs").json()
    assert one["text"].startswith("  - name: ct-lungs\n") and one["version"] == rules_version(rules)
    r = admin.post("/api/v1/rules/apply", json={"rule": "ct-lungs", "text": one["text"].replace("lungs\n", "lungz\n")})
    assert r.status_code == 422
    (err,) = r.json()["detail"]["validation"]["issues"]
    assert err["line"] == one["line"] + 4 and "unknown profile 'lungz'" in err["message"]
    r = admin.post("/api/v1/rules/apply", json={"rule": "ct-lungs", "text": one["text"].replace("[pacs]", "[pacs, origin]"),
                                                "expected_version": one["version"]})
    assert r.status_code == 200 and next(x for x in parse_rules(rules.read_bytes()).rules
                                         if x.name == "ct-lungs").destinations == ("pacs", "origin")
    r = admin.post("/api/v1/rules/rule/ct-livr/enable", json={})
    assert r.status_code == 404 and "did you mean 'ct-liver'" in r.json()["detail"]
    actions = [a["action"] for a in node.store.list_audit(limit=5)]
    assert actions == ["rules.apply", "rules.disable", "rules.reorder", "rules.reorder", "rules.rollback"]
    _reset(node, rules)


def test_dry_run_api_on_the_stored_series_changes_nothing(rules_node):
    node, rules, uid = rules_node
    _reset(node, rules)
    series_before = node.store.get_series(uid)
    jobs_before = node.store.list_jobs(series_uid=uid)
    draft = SHIPPED.replace(BODY, '{regex: "(?i)bone|skelet|spine"}')
    r = node.client("operator").post("/api/v1/rules/dry-run", json={"text": draft, "series_uids": [uid, "1.2.404"]})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["errors"] == ["1.2.404: not in the node's store"]
    (s,) = res["series"]
    body = next(x for x in s["rules"] if x["rule"] == "ct-body-bones")
    assert [(c["field"], c["actual"], c["matched"]) for c in body["conditions"]] == [
        ("Modality", "'CT'", True), ("SeriesDescription", "'CT Body 3.0'", False)]
    assert s["jobs"] == [] and s["unrouted"] and s["differs"]
    assert [(j["rule"], j["profile"], j["backend"], j["targets"]) for j in s["live_jobs"]] == [
        ("ct-body-bones", "bones", "hu_based", ["pacs: ORTHANC@127.0.0.1:4242"])]
    r = node.client("operator").post("/api/v1/rules/dry-run", json={"last": 1})
    assert r.status_code == 200 and [x["series_uid"] for x in r.json()["series"]] == [uid]
    r = node.client("operator").post("/api/v1/rules/dry-run", json={"text": "rules:\n  - name: x\n", "last": 1})
    assert r.status_code == 422 and r.json()["detail"]["validation"]["issues"][0]["line"] == 2
    assert node.store.get_series(uid) == series_before and node.store.list_jobs(series_uid=uid) == jobs_before
    assert rules.read_text() == SHIPPED


# ------------------------------------------------------------------------------ browser


def test_rules_page_in_chromium(rules_node, browser):
    node, rules, uid = rules_node
    _reset(node, rules)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        browser_login(page, node.url, "admin", password_of("admin"))
        page.goto(node.url + "/rules")
        assert page.locator("#rules-table tbody tr").count() == 8
        screenshot(page, "rules")

        # edit one rule with a typo: the error is shown at its line, nothing applied
        page.click("tr[data-rule='ct-body-bones'] a:text('edit')")
        text = page.input_value("#rules-text")
        assert text.startswith("  - name: ct-body-bones\n")
        first = SHIPPED.splitlines().index("  - name: ct-body-bones") + 1
        page.fill("#rules-text", text.replace("profile: bones", "profile: bonez"))
        page.click("#btn-validate")
        page.wait_for_selector(".issue.error")
        issue = page.locator(".issue.error")
        assert issue.count() == 1
        assert issue.get_attribute("data-line") == str(first + 4)
        assert "unknown profile 'bonez' (did you mean 'bones'?)" in issue.inner_text()
        assert page.locator(f"#line-{first + 4}.bad").inner_text().endswith("profile: bonez")
        issue.click()  # puts the cursor on the issue's line of the text area (static/console.js: no inline scripts)
        cursor = page.evaluate("document.getElementById('rules-text').selectionStart")
        assert page.input_value("#rules-text")[:cursor].count("\n") == 4
        screenshot(page, "rules-typo")
        page.click("#btn-apply")
        page.wait_for_selector(".flash.error")
        assert "Not applied: 1 error(s)" in page.inner_text(".flash.error") and rules.read_text() == SHIPPED

        # fix it, narrow the rule, dry-run it against the stored series
        page.fill("#rules-text", text.replace(BODY, '{regex: "(?i)bone|skelet|spine"}'))
        page.fill("#dry-uids", uid)
        page.click("#btn-dry-run")
        page.wait_for_selector("#dry-run")
        dry = page.locator("#dry-run")
        assert "'CT Body 3.0'" in dry.inner_text() and "UNROUTED" in dry.inner_text()
        assert "Live rules: different" in dry.inner_text()
        screenshot(page, "rules-dry-run")

        # apply it: the live file changes, history and the audit log show it
        page.fill("input[name=comment]", "body series no longer get bones")
        page.click("#btn-apply")
        page.wait_for_selector(".flash.ok")
        assert "Applied version" in page.inner_text(".flash.ok")
        assert rules.read_text() == SHIPPED.replace(BODY, '{regex: "(?i)bone|skelet|spine"}')
        row = page.locator("#history tbody tr").first
        assert "body series no longer get bones" in row.inner_text() and "admin" in row.inner_text()
        assert "(?i)bone|skelet|spine" in page.locator("#history pre.diff").first.inner_text()
        screenshot(page, "rules-history")
        entry = node.store.list_audit(action="rules.apply")[0]
        assert entry["username"] == "admin" and entry["detail"]["comment"] == "body series no longer get bones"
        if page.goto(node.url + "/audit").status == 200:  # the audit page (console-core's)
            assert "rules.apply" in page.inner_text("main")
            screenshot(page, "rules-audit")

        # disable from the table
        page.goto(node.url + "/rules")
        page.click("tr[data-rule='ct-heart'] button:text('disable')")
        page.wait_for_selector("tr[data-rule='ct-heart'] button:text('enable')")
        assert "disabled" in page.inner_text("tr[data-rule='ct-heart']")

        # a viewer sees the rules but cannot change them
        viewer = browser.new_page()
        browser_login(viewer, node.url, "viewer", password_of("viewer"))
        viewer.goto(node.url + "/rules")
        assert viewer.locator("#btn-apply").count() == 0 and viewer.locator("#btn-dry-run").count() == 0
        assert viewer.locator("#btn-validate").count() == 1
        resp = viewer.request.post(node.url + "/rules/apply", form={"text": SHIPPED})
        assert resp.status == 403
        screenshot(viewer, "rules-viewer")
        viewer.close()
    finally:
        page.close()
        _reset(node, rules)


def test_a_broken_hand_edit_is_shown_and_the_node_keeps_its_rules(rules_node):
    node, rules, _uid = rules_node
    _reset(node, rules)
    loaded = rules_version(rules)
    rules.write_text(SHIPPED.replace("    profile: liver\n", "    profile: livr\n", 1))  # edited by hand
    assert node.service.rules is not None
    node.service.reload_rules()  # what the 2 s rules-reload tick does
    live = node.client("viewer").get("/api/v1/rules").json()
    assert live["version"] == rules_version(rules) != loaded and live["loaded"]["version"] == loaded
    assert "keeping version" in live["loaded"]["error"] and live["recorded"] is None
    (err,) = live["validation"]["issues"][:1]
    assert err["line"] == SHIPPED.splitlines().index("    profile: liver") + 1 and "'livr'" in err["message"]
    page = node.client("viewer").get("/rules")
    assert page.status_code == 200 and "The live file has errors" in page.text
    # the next change through the console records the hand edit first, then fixes it
    r = node.client("admin").post("/api/v1/rules/apply", json={"text": SHIPPED, "comment": "fix livr"})
    assert r.status_code == 200
    found, applied = node.store.rule_versions(2)[::-1]
    assert found.action == "found" and "profile: livr" in found.text and applied.comment == "fix livr"
    assert node.service.rules.ruleset.version == rules_version(rules) == loaded
