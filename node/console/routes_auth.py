"""Login, logout, the caller's session, password change and API tokens (pages and API).

Every login (success, failure, refusal by the rate limit) and every change is audited.  Failed
logins are limited per user name (``http.login_max_failures`` within ``http.login_window_s``) and
per client address (four times as many), counted from the audit log so the limit holds across
restarts.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from node.console.auth import (
    MIN_PASSWORD_LENGTH,
    SESSION_COOKIE,
    Principal,
    Role,
    authenticate,
    burn_verification,
    check_new_password,
    client_address,
    hash_password,
    new_token,
    require,
    start_session,
    token_hash,
    verify_password,
)
from node.console.context import ConsoleContext, get_ctx
from node.console.web import redirect_with_message, render

router = APIRouter()
log = logging.getLogger("node.console")

_LOGIN_CSRF_COOKIE = "dn_login_csrf"
_viewer = require(Role.VIEWER)


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no ``//host`` or scheme): no open redirect after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _login_page(request: Request, next_: str, *, error: str | None = None, username: str = "",
                status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    request.state.login_csrf = token
    resp = render(request, "login.html", {"next": next_, "error": error, "username": username, "title": "Log in"},
                  status_code=status_code)
    # double-submit token for the login form (there is no session yet to hold one)
    resp.set_cookie(_LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                    secure=request.app.state.ctx.https)
    return resp


@router.get("/login", include_in_schema=False)
def login_form(request: Request, next: str = "/") -> Response:
    return _login_page(request, _safe_next(next))


def _rate_limited(ctx: ConsoleContext, username: str, client: str) -> bool:
    """Too many failed logins within the window: for this user name from this address, from this
    address (4x: several people may log in from behind one proxy), or for this user name from
    everywhere (10x: a guesser spread over many addresses).  Counting per user name alone let
    anyone who knew a user name (``admin``) lock that user out with a few wrong passwords."""
    http = ctx.config.http
    since = time.time() - http.login_window_s
    n = http.login_max_failures

    def failed(**who: str) -> int:
        return ctx.store.count_audit("login.failed", since=since, **who)

    return (failed(username=username, client=client) >= n or failed(client=client) >= 4 * n
            or failed(username=username) >= 10 * n)


@router.post("/login", include_in_schema=False)
def login(request: Request, username: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
          next: str = Form("/"), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    client = client_address(request)
    next_ = _safe_next(next)
    cookie = request.cookies.get(_LOGIN_CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie, csrf_token):
        return _login_page(request, next_, error="The login form expired; please try again.", username=username,
                           status_code=403)
    username = username.strip()
    if _rate_limited(ctx, username, client):
        ctx.store.add_audit("login.refused", username=username or None, client=client,
                            detail={"reason": "too many failed logins"})
        log.warning("console login of %r from %s refused: too many failed logins", username, client)
        return _login_page(request, next_, error="Too many failed logins; wait a few minutes.", username=username,
                           status_code=429)
    username = username[:100]  # what an anonymous caller can write into the audit log
    user = ctx.store.get_user(username) if username else None
    if user is None:
        burn_verification(password)
    if user is None or not verify_password(user.password_hash, password):
        ctx.store.add_audit("login.failed", username=username or None, client=client,
                            detail={"reason": "unknown user" if user is None else "wrong password"})
        log.warning("console login of %r from %s failed", username, client)
        return _login_page(request, next_, error="Wrong user name or password.", username=username, status_code=401)
    before = authenticate(request, ctx)  # logged in already (this user or another): that session ends
    if before is not None and before.session_id:
        ctx.store.end_sessions(session_id=before.session_id)
    cookie_value, _csrf = start_session(ctx, user, client)
    ctx.store.add_audit("login.success", username=user.username, client=client, detail={"role": user.role})
    resp = RedirectResponse("/account/password" if user.must_change else next_, status_code=303)
    resp.set_cookie(SESSION_COOKIE, cookie_value, httponly=True, samesite="strict", secure=ctx.https, path="/",
                    max_age=int(ctx.config.http.session_max_age_s))
    resp.delete_cookie(_LOGIN_CSRF_COOKIE, path="/login")
    return resp


@router.post("/logout", include_in_schema=False)
def logout(request: Request, p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    if p.session_id:
        ctx.store.end_sessions(session_id=p.session_id)
    ctx.store.add_audit("logout", username=p.username, client=client_address(request))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/api/v1/session", tags=["account"])
def session_info(p: Principal = Depends(_viewer)) -> dict[str, Any]:
    """The caller: user name, role, how authenticated, whether the password must change, and the CSRF
    token a cookie-session client sends as ``X-CSRF-Token`` on changes."""
    return {"username": p.username, "role": p.role.label, "via": p.via,
            "must_change_password": p.must_change_password, "csrf_token": p.csrf}


def _change_password(ctx: ConsoleContext, p: Principal, client: str, current: str, new: str, confirm: str) -> None:
    user = ctx.store.get_user(user_id=p.user_id)
    if user is None:
        raise HTTPException(404, "no such user")
    http = ctx.config.http
    # a stolen session or token must not guess the current password (and take the account for good)
    if ctx.store.count_audit("user.password.failed", since=time.time() - http.login_window_s,
                             username=p.username) >= http.login_max_failures:
        raise HTTPException(429, "too many wrong current passwords; wait a few minutes")
    if not verify_password(user.password_hash, current):
        ctx.store.add_audit("user.password.failed", username=p.username, client=client, target=p.username,
                            detail={"reason": "wrong current password"})
        raise HTTPException(400, "the current password is wrong")
    if new != confirm:
        raise HTTPException(400, "the new passwords differ")
    if hmac.compare_digest(new, current):
        raise HTTPException(400, "the new password must differ from the current one")
    try:
        check_new_password(new, username=p.username)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    ctx.store.update_user(p.username, password_hash=hash_password(new), must_change=False)
    ctx.store.end_sessions(user_id=p.user_id, keep=p.session_id)  # other browsers log in again
    ctx.store.add_audit("user.password", username=p.username, client=client, target=p.username)


@router.get("/account", include_in_schema=False)
def account_page(request: Request, p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return render(request, "account.html", {"tokens": ctx.store.list_tokens(p.user_id), "title": "Account",
                                            "new_token": None})


@router.get("/account/password", include_in_schema=False)
def password_form(request: Request, _p: Principal = Depends(_viewer)) -> Response:
    return render(request, "password.html", {"min_length": MIN_PASSWORD_LENGTH, "title": "Change password"})


@router.post("/account/password", include_in_schema=False)
def password_submit(request: Request, current: str = Form(""), new: str = Form(""), confirm: str = Form(""),
                    p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    try:
        _change_password(ctx, p, client_address(request), current, new, confirm)
    except HTTPException as exc:
        return render(request, "password.html", {"min_length": MIN_PASSWORD_LENGTH, "error": exc.detail,
                                                 "title": "Change password"}, status_code=exc.status_code)
    return redirect_with_message(request, "/", "Password changed.")


class PasswordChange(BaseModel):
    current: str
    new: str


@router.post("/api/v1/account/password", tags=["account"])
def password_api(body: PasswordChange, request: Request, p: Principal = Depends(_viewer),
                 ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Change the caller's password (other sessions of the user end)."""
    _change_password(ctx, p, client_address(request), body.current, body.new, body.new)
    return {"changed": True}


# -- API tokens ---------------------------------------------------------------------------------
class TokenCreate(BaseModel):
    name: str


def _create_token(ctx: ConsoleContext, p: Principal, client: str, name: str) -> dict[str, Any]:
    name = name.strip()
    if not name or len(name) > 100:
        raise HTTPException(400, "a token needs a name of 1..100 characters")
    token = new_token()
    token_id = ctx.store.add_token(p.user_id, name, token_hash(token))
    ctx.store.add_audit("token.create", username=p.username, client=client, target=f"token {token_id}",
                        detail={"name": name})
    return {"id": token_id, "name": name, "token": token}


def _revoke_token(ctx: ConsoleContext, p: Principal, client: str, token_id: int) -> None:
    # an admin may revoke anyone's token, others only their own
    if not ctx.store.revoke_token(token_id, user_id=None if p.role >= Role.ADMIN else p.user_id):
        raise HTTPException(404, f"no active token {token_id} of yours")
    ctx.store.add_audit("token.revoke", username=p.username, client=client, target=f"token {token_id}")


@router.get("/api/v1/tokens", tags=["account"])
def tokens_list(p: Principal = Depends(_viewer), ctx: ConsoleContext = Depends(get_ctx)) -> list[dict[str, Any]]:
    """The caller's API tokens (an admin: everyone's), never the tokens themselves."""
    return ctx.store.list_tokens(None if p.role >= Role.ADMIN else p.user_id)


@router.post("/api/v1/tokens", tags=["account"], status_code=201)
def tokens_create(body: TokenCreate, request: Request, p: Principal = Depends(_viewer),
                  ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Create a token for the caller; the answer holds it, shown this once (only its hash is kept)."""
    return _create_token(ctx, p, client_address(request), body.name)


@router.delete("/api/v1/tokens/{token_id}", tags=["account"])
def tokens_revoke(token_id: int, request: Request, p: Principal = Depends(_viewer),
                  ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    _revoke_token(ctx, p, client_address(request), token_id)
    return {"revoked": token_id}


@router.post("/account/tokens", include_in_schema=False)
def tokens_create_page(request: Request, name: str = Form(""), p: Principal = Depends(_viewer),
                       ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    try:
        created = _create_token(ctx, p, client_address(request), name)
    except HTTPException as exc:
        return render(request, "account.html", {"tokens": ctx.store.list_tokens(p.user_id), "error": exc.detail,
                                                "title": "Account", "new_token": None}, status_code=exc.status_code)
    return render(request, "account.html", {"tokens": ctx.store.list_tokens(p.user_id), "new_token": created,
                                            "title": "Account"})


@router.post("/account/tokens/{token_id}/revoke", include_in_schema=False)
def tokens_revoke_page(token_id: int, request: Request, p: Principal = Depends(_viewer),
                       ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    _revoke_token(ctx, p, client_address(request), token_id)
    return RedirectResponse("/account", status_code=303)
