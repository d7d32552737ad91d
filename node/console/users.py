"""User administration shared by the console (``/users``, ``/api/v1/users``) and the shell
(``dicom-node users``): add, set a password, change a role, remove; every change audited.  The
last admin can be neither removed nor demoted (nobody could administer the node after that).
"""

from __future__ import annotations

import secrets
from typing import Any

from node.console.auth import Role, check_new_password, create_user, hash_password
from node.store import Store

__all__ = ["add_user", "set_password", "set_role", "remove_user", "list_users", "one_time_password"]


def one_time_password() -> str:
    return secrets.token_urlsafe(12)


def _audit(store: Store, action: str, by: str, client: str, target: str, detail: dict[str, Any] | None = None) -> None:
    store.add_audit(action, username=by, client=client, target=f"user {target}", detail=detail)


def list_users(store: Store) -> list[dict[str, Any]]:
    """Users without their hashes: ``{username, role, must_change, created_at, updated_at}``."""
    return [{"username": u.username, "role": u.role, "must_change": u.must_change, "created_at": u.created_at,
             "updated_at": u.updated_at} for u in store.list_users()]


def add_user(store: Store, username: str, role: str, password: str | None, *, by: str, client: str) -> str | None:
    """Create a user; without ``password`` a one-time password is made (to change at first login) and
    returned.  Raises ``ValueError`` (bad name, role or password, name taken)."""
    r = Role.parse(role)
    temporary = password is None
    pw = one_time_password() if password is None else password
    create_user(store, username, r, pw, must_change=temporary)
    _audit(store, "user.add", by, client, username.strip(), {"role": r.label, "one_time_password": temporary})
    return pw if temporary else None


def set_password(store: Store, username: str, password: str | None, *, by: str, client: str,
                 must_change: bool | None = None) -> str | None:
    """Set a user's password (None: a one-time password, returned, that must be changed at next login)
    and end the user's sessions.  Raises ``ValueError``."""
    user = store.get_user(username)
    if user is None:
        raise ValueError(f"no user {username!r}")
    temporary = password is None
    pw = one_time_password() if password is None else password
    check_new_password(pw, username=username)
    store.update_user(username, password_hash=hash_password(pw), must_change=temporary if must_change is None else must_change)
    store.end_sessions(user_id=user.id)
    _audit(store, "user.password.reset", by, client, username, {"one_time_password": temporary})
    return pw if temporary else None


def _admins(store: Store) -> list[str]:
    return [u.username for u in store.list_users() if u.role == Role.ADMIN.label]


def set_role(store: Store, username: str, role: str, *, by: str, client: str) -> None:
    r = Role.parse(role)
    user = store.get_user(username)
    if user is None:
        raise ValueError(f"no user {username!r}")
    if user.role == Role.ADMIN.label and r != Role.ADMIN and _admins(store) == [username]:
        raise ValueError(f"{username} is the last admin: make another admin first")
    store.update_user(username, role=r.label)
    _audit(store, "user.role", by, client, username, {"from": user.role, "to": r.label})


def remove_user(store: Store, username: str, *, by: str, client: str) -> None:
    user = store.get_user(username)
    if user is None:
        raise ValueError(f"no user {username!r}")
    if user.role == Role.ADMIN.label and _admins(store) == [username]:
        raise ValueError(f"{username} is the last admin: make another admin first")
    store.remove_user(username)
    _audit(store, "user.remove", by, client, username, {"role": user.role})
