"""The console in a real browser (Debian's chromium, headless, through Playwright): first start's
admin with its one-time password, the forced password change, a viewer refused, the audit log,
token creation, and screenshots of the main pages (tests/.artifacts/console/, look at them)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from console_helpers import ConsoleNode, browser_login, password_of, screenshot, start_console_node

from node.console.auth import Role, create_user


@pytest.fixture(scope="module")
def fresh_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    """A node started with no console user: it makes 'admin' with a one-time password."""
    node = start_console_node(tmp_path_factory.mktemp("browser") / "var", users=(), quiet_period_s=3600,
                              early_start_s=0)
    create_user(node.store, "viewer", Role.VIEWER, password_of("viewer"))
    try:
        yield node
    finally:
        node.service.stop()


@pytest.fixture
def page(browser: Any, fresh_node: ConsoleNode) -> Iterator[Any]:
    """A page that records every request it makes and every console error (a CSP violation is one)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    p = context.new_page()
    p.requests_made = []
    p.errors = []
    p.on("request", lambda r: p.requests_made.append(r.url))
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    try:
        yield p
        # nothing from anywhere but the console itself; no script error, no blocked resource
        assert all(u.startswith(fresh_node.url + "/") for u in p.requests_made), p.requests_made
        intended = ("status of 401", "status of 403")  # the wrong password and the viewer refused, on purpose
        assert not [e for e in p.errors if not e.endswith(tuple(f"{i} (Unauthorized)" for i in intended))
                    and not e.endswith(tuple(f"{i} (Forbidden)" for i in intended))], p.errors
    finally:
        context.close()


def test_first_admin_forced_change_then_pages(fresh_node: ConsoleNode, page: Any) -> None:
    assert fresh_node.service.console is not None
    one_time = fresh_node.service.console.first_admin_password
    assert one_time
    url = fresh_node.url
    page.goto(url + "/")
    assert page.url.startswith(url + "/login?next=")
    screenshot(page, "login")
    browser_login(page, url, "admin", "not-the-password")
    assert "Wrong user name or password" in page.content()
    browser_login(page, url, "admin", one_time)
    assert page.url == url + "/account/password"
    assert "You must choose a new password" in page.content()
    page.goto(url + "/destinations")  # every other page sends back to the password page
    assert page.url == url + "/account/password"
    screenshot(page, "password-forced")
    page.fill("input[name=current]", one_time)
    page.fill("input[name=new]", "admin-new-password-1")
    page.fill("input[name=confirm]", "admin-new-password-1")
    page.click("form[action='/account/password'] button[type=submit]")
    page.wait_for_load_state()
    assert page.url == url + "/"  # the message came in a cookie, not the URL
    assert page.locator("text=Password changed.").count() == 1
    assert page.locator("text=Receiver").count() >= 1
    screenshot(page, "health")
    with page.expect_request(lambda r: r.headers.get("hx-request") == "true", timeout=10000) as refresh:
        pass  # htmx refreshes the health figures every 5 s
    assert refresh.value.url == url + "/"
    for path, name, expect in (("/destinations", "destinations", "Calling AEs allowed"), ("/users", "users", "Add a user"),
                               ("/audit", "audit", "login.success"), ("/api", "api", "/api/v1/health"),
                               ("/account", "account", "API tokens")):
        page.goto(url + path)
        assert expect in page.content(), path
        screenshot(page, name)
    # C-ECHO through htmx: the answer lands beside the button (the CSRF token goes in htmx's header)
    page.goto(url + "/destinations")
    with page.expect_response(lambda r: r.url.endswith("/destinations/pacs/echo")) as echo:
        page.click("form[action='/destinations/pacs/echo'] button")
    assert echo.value.status == 200
    assert echo.value.request.headers.get("x-csrf-token")
    page.wait_for_selector("#echo-pacs span")
    assert page.locator("#echo-pacs").inner_text().startswith("C-ECHO pacs: ")
    screenshot(page, "destinations-echo")
    # an API token, shown once
    page.goto(url + "/account")
    page.fill("input[name=name]", "prometheus")
    page.click("text=Create token")
    page.wait_for_load_state()
    token = page.locator("#new-token").inner_text().strip()
    assert token.startswith("dnt_")
    screenshot(page, "account-token")
    page.goto(url + "/account")
    assert token not in page.content()
    # an admin adds a user (one-time password shown) and removes it after confirming
    page.goto(url + "/users")
    page.fill("input[name=username]", "tmpuser")
    page.click("text=Add with a one-time password")
    page.wait_for_load_state()
    assert len(page.locator("#one-time").inner_text().strip()) >= 12
    page.once("dialog", lambda d: d.accept())
    page.click("form[action='/users/tmpuser/remove'] button")
    page.wait_for_load_state()
    assert "User tmpuser removed." in page.content()
    # the audit log shows the failed and the successful login, the password change and the token
    page.goto(url + "/audit")
    text = page.locator("#audit").inner_text()
    for action in ("login.failed", "login.success", "user.password", "token.create", "user.add", "user.remove"):
        assert action in text, action
    # log out: the pages need a login again
    page.click("text=Log out")
    page.wait_for_load_state()
    page.goto(url + "/audit")
    assert page.url.startswith(url + "/login")


def test_viewer_is_refused(fresh_node: ConsoleNode, page: Any) -> None:
    url = fresh_node.url
    browser_login(page, url, "viewer", password_of("viewer"))
    assert page.url == url + "/"
    nav = page.locator("header nav").inner_text()
    assert "Users" not in nav and "Audit" not in nav and "Destinations" in nav
    response = page.goto(url + "/users")
    assert response is not None and response.status == 403
    assert "needs the admin role" in page.content()
    screenshot(page, "viewer-refused")
    page.goto(url + "/destinations")
    assert page.locator("button:has-text('Pause')").count() == 0  # no buttons for what a viewer may not do
