"""A running node with its console, users of each role, a logged-in HTTP client per role, and a
headless Debian chromium through Playwright, for the console tests (not a test file).

The fixtures ``console_node`` and ``browser`` are registered in tests/conftest.py::

    def test_x(console_node):
        r = console_node.client("operator").post("/api/v1/...", json={...})  # CSRF header already set
        console_node.anonymous().get("/api/v1/health").status_code == 401
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest
import requests

if TYPE_CHECKING:  # imported when used: conftest.py imports this module for every test
    from node.config import NodeConfig
    from node.service import NodeService
    from node.store import Store

#: every role, lowest first
ROLES = ("viewer", "operator", "admin")
#: password of the test users (role name + this)
PASSWORD_SUFFIX = "-pass-1234"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: screenshots and other artifacts of the console tests (git-ignored)
ARTIFACTS = Path(__file__).resolve().parent / ".artifacts" / "console"


def password_of(username: str) -> str:
    return username + PASSWORD_SUFFIX


def login(base_url: str, username: str, password: str) -> requests.Session:
    """A ``requests`` session logged in through the login form, sending the session's CSRF token
    (``X-CSRF-Token``) with every request.  Raises AssertionError when the login fails."""
    s = requests.Session()
    page = s.get(base_url + "/login", timeout=10)
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, "no csrf_token field on the login page"
    r = s.post(base_url + "/login", data={"username": username, "password": password, "csrf_token": m.group(1),
                                          "next": "/"}, allow_redirects=False, timeout=10)
    assert r.status_code == 303, f"login of {username} failed: {r.status_code} {r.text[:300]}"
    info = s.get(base_url + "/api/v1/session", timeout=10)
    if info.status_code == 200:
        s.headers["X-CSRF-Token"] = info.json()["csrf_token"]
    return s


class _BaseURLSession(requests.Session):
    """``requests.Session`` whose paths are relative to the console (``s.get("/api/v1/health")``)."""

    def __init__(self, base_url: str, inner: requests.Session | None = None) -> None:
        super().__init__()
        self.base_url = base_url
        if inner is not None:
            self.cookies = inner.cookies
            self.headers.update(inner.headers)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        path = url.decode() if isinstance(url, bytes) else url
        return super().request(method, self.base_url + path if path.startswith("/") else path, *args, **kwargs)

    def get(self, url: str | bytes, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("allow_redirects", False)  # requests' get follows redirects by default
        return self.request("GET", url, **kwargs)


@dataclass
class ConsoleNode:
    """A started :class:`NodeService` with its console (see :func:`start_console_node`)."""

    service: NodeService
    url: str  #: ``http://127.0.0.1:<port>`` (no trailing slash)
    store: Store
    _clients: dict[str, requests.Session] = field(default_factory=dict)

    @property
    def config(self) -> NodeConfig:
        return self.service.config

    def client(self, username: str) -> requests.Session:
        """A logged-in client (paths relative to the console, redirects not followed); cached per user."""
        if username not in self._clients:
            self._clients[username] = _BaseURLSession(self.url, login(self.url, username, password_of(username)))
        return self._clients[username]

    def anonymous(self) -> requests.Session:
        return _BaseURLSession(self.url)

    def token_client(self, username: str, name: str = "test") -> requests.Session:
        """A client authenticating with a fresh API token of ``username`` (no cookies)."""
        token = self.client(username).post("/api/v1/tokens", json={"name": name}).json()["token"]
        s = _BaseURLSession(self.url)
        s.headers["Authorization"] = f"Bearer {token}"
        return s


def start_console_node(storage: Path, *, users: tuple[str, ...] = ROLES, **cfg: Any) -> ConsoleNode:
    """Start a node (receiver on a free port, console on a free port, one worker) with the console users
    ``users`` (each named after its role, password :func:`password_of`); stop it with ``.service.stop()``."""
    from node.config import EMBEDDED_PACS, NodeConfig
    from node.console.auth import Role, create_user
    from node.service import NodeService
    from node.store import Store

    http = {"port": 0, **cfg.pop("http", {})}
    cfg.setdefault("destinations", {"pacs": dict(EMBEDDED_PACS)})  # the shipped rules send there
    config = NodeConfig(port=0, bind_address="127.0.0.1", storage=storage, workers=1, http=http, **cfg)
    pre = Store(config.database_path)
    for name in users:
        create_user(pre, name, Role.parse(name), password_of(name))
    pre.close()
    svc = NodeService(config, console_in_process=True)  # tests reach into its app (tests/test_console_process.py: a process)
    svc.start()
    assert svc.console is not None
    return ConsoleNode(service=svc, url=svc.console.url.rstrip("/"), store=svc.store)  # type: ignore[arg-type]  # started: not None


@pytest.fixture(scope="module")
def console_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    """A node with its console and users viewer/operator/admin, shared by a test module."""
    node = start_console_node(tmp_path_factory.mktemp("console") / "var")
    try:
        yield node
    finally:
        node.service.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium driven by Playwright (``executable_path``: no browser download)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def browser_login(page: Any, base_url: str, username: str, password: str) -> None:
    """Log in through the login page of a Playwright ``page``."""
    page.goto(base_url + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as a test artifact (tests/.artifacts/console/NAME.png)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
