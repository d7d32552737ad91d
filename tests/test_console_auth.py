"""Console authentication: login, CSRF, roles, sessions, tokens, first admin, rate limit, with a
real node and its console on real ports (tests/console_helpers.py)."""

from __future__ import annotations

import re

from console_helpers import ConsoleNode, login

from node.console.auth import Role, create_user, ensure_first_admin, verify_password
from node.store import Store


def test_login_session_and_csrf(console_node: ConsoleNode) -> None:
    op = console_node.client("operator")
    info = op.get("/api/v1/session").json()
    assert info["username"] == "operator" and info["role"] == "operator" and info["via"] == "session"
    # a change without the CSRF token is refused even with a valid session cookie
    bare = console_node.anonymous()
    bare.cookies = op.cookies
    r = bare.post("/api/v1/tokens", json={"name": "x"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = bare.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    assert op.post("/api/v1/tokens", json={"name": "x"}).status_code == 201


def test_anonymous_and_roles(console_node: ConsoleNode) -> None:
    anon = console_node.anonymous()
    login_page = anon.get("/login")
    csp = login_page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert login_page.headers["X-Frame-Options"] == "DENY" and login_page.headers["Cache-Control"] == "no-store"
    r = anon.get("/api/v1/health")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = anon.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2F"
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"store": "ok", "spool": "ok", "receiver": "ok"}
    health = console_node.client("viewer").get("/api/v1/health")
    assert health.status_code == 200
    assert health.json()["workers"]["executor"].startswith("local: ")  # where tries run (docs/scaling.md)


def test_wrong_password_is_audited(console_node: ConsoleNode) -> None:
    s = console_node.anonymous()
    page = s.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]  # present
    r = s.post("/login", data={"username": "viewer", "password": "nope-nope-nope", "csrf_token": csrf})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    failed = console_node.store.list_audit(action="login.failed", username="viewer")
    assert failed and failed[0]["client"] == "127.0.0.1" and failed[0]["detail"] == {"reason": "wrong password"}
    assert console_node.store.list_audit(action="login.success", username="viewer") or True


def test_token_auth_and_revoke(console_node: ConsoleNode) -> None:
    admin = console_node.client("admin")
    created = admin.post("/api/v1/tokens", json={"name": "script"}).json()
    tok = created["token"]
    stored = console_node.store.conn.execute("SELECT token_hash FROM console_tokens WHERE id = ?", (created["id"],)).fetchone()[0]
    assert tok not in stored and len(stored) == 64  # only the hash is kept
    s = console_node.anonymous()
    s.headers["Authorization"] = f"Bearer {tok}"
    info = s.get("/api/v1/session").json()
    assert info["via"] == "token" and info["role"] == "admin" and info["csrf_token"] is None
    assert s.post("/api/v1/tokens", json={"name": "by-token"}).status_code == 201  # no CSRF for tokens
    assert admin.delete(f"/api/v1/tokens/{created['id']}").status_code == 200
    assert s.get("/api/v1/session").status_code == 401
    actions = [e["action"] for e in console_node.store.list_audit(username="admin")]
    assert "token.create" in actions and "token.revoke" in actions


def test_first_admin_must_change_password(tmp_path) -> None:
    store = Store(tmp_path / "node.db")
    password = ensure_first_admin(store)
    assert password and len(password) >= 12
    assert ensure_first_admin(store) is None  # only the first start
    user = store.get_user("admin")
    assert user is not None and user.must_change and user.role == "admin"
    assert verify_password(user.password_hash, password) and not verify_password(user.password_hash, password + "x")
    assert user.password_hash.startswith("$argon2id$")
    create_user(store, "viewer2", Role.VIEWER, "long-enough-pw")
    store.close()


def test_serve_prints_where_the_console_is_and_how_to_log_in(tmp_path) -> None:
    """`dicom-node serve` on a fresh storage: the console's address, the first admin's one-time password
    once in the log, and a login with it that must change the password."""
    import subprocess
    import sys

    import requests
    import yaml

    cfg = {"port": 0, "bind_address": "127.0.0.1", "storage": str(tmp_path / "var"), "quiet_period_s": 3600,
           "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}}, "workers": 1,
           "http": {"port": 0}, "log_level": "INFO"}
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "node.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(tmp_path / "node.yaml")],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert "listening as DICOMNODE" in lines[0], lines
        m = re.match(r"dicom-node: console at (http://127\.0\.0\.1:\d+/): log in as 'admin' with the one-time "
                     r"password in the log above", lines[1])
        assert m, lines
        found = re.findall(r"created user 'admin' with the one-time password (\S+) ", log.read_text())
        assert len(found) == 1, log.read_text()[-2000:]
        url = m.group(1).rstrip("/")
        assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
        s = login(url, "admin", found[0])
        assert s.get(url + "/api/v1/health", timeout=10).status_code == 403  # the password must change first
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_https_with_a_certificate_and_secure_cookies(tmp_path) -> None:
    import shutil
    import subprocess

    import pytest
    import requests
    from console_helpers import start_console_node

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "console.pem", tmp_path / "console.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    node = start_console_node(tmp_path / "var", users=("viewer",), quiet_period_s=3600,
                              http={"certificate": str(cert), "key": str(key)})
    try:
        assert node.url.startswith("https://127.0.0.1:")
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
        s.verify = str(cert)
        page = s.get(node.url + "/login", timeout=10)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]  # the form has one
        r = s.post(node.url + "/login", data={"username": "viewer", "password": "viewer-pass-1234", "csrf_token": csrf},
                   allow_redirects=False, timeout=10)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "dn_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert s.get(node.url + "/api/v1/session", timeout=10).json()["username"] == "viewer"
        with pytest.raises(requests.ConnectionError):  # plain http to the https port
            requests.get(node.url.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        node.service.stop()


def test_openapi_and_api_page_are_served_locally(console_node: ConsoleNode) -> None:
    viewer = console_node.client("viewer")
    schema = viewer.get("/api/v1/openapi.json").json()
    assert schema["openapi"].startswith("3.") and "/api/v1/health" in schema["paths"]
    assert console_node.anonymous().get("/api/v1/openapi.json").status_code == 401
    page = viewer.get("/api").text
    assert re.search(r"/api/v1/destinations/\{name\}/echo</td><td>operator</td>", page)
    assert re.search(r"/api/v1/users</td><td>admin</td>", page)
    assert "http://" not in page.replace(console_node.url, "") and "https://" not in page
    for gone in ("/docs", "/redoc", "/openapi.json"):  # FastAPI's pages would load scripts from a CDN
        assert viewer.get(gone).status_code == 404


def test_expired_sessions_are_refused_and_dropped(console_node: ConsoleNode) -> None:
    store = console_node.store
    create_user(store, "expiring", Role.VIEWER, "expiring-pass-1")  # its own user: the shared clients keep theirs
    s = login(console_node.url, "expiring", "expiring-pass-1")
    assert s.get(console_node.url + "/api/v1/session", timeout=10).status_code == 200
    store.conn.execute("UPDATE console_sessions SET expires_at = 1 WHERE user_id = (SELECT id FROM console_users"
                       " WHERE username = 'expiring')")
    assert s.get(console_node.url + "/api/v1/session", timeout=10).status_code == 401
    login(console_node.url, "expiring", "expiring-pass-1")  # a login drops expired sessions
    assert store.conn.execute("SELECT COUNT(*) FROM console_sessions WHERE expires_at <= 1").fetchone()[0] == 0


def test_http_section_is_validated_at_the_door(tmp_path) -> None:
    import pytest

    from node.config import ConfigError, load_config

    def load(text: str):
        p = tmp_path / "node.yaml"
        p.write_text(text)
        return load_config(p)

    cfg = load("destinations: {}\n")
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port, cfg.http.certificate) == (True, "127.0.0.1", 8080, None)
    (tmp_path / "c.pem").write_text("x")
    for text, where in (("http: {port: 70000}\n", "http.port: must be 1..65535"),
                        ("http: {certificate: c.pem}\n", "http: give both certificate and key"),
                        ("http: {certificate: c.pem, key: missing.key}\n", "http.key: no such file"),
                        ("http: {hots: 0.0.0.0}\n", "http.hots: unknown key"),
                        ("http: {login_max_failures: 0}\n", "http.login_max_failures")):
        with pytest.raises(ConfigError) as exc:
            load(text)
        assert where in str(exc.value), (text, str(exc.value))
    (tmp_path / "c.key").write_text("x")
    cfg = load("http: {certificate: c.pem, key: c.key, host: 0.0.0.0, enabled: false}\n")
    assert cfg.http.key == tmp_path / "c.key" and not cfg.http.enabled


def test_console_threads_run_at_a_lower_priority(console_node: ConsoleNode) -> None:
    """The console's threads (its event loop, and the worker threads that run its routes) are niced,
    so that under CPU contention the receiver's threads come first."""
    import os
    import threading
    from pathlib import Path

    from node.console.server import CONSOLE_NICENESS

    def nice(tid: int) -> int:
        stat = Path(f"/proc/{os.getpid()}/task/{tid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5), counted after the command name

    assert console_node.client("viewer").get("/api/v1/health").status_code == 200  # a route ran on a worker thread
    console = [t for t in threading.enumerate() if t.name == "console-http"]
    assert console and nice(console[0].native_id or 0) == os.nice(0) + CONSOLE_NICENESS
    workers = [t for t in threading.enumerate() if t.name.startswith("AnyIO worker thread")]
    assert workers and all(nice(t.native_id or 0) == os.nice(0) + CONSOLE_NICENESS for t in workers)
    receivers = [t for t in threading.enumerate() if t.name.startswith("receiver:")]
    assert receivers and all(nice(t.native_id or 0) == os.nice(0) for t in receivers)
