"""Who is asking and may they: roles, password and token hashing, sessions, CSRF, and the
``require(Role.X)`` dependency every console route takes.

A request is authenticated by ``Authorization: Bearer <token>`` (API tokens, stored as SHA-256:
they are long random strings, so a slow hash adds nothing) or by the signed session cookie
(a random session id signed with the node's key; the session itself lives in the store, so
logout and a password change end it).  Cookie-authenticated requests with an unsafe method
must carry the session's CSRF token in the ``X-CSRF-Token`` header or a ``csrf_token`` form field;
token-authenticated ones need not (a browser never sends a bearer token on its own).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from node.console.context import ConsoleContext, get_ctx
from node.store import ConsoleUser, Store

__all__ = [
    "Role",
    "Principal",
    "LoginRequired",
    "PasswordChangeRequired",
    "SESSION_COOKIE",
    "CSRF_HEADER",
    "CSRF_FIELD",
    "MIN_PASSWORD_LENGTH",
    "hash_password",
    "verify_password",
    "burn_verification",
    "check_new_password",
    "new_token",
    "token_hash",
    "client_address",
    "authenticate",
    "require",
    "create_user",
    "ensure_first_admin",
    "start_session",
    "is_api_path",
]

log = logging.getLogger("node.console")

SESSION_COOKIE = "dn_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: paths a user who must change the password may still use
_PASSWORD_CHANGE_PATHS = frozenset({"/account/password", "/logout", "/api/v1/session", "/api/v1/account/password"})

_hasher = PasswordHasher()


class Role(enum.IntEnum):
    """Console roles; a higher role may do everything a lower one may."""

    VIEWER = 1  #: read-only
    OPERATOR = 2  #: jobs, retries, quarantine, dry-runs; no rule or user changes
    ADMIN = 3  #: everything

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> "Role":
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"role must be one of admin, operator, viewer (got {name!r})") from None


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as ``require`` returns it."""

    user_id: int
    username: str
    role: Role
    via: Literal["session", "token"]
    must_change_password: bool = False
    session_id: str | None = None
    csrf: str | None = None  #: the session's CSRF token (None for token callers)
    token_id: int | None = None


class LoginRequired(Exception):
    """Raised for an anonymous page request: the app answers with a redirect to ``/login``."""


class PasswordChangeRequired(Exception):
    """Raised for a page request of a user who must change the password first."""


def hash_password(password: str) -> str:
    """argon2id hash (argon2-cffi's defaults) of ``password``."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    if len(password) > MAX_PASSWORD_LENGTH:  # hashing megabytes per try would be a denial of service
        return False
    try:
        return bool(_hasher.verify(password_hash, password))
    except (VerificationError, InvalidHashError):
        return False


def check_new_password(password: str, *, username: str = "") -> None:
    """Raise ``ValueError`` with the reason when ``password`` is too weak (or too long) to set."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    if username and password.lower() == username.lower():
        raise ValueError("the password must not be the user name")


#: verified against when the user does not exist, so that an unknown name costs as long as a wrong password
_DUMMY_HASH = _hasher.hash("no such user: dummy password")


def burn_verification(password: str) -> None:
    verify_password(_DUMMY_HASH, password)


def new_token() -> str:
    """A new API token (shown once; only its hash is stored)."""
    return "dnt_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def is_api_path(path: str) -> bool:
    """JSON endpoints answer 401/403; pages redirect to the login page instead."""
    return path.startswith("/api/") or path == "/metrics"


def _serializer(ctx: ConsoleContext) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(ctx.secret, salt="dicom-node-session")


def _principal(user: ConsoleUser, **kw: Any) -> Principal:
    return Principal(user_id=user.id, username=user.username, role=Role.parse(user.role),
                     must_change_password=user.must_change, **kw)


def authenticate(request: Request, ctx: ConsoleContext) -> Principal | None:
    """The caller by bearer token or session cookie, or None (anonymous, bad token, expired session)."""
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        found = ctx.store.token_user(token_hash(value.strip()))
        if found is None:
            return None
        token_id, user = found
        return _principal(user, via="token", token_id=token_id)
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        sid = _serializer(ctx).loads(cookie, max_age=int(ctx.config.http.session_max_age_s))
    except BadSignature:
        return None
    session = ctx.store.get_session(str(sid))
    if session is None:
        return None
    owner = ctx.store.get_user(user_id=int(session["user_id"]))
    if owner is None:
        return None
    return _principal(owner, via="session", session_id=session["id"], csrf=session["csrf"])


async def _csrf_ok(request: Request, expected: str) -> bool:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()  # cached by Starlette: the route can read it again
            value = form.get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    return sent is not None and hmac.compare_digest(sent, expected)


def require(min_role: Role) -> Callable[..., Awaitable[Principal]]:
    """Dependency factory: ``principal: Principal = Depends(require(Role.OPERATOR))``.

    Anonymous: 401 (API) or a redirect to ``/login`` (pages); a role below ``min_role``: 403; a
    cookie session sending an unsafe method without its CSRF token: 403; a user who must change
    the password: 403 (API) or a redirect to the password page, except on that page and logout.
    """

    async def dependency(request: Request, ctx: ConsoleContext = Depends(get_ctx)) -> Principal:
        principal = authenticate(request, ctx)
        api = is_api_path(request.url.path)
        if principal is None:
            if api:
                raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
            raise LoginRequired()
        request.state.principal = principal
        if principal.via == "session" and request.method not in _SAFE_METHODS:
            if not await _csrf_ok(request, principal.csrf or ""):
                raise HTTPException(403, "missing or wrong CSRF token")
        if principal.must_change_password and request.url.path not in _PASSWORD_CHANGE_PATHS:
            if api:
                raise HTTPException(403, "password change required (POST /api/v1/account/password)")
            raise PasswordChangeRequired()
        if principal.role < min_role:
            raise HTTPException(403, f"needs the {min_role.label} role (you are {principal.role.label})")
        return principal

    dependency.__name__ = f"require_{min_role.label}"
    dependency._console_role = min_role  # type: ignore[attr-defined]  # read by app.walk_routes
    return dependency


def create_user(store: Store, username: str, role: Role, password: str, *, must_change: bool = False) -> int:
    """Validate and create a console user (``ValueError`` on a bad name, weak password or taken name)."""
    username = username.strip()
    if not username or len(username) > 64 or not all(ch.isalnum() or ch in "._-@" for ch in username):
        raise ValueError(f"user names are 1..64 letters, digits and . _ - @ (got {username!r})")
    check_new_password(password, username=username)
    return store.add_user(username, role.label, hash_password(password), must_change=must_change)


def ensure_first_admin(store: Store) -> str | None:
    """With no user at all, create ``admin`` with a random one-time password it must change at first
    login; returns that password (the caller logs it once), else None."""
    if store.count_users():
        return None
    password = secrets.token_urlsafe(12)
    try:
        create_user(store, "admin", Role.ADMIN, password, must_change=True)
    except ValueError:  # another process created it first
        return None
    return password


def start_session(ctx: ConsoleContext, user: ConsoleUser, client: str) -> tuple[str, str]:
    """Create a server-side session; returns (signed cookie value, CSRF token)."""
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    ctx.store.end_sessions()  # drops the expired ones, so the table does not grow with every login
    ctx.store.add_session(sid, user.id, csrf, client, time.time() + ctx.config.http.session_max_age_s)
    return _serializer(ctx).dumps(sid), csrf
