"""The console attacked as a hostile user and as a curious viewer would (issue 15, Security), on a real
node over real HTTP, and in headless Debian chromium where a browser matters: security headers and a
strict Content-Security-Policy under which every page still works, stored HTML in patient data and
names not run, request bodies capped, YAML bombs refused, login timing, sessions, open redirects,
TLS cookies, and the receiver answering while the console is flooded."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest
import requests
import urllib3
from console_helpers import ConsoleNode, browser_login, login, password_of, screenshot, start_console_node

from node.console.app import walk_routes
from node.console.auth import is_api_path
from node.store import InstanceRecord

MAX_BODY_BYTES = 4 << 20  # node/console/app.py (not imported: the test must run on a console without it)

HOSTILE = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
ECHOSCU = "/usr/bin/echoscu"


@pytest.fixture(scope="module")
def snode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    # a wide login window but a high failure limit: the timing test fails logins on purpose
    tmp = tmp_path_factory.mktemp("console-sec")
    rules = tmp / "rules.yaml"  # its own copy: the tests apply rule changes
    rules.write_text((Path(__file__).resolve().parents[1] / "routing_rules.yaml").read_text())
    node = start_console_node(tmp / "var", rules=rules, http={"login_max_failures": 1000})
    try:
        yield node
    finally:
        node.service.stop()


def _raw(node: ConsoleNode, head: bytes, body_chunks: list[bytes] = []) -> str:  # noqa: B006 - never mutated
    """Send a hand-made HTTP request (headers a client library would not send) and read the answer."""
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:
            pass  # the server answered and closed before the whole body was sent: read that answer
        data = b""
        while True:
            try:
                got = s.recv(65536)
            except OSError:
                break
            if not got:
                break
            data += got
    return data.decode("latin-1")


def _pages(node: ConsoleNode) -> list[str]:
    """Every HTML page without a path parameter (the JSON API and /metrics excepted)."""
    return [r.path for r in walk_routes(node.service.console.app)
            if r.method == "GET" and not is_api_path(r.path) and "{" not in r.path and r.role is not None]


# ---------------------------------------------------------------------------- headers and CSP
def test_security_headers_on_every_kind_of_answer(snode: ConsoleNode) -> None:
    admin, anon = snode.client("admin"), snode.anonymous()
    answers = {"page": admin.get("/rules"), "api": admin.get("/api/v1/rules"), "login": anon.get("/login"),
               "static": anon.get("/static/console.css"), "404": admin.get("/nothing-here"),
               "401": anon.get("/api/v1/health"), "healthz": anon.get("/healthz")}
    for what, r in answers.items():
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, (what, r.headers)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert r.headers.get("x-frame-options") == "DENY", what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("referrer-policy") in ("same-origin", "no-referrer"), what
        if what != "static":  # pages and API answers hold patient data: not kept by the browser
            assert r.headers.get("cache-control") == "no-store", (what, r.headers.get("cache-control"))
    assert "strict-transport-security" not in answers["page"].headers  # plain HTTP: only under TLS


def test_pages_need_no_inline_code_and_load_nothing_from_outside(snode: ConsoleNode) -> None:
    """What the CSP would refuse, found in the HTML itself: inline scripts, style attributes, on*=
    handlers, javascript: URLs, anything loaded from another host."""
    admin = snode.client("admin")
    pages = _pages(snode)
    assert "/rules" in pages and "/" in pages
    for path in pages + ["/login"]:
        html = (admin if path != "/login" else snode.anonymous()).get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline <script> on {path}"
        assert not re.search(r"\sstyle=", html), f"style attribute on {path}"
        assert not re.search(r"\son[a-z]+=", html), f"event handler attribute on {path}"
        assert "javascript:" not in html, path
        assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", html), f"external URL on {path}"


def test_every_page_works_under_the_csp_in_chromium(snode: ConsoleNode, browser: Any) -> None:
    """Every page as admin with no CSP violation and no request leaving the node; the rules page's
    script (a file under /static now) still puts the cursor on an issue's line."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{page.url}: {m.text}")
            if m.type == "error" and ("Content Security Policy" in m.text or "Refused" in m.text) else None)
    page.on("request", lambda r: problems.append(f"request out: {r.url}")
            if not r.url.startswith((snode.url, "data:")) else None)
    browser_login(page, snode.url, "admin", password_of("admin"))
    paths = _pages(snode)
    for path in paths:
        page.goto(snode.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("() => typeof window.htmx") == "object", f"htmx did not load on {path}"
    page.goto(snode.url + "/rules")
    page.fill("#rules-text", "rules:\n  - name: a\n    match: {Modality: CT}\n    profile: bonez\n")
    page.click("#btn-validate")
    page.wait_for_selector(".issue.error")
    page.locator(".issue.error").first.click()
    # line 4 of the text starts after the first three lines (9 + 13 + 27 characters and their newlines)
    assert page.evaluate("() => document.getElementById('rules-text').selectionStart") >= 9 + 13 + 27 + 3
    screenshot(page, "security-rules-csp")
    assert not problems, problems


# ---------------------------------------------------------------------------- stored / reflected HTML
def test_hostile_text_is_shown_not_run(snode: ConsoleNode, browser: Any, tmp_path: Path) -> None:
    """HTML in a PatientName and SeriesDescription (sent with storescu), a calling AE title, a rule's
    comment in the history, a login name echoed on the login page and the quarantine page's message:
    shown as text, never run (autoescape; the CSP would stop it too)."""
    storescu = Path("/usr/bin/storescu")
    if not storescu.exists():
        pytest.skip("DCMTK storescu not installed")
    import numpy as np
    import pydicom

    from node.tools.synth_series import write_series

    vol = np.full((4, 32, 32), -1000, dtype=np.int16)
    vol[:, 8:24, 8:24] = 40
    files = write_series(vol, tmp_path / "hostile", series_description="CT " + HOSTILE[:40])
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName = HOSTILE
        ds.save_as(f)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    port = snode.service.receiver.port  # type: ignore[union-attr]  # started node
    r = subprocess.run([str(storescu), "-aec", snode.config.ae_title, "-aet", "<b>AE</b>", "127.0.0.1",
                        str(port), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    admin = snode.client("admin")
    deadline = time.monotonic() + 30
    while admin.get(f"/api/v1/series/{uid}").status_code != 200:
        assert time.monotonic() < deadline, "the hostile series was not recorded"
        time.sleep(0.5)
    live = admin.get("/api/v1/rules").json()
    applied = admin.post("/api/v1/rules/apply", json={"text": live["text"] + "\n", "comment": HOSTILE,
                                                      "expected_version": live["version"]})
    assert applied.status_code == 200, applied.text

    page = browser.new_page()
    ran: list[str] = []

    def on_dialog(d: Any) -> None:
        ran.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(snode.url + "/login")
    page.fill("input[name=username]", HOSTILE)
    page.fill("input[name=password]", "wrong-password-1")
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert page.evaluate("() => window.__xss") is None
    browser_login(page, snode.url, "admin", password_of("admin"))
    for path, shown in [(f"/series/{uid}", HOSTILE), ("/series", HOSTILE), ("/rules", HOSTILE)]:
        page.goto(snode.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("() => window.__xss") is None, f"script ran on {path}"
        assert shown in page.locator("main").inner_text(), f"the text is not shown as written on {path}"
        assert page.locator("main script:not([src^='/static/']), main img[src=x]").count() == 0, path
    assert "<b>AE</b>" in admin.get(f"/series/{uid}").text.replace("&lt;", "<").replace("&gt;", ">")
    assert "<b>AE</b>" not in admin.get(f"/series/{uid}").text
    metrics = admin.get("/metrics").text  # no UIDs, names or AE titles in the labels
    assert uid not in metrics and "script" not in metrics and "AE</b>" not in metrics
    assert not ran


# ---------------------------------------------------------------------------- messages after actions
SPOOF = "Rule applied: all series now go to evil-pacs"


def test_links_cannot_put_messages_on_pages(snode: ConsoleNode) -> None:
    """A crafted link (``?msg=``, ``?flash=``, ``?error=``) shows no text of its own on a real page; a
    real action's message reaches the next page once, in a signed session-bound cookie, and only there."""
    uid = f"1.2.826.0.1.3680043.8.498.{time.time_ns()}"  # a series and a job, so their pages exist
    snode.store.record_instance(InstanceRecord(
        sop_instance_uid=uid + ".1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=uid, study_uid=uid + ".9",
        path="/nonexistent.dcm", transfer_syntax="1.2.840.10008.1.2.1", size=1, calling_ae="MODALITY",
        called_ae="DICOMNODE", peer_address="127.0.0.1", tags={}))
    job_id, _ = snode.store.create_job(uid, "r", profile="bones", backend="hu_based", rules_version="v", generation=1)
    spoofs = [f"/jobs/{job_id}?msg={quote(SPOOF)}&ok=1", f"/quarantine?msg={quote(SPOOF)}&ok=1",
              f"/series/{uid}?msg={quote(SPOOF)}&ok=1", f"/destinations?flash={quote(SPOOF)}&kind=ok",
              f"/rules?flash={quote(SPOOF)}", f"/rules?error={quote(SPOOF)}", "/?changed=password"]
    operator = snode.client("operator")
    for path in spoofs:
        r = operator.get(snode.url + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert SPOOF not in r.text and "Password changed" not in r.text, path
        assert 'class="flash ok"' not in r.text, path
    # a real action: the redirect names no message, the cookie carries it, the next page shows it once
    r = operator.post(snode.url + "/destinations/pacs/pause", allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/destinations", r.headers
    set_cookie = r.headers["set-cookie"].lower()
    assert "dn_flash=" in set_cookie and "httponly" in set_cookie and "samesite=strict" in set_cookie, set_cookie
    stolen = r.cookies["dn_flash"]
    page = operator.get(snode.url + "/destinations", timeout=10)
    assert "Dispatch to pacs paused." in page.text and 'class="flash ok"' in page.text
    assert "Dispatch to pacs paused." not in operator.get(snode.url + "/destinations", timeout=10).text  # shown once
    # the cookie is bound to the session: another user's session (or a forged value) shows nothing
    viewer = snode.client("viewer")
    for value in (stolen, stolen[:-2] + ("AA" if not stolen.endswith("AA") else "BB")):
        viewer.cookies.set("dn_flash", value)
        assert "Dispatch to pacs paused." not in viewer.get(snode.url + "/destinations", timeout=10).text
    # an error outcome shows red, and a form page (rules) shows its message the same way
    admin = snode.client("admin")
    r = admin.post(snode.url + "/rules/rule/anything/move", data={"position": "x"}, allow_redirects=True, timeout=10)
    assert r.url == snode.url + "/rules", (r.status_code, r.text[-600:])
    assert "position must be a number" in r.text and 'class="flash error"' in r.text
    r = operator.post(snode.url + "/destinations/pacs/resume", allow_redirects=True, timeout=10)
    assert r.url == snode.url + "/destinations" and "Dispatch to pacs resumed." in r.text


# ---------------------------------------------------------------------------- bodies and YAML
def test_request_bodies_are_capped(snode: ConsoleNode) -> None:
    """A declared huge body is refused before it is read; a chunked one (no length) when it passes the cap."""
    viewer = snode.client("viewer")
    cookie = "; ".join(f"{c.name}={c.value}" for c in viewer.cookies)
    csrf = str(viewer.headers["X-CSRF-Token"])
    head = (f"POST /api/v1/rules/validate HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nX-CSRF-Token: {csrf}\r\n"
            "Content-Type: application/json\r\n")
    answer = _raw(snode, (head + f"Content-Length: {10**10}\r\nConnection: close\r\n\r\n").encode())
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    chunk = b"x" * (256 << 10)
    chunks = [b'{"text": "'] + [chunk] * (MAX_BODY_BYTES // len(chunk) + 2)
    body = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]
    answer = _raw(snode, (head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode(), body)
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    assert snode.client("viewer").get("/api/v1/session").status_code == 200  # the console still answers


def test_yaml_bombs_are_issues_not_errors(snode: ConsoleNode) -> None:
    viewer = snode.client("viewer")
    deep = "rules: " + "[" * 5000 + "]" * 5000 + "\n"
    laughs = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    for text, says in [(deep, "nested deeper than"), (laughs + "rules: *i\n", "aliases are expanded")]:
        r = viewer.post("/api/v1/rules/validate", json={"text": text})
        assert r.status_code == 200, r.text[:300]
        issues = r.json()["issues"]
        assert r.json()["ok"] is False and any(says in i["message"] for i in issues), issues
    admin = snode.client("admin")
    live = admin.get("/api/v1/rules").json()
    r = admin.post("/api/v1/rules/apply", json={"text": deep, "expected_version": live["version"]})
    assert r.status_code == 422, r.text[:300]  # nothing applied
    assert admin.get("/api/v1/rules").json()["version"] == live["version"]


# ---------------------------------------------------------------------------- login and sessions
def _failed_login(node: ConsoleNode, username: str) -> None:
    s = requests.Session()
    token = re.search(r'name="csrf_token" value="([^"]+)"', s.get(node.url + "/login", timeout=10).text)
    assert token
    r = s.post(node.url + "/login", data={"username": username, "password": "not-the-password-1",
                                          "csrf_token": token.group(1)}, allow_redirects=False, timeout=30)
    assert r.status_code == 401, r.status_code


def test_unknown_user_costs_the_same_password_check_as_a_known_one(snode: ConsoleNode,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing must not tell which user names exist: an unknown name costs one argon2 verification
    against a hash made with the same parameters as the users' (before: none, ~2 ms against ~100+ ms).
    Counted, not timed (speed figures belong in bench/)."""
    from argon2 import extract_parameters

    from node.console import auth

    verified: list[str] = []
    real = auth._hasher

    class CountingHasher:  # PasswordHasher has slots: wrap it, counting what is verified
        def verify(self, password_hash: str, password: str) -> bool:
            verified.append(password_hash)
            return bool(real.verify(password_hash, password))

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(auth, "_hasher", CountingHasher())
    _failed_login(snode, "viewer")
    _failed_login(snode, "nobody-at-all")
    assert len(verified) == 2, verified
    known = snode.store.get_user("viewer")
    assert known is not None and verified[0] == known.password_hash
    assert extract_parameters(verified[1]) == extract_parameters(known.password_hash)


def test_logging_in_again_ends_the_old_session(snode: ConsoleNode) -> None:
    s = login(snode.url, "viewer", password_of("viewer"))
    old = s.cookies.get("dn_session")
    page = s.get(snode.url + "/login", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    r = s.post(snode.url + "/login", data={"username": "operator", "password": password_of("operator"),
                                           "csrf_token": token.group(1)}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and s.cookies.get("dn_session") != old
    stale = requests.get(snode.url + "/api/v1/session", cookies={"dn_session": str(old)}, timeout=10)
    assert stale.status_code == 401


@pytest.mark.parametrize("target", ["//evil.example", "/\\evil.example", "https://evil.example", "/\t/evil.example",
                                    "javascript:alert(1)", "/x\r\nSet-Cookie: a=b", "\\\\evil.example"])
def test_login_next_never_leaves_the_site(snode: ConsoleNode, target: str) -> None:
    s = requests.Session()
    page = s.get(snode.url + "/login", params={"next": target}, timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    r = s.post(snode.url + "/login", data={"username": "viewer", "password": password_of("viewer"),
                                           "csrf_token": token.group(1), "next": target},
               allow_redirects=False, timeout=10)
    location = r.headers["location"]
    assert r.status_code == 303 and location.startswith("/") and not location.startswith(("//", "/\\")), location
    assert "\r" not in location and "\n" not in location and "\t" not in location
    assert "a=b" not in r.headers.get("set-cookie", "")


def test_tls_cookies_are_secure(tmp_path: Path) -> None:
    """Served over HTTPS (a certificate made with openssl here): the session and login cookies are
    Secure, and HSTS is sent."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    node = start_console_node(tmp_path / "var", users=("viewer",), http={"certificate": cert, "key": key})
    try:
        assert node.url.startswith("https://")
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify=False
        s.verify = False  # a self-signed certificate; what is checked here is the cookies
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        page = s.get(node.url + "/login", timeout=10)
        assert "secure" in page.headers["set-cookie"].lower()
        assert page.headers.get("strict-transport-security", "").startswith("max-age=")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token
        r = s.post(node.url + "/login", data={"username": "viewer", "password": password_of("viewer"),
                                              "csrf_token": token.group(1)}, allow_redirects=False, timeout=10)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "dn_session=" in cookie and "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    finally:
        node.service.stop()


# ---------------------------------------------------------------------------- the receiver under a flood
def test_receiver_answers_while_the_console_is_flooded(snode: ConsoleNode, tmp_path: Path) -> None:
    """200 concurrent connections held open (headers trickled) plus 200 concurrent page requests:
    C-ECHO and C-STORE (storescu, a small synthetic series) are still answered, and the console
    serves again afterwards."""
    if not Path(ECHOSCU).exists() or not Path("/usr/bin/storescu").exists():
        pytest.skip("DCMTK echoscu/storescu not installed")
    import numpy as np

    from node.tools.synth_series import write_series

    vol = np.full((3, 24, 24), -1000, dtype=np.int16)
    vol[:, 6:18, 6:18] = 300
    files = write_series(vol, tmp_path / "flood", series_description="CT flood")
    host, port = snode.url.removeprefix("http://").split(":")
    stop = threading.Event()
    socks: list[socket.socket] = []
    for _ in range(200):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\n")  # never finished: a slow client
        socks.append(s)
    viewer = snode.client("viewer")
    cookies = {c.name: str(c.value) for c in viewer.cookies}
    codes: list[int] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                codes.append(requests.get(snode.url + "/jobs", cookies=cookies, timeout=30).status_code)
            except requests.RequestException:
                codes.append(0)

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(200)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        rx_port = snode.service.receiver.port  # type: ignore[union-attr]  # started node
        for _ in range(3):
            r = subprocess.run([ECHOSCU, "-to", "10", "-ta", "10", "-td", "10", "-aec", snode.config.ae_title,
                                "127.0.0.1", str(rx_port)], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(["/usr/bin/storescu", "-aec", snode.config.ae_title, "-aet", "FLOOD", "127.0.0.1",
                            str(rx_port), *map(str, files)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        for s in socks:
            s.close()
    assert codes and codes.count(200) > 0, codes[:20]
    assert snode.client("viewer").get("/api/v1/session").status_code == 200
    import pydicom

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    stored = snode.client("viewer").get(f"/api/v1/series/{uid}")
    assert stored.status_code == 200 and stored.json()["instances"] == len(files), stored.text[:300]


def _closed_by_server(s: socket.socket, wait_s: float) -> bool:
    s.settimeout(wait_s)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset: closed too


def test_idle_and_excess_connections_are_closed(snode: ConsoleNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that never finishes its request headers is closed after a while, and beyond a
    cap new connections are closed at once: idle sockets cannot use up the node process's file
    descriptors (the receiver and the spool need them).  Before: held open for ever."""
    import node.console.server as server

    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 1.0)
    host, port = snode.url.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    try:
        for s in slow:
            s.sendall(b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\n")
        time.sleep(2.0)
        assert all(_closed_by_server(s, 3.0) for s in slow)
    finally:
        for s in slow:
            s.close()
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 10)
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(30)]
    try:
        closed = sum(_closed_by_server(s, 0.5) for s in held)
        assert closed >= 20, closed
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert snode.client("viewer").get("/api/v1/session").status_code == 200


# ---------------------------------------------------------------------------- CSRF and the audit log
def test_csrf_token_of_another_session_or_none_is_refused(snode: ConsoleNode) -> None:
    """A session's changes need its own CSRF token: none, a wrong one, or another session's (even of
    the same user) is refused; the login form needs its double-submit cookie."""
    mine = login(snode.url, "operator", password_of("operator"))
    other = login(snode.url, "operator", password_of("operator"))
    url = snode.url + "/api/v1/tokens"
    for token in (None, "x" * 43, other.headers["X-CSRF-Token"]):
        headers = {"X-CSRF-Token": token} if token is not None else {}
        r = requests.post(url, json={"name": "csrf"}, cookies=mine.cookies, headers=headers, timeout=10)
        assert r.status_code == 403 and "CSRF" in r.text, (token, r.status_code)
        form = requests.post(snode.url + "/account/tokens", data={"name": "csrf", "csrf_token": token or ""},
                             cookies=mine.cookies, allow_redirects=False, timeout=10)
        assert form.status_code == 403, (token, form.status_code)
    assert mine.post(url, json={"name": "csrf"}, timeout=10).status_code == 201  # its own token works
    page = requests.get(snode.url + "/login", timeout=10)
    field = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert field
    r = requests.post(snode.url + "/login", data={"username": "viewer", "password": password_of("viewer"),
                                                  "csrf_token": field.group(1)}, allow_redirects=False, timeout=10)
    assert r.status_code == 403  # no login CSRF cookie: a cross-site login form is refused


def test_audit_log_lines_cannot_be_forged(snode: ConsoleNode) -> None:
    """A user name with CR/LF and JSON in a failed login stays one JSON line in the export, and is
    shown as text on the audit page."""
    forged = 'x"}\r\n{"action": "login.success", "username": "admin"}\n<script>window.__xss=1</script>'
    s = requests.Session()
    token = re.search(r'name="csrf_token" value="([^"]+)"', s.get(snode.url + "/login", timeout=10).text)
    assert token
    s.post(snode.url + "/login", data={"username": forged, "password": "wrong-password-1",
                                       "csrf_token": token.group(1)}, allow_redirects=False, timeout=10)
    admin = snode.client("admin")
    export = admin.get("/api/v1/audit/export").text
    import json

    entries = [json.loads(line) for line in export.splitlines()]
    assert len(entries) == len(export.strip().split("\n"))
    failed = [e for e in entries if e["action"] == "login.failed" and "\r\n" in (e.get("username") or "")]
    assert failed, "the forged name is not one entry"
    assert not any(e["action"] == "login.success" and e.get("username") == "admin" and e.get("client") is None
                   for e in entries)
    page = admin.get("/audit").text
    assert "<script>window.__xss" not in page and "&lt;script&gt;window.__xss" in page


def test_guessing_the_current_password_is_rate_limited(tmp_path: Path) -> None:
    """A stolen session (or token) guessing the current password to change it: after
    ``login_max_failures`` wrong ones within the window, refused (429) even with the right one."""
    node = start_console_node(tmp_path / "var", users=("viewer",), http={"login_max_failures": 3})
    try:
        c = node.client("viewer")
        for k in range(3):
            r = c.post("/api/v1/account/password", json={"current": f"guess-number-{k}", "new": "another-pass-99"})
            assert r.status_code == 400, r.text
        r = c.post("/api/v1/account/password", json={"current": password_of("viewer"), "new": "another-pass-99"})
        assert r.status_code == 429, r.text
    finally:
        node.service.stop()


def test_a_backtracking_regex_in_a_dry_run_does_not_stop_the_node(snode: ConsoleNode, tmp_path: Path) -> None:
    """An operator's draft with a catastrophic pattern, dry-run against an uploaded file whose
    SeriesDescription feeds it: before, Python's re backtracked for hours holding the GIL (node,
    receiver and console stood still); now the condition gives up as no match, and C-ECHO and the
    console answer meanwhile."""
    if not Path(ECHOSCU).exists():
        pytest.skip("DCMTK echoscu not installed")
    import numpy as np

    from node.tools.synth_series import write_series

    vol = np.full((2, 16, 16), 40, dtype=np.int16)
    f = write_series(vol, tmp_path / "a", series_description="a" * 59 + "!")[0]
    draft = ('rules:\n  - name: slow\n    match: {SeriesDescription: {regex: "(a|aa)+$"}}\n'
             '    profile: bones\n')
    result: dict[str, Any] = {}

    def dry_run() -> None:
        r = snode.client("operator").post("/api/v1/rules/dry-run/upload", data={"text": draft},
                                          files={"files": (f.name, f.read_bytes(), "application/dicom")},
                                          timeout=60)
        result["status"], result["json"] = r.status_code, r.json()

    t = threading.Thread(target=dry_run)
    t.start()
    rx_port = snode.service.receiver.port  # type: ignore[union-attr]  # started node
    echo = subprocess.run([ECHOSCU, "-to", "10", "-ta", "10", "-td", "10", "-aec", snode.config.ae_title,
                           "127.0.0.1", str(rx_port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert snode.client("viewer").get("/healthz", timeout=10).status_code == 200
    t.join(timeout=90)
    assert result.get("status") == 200, result
    (series,) = result["json"]["series"]
    (rule,) = series["rules"]
    assert rule["rule"] == "slow" and rule["status"] == "not_matched", rule


def test_no_file_outside_static_and_no_anonymous_api_description(snode: ConsoleNode) -> None:
    """Raw paths (not normalised by a client) cannot climb out of /static or a job's QC folder; the
    API description needs a login and FastAPI's CDN-loading docs pages do not exist."""
    for path in ("/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/%2e%2e/config.py",
                 "/static//etc/passwd", "/static/%2fetc%2fpasswd"):
        answer = _raw(snode, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = answer.split(" ", 2)[1]
        assert status in ("400", "404"), (path, answer[:200])
        assert "import" not in answer and "root:" not in answer, path
    viewer = snode.client("viewer")
    for name in ("..%2f..%2freport.json", "..%2f..%2f..%2f..%2fetc%2fpasswd", "%2e%2e"):
        r = viewer.get(f"/api/v1/jobs/1/qc/{name}")
        assert r.status_code == 404, (name, r.status_code)
    anon = snode.anonymous()
    assert anon.get("/api/v1/openapi.json").status_code == 401
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert anon.get(path).status_code == 404, path
