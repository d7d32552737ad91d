"""User administration (admin only): ``/users`` and ``/api/v1/users`` (node/console/users.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel

from node.console import users
from node.console.auth import Principal, Role, client_address, require
from node.console.context import ConsoleContext, get_ctx
from node.console.web import render

router = APIRouter()
_admin = require(Role.ADMIN)


class UserCreate(BaseModel):
    username: str
    role: str
    password: str | None = None  #: None: a one-time password is made and answered


class UserChange(BaseModel):
    role: str | None = None


class PasswordReset(BaseModel):
    password: str | None = None  #: None: a one-time password that must be changed at next login


def _do(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise HTTPException(404 if str(exc).startswith("no user") else 400, str(exc)) from None


@router.get("/api/v1/users", tags=["users"])
def users_list(_p: Principal = Depends(_admin), ctx: ConsoleContext = Depends(get_ctx)) -> list[dict[str, Any]]:
    return users.list_users(ctx.store)


@router.post("/api/v1/users", tags=["users"], status_code=201)
def users_add(body: UserCreate, request: Request, p: Principal = Depends(_admin),
              ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Create a user; without a password the answer holds a one-time password (shown once)."""
    pw = _do(users.add_user, ctx.store, body.username, body.role, body.password, by=p.username,
             client=client_address(request))
    return {"username": body.username.strip(), "role": body.role, "one_time_password": pw}


@router.patch("/api/v1/users/{username}", tags=["users"])
def users_change(username: str, body: UserChange, request: Request, p: Principal = Depends(_admin),
                 ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    if body.role is None:
        raise HTTPException(400, "nothing to change (role)")
    _do(users.set_role, ctx.store, username, body.role, by=p.username, client=client_address(request))
    return {"username": username, "role": body.role}


@router.post("/api/v1/users/{username}/password", tags=["users"])
def users_password(username: str, body: PasswordReset, request: Request, p: Principal = Depends(_admin),
                   ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Set another user's password (ends their sessions); without one, a one-time password is answered."""
    pw = _do(users.set_password, ctx.store, username, body.password, by=p.username, client=client_address(request))
    return {"username": username, "one_time_password": pw}


@router.delete("/api/v1/users/{username}", tags=["users"])
def users_remove(username: str, request: Request, p: Principal = Depends(_admin),
                 ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    if username == p.username:
        raise HTTPException(400, "you cannot remove yourself")
    _do(users.remove_user, ctx.store, username, by=p.username, client=client_address(request))
    return {"removed": username}


def _page(request: Request, ctx: ConsoleContext, **extra: Any) -> Response:
    status = extra.pop("status_code", 200)
    return render(request, "users.html", {"users": users.list_users(ctx.store), "roles": [r.label for r in Role],
                                          "title": "Users", **extra}, status_code=status)


@router.get("/users", include_in_schema=False)
def users_page(request: Request, _p: Principal = Depends(_admin), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return _page(request, ctx)


def _page_action(request: Request, ctx: ConsoleContext, fn: Any, *args: Any, done: str, **kwargs: Any) -> Response:
    try:
        result = fn(*args, **kwargs)
    except ValueError as exc:
        return _page(request, ctx, error=str(exc), status_code=400)
    extra = {"one_time": result} if isinstance(result, str) else {}
    return _page(request, ctx, flash=done, **extra)


@router.post("/users", include_in_schema=False)
def users_add_page(request: Request, username: str = Form(""), role: str = Form("viewer"),
                   p: Principal = Depends(_admin), ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return _page_action(request, ctx, users.add_user, ctx.store, username, role, None, by=p.username,
                        client=client_address(request), done=f"User {username} added with a one-time password.")


@router.post("/users/{username}/role", include_in_schema=False)
def users_role_page(username: str, request: Request, role: str = Form(""), p: Principal = Depends(_admin),
                    ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return _page_action(request, ctx, users.set_role, ctx.store, username, role, by=p.username,
                        client=client_address(request), done=f"{username} is now {role}.")


@router.post("/users/{username}/password", include_in_schema=False)
def users_password_page(username: str, request: Request, p: Principal = Depends(_admin),
                        ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return _page_action(request, ctx, users.set_password, ctx.store, username, None, by=p.username,
                        client=client_address(request), done=f"New one-time password for {username}.")


@router.post("/users/{username}/remove", include_in_schema=False)
def users_remove_page(username: str, request: Request, p: Principal = Depends(_admin),
                      ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    if username == p.username:
        return _page(request, ctx, error="You cannot remove yourself.", status_code=400)
    return _page_action(request, ctx, users.remove_user, ctx.store, username, by=p.username,
                        client=client_address(request), done=f"User {username} removed.")
