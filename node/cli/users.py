"""``dicom-node users add|passwd|list|remove``: the console's users from the shell (node/console/users.py).

The database is ``--db PATH`` or the one ``--config node.yaml`` names (no config: ``./var/node.db``);
it is created when missing, so users can be added before the first start.  A password is read from
the terminal (twice) or, with ``--password-stdin``, from the first line of standard input; without
one, ``add`` and ``passwd --one-time`` make a one-time password, printed once, that must be changed
at the first login.  Every change is audited as made by ``shell:<login name>``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from node.config import load_config
from node.errors import InputError
from node.store import Store


def _open(args: argparse.Namespace) -> Store:
    db = Path(args.db) if args.db else load_config(args.config).database_path
    return Store(db)


def _who() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return f"shell:{name}"


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise InputError("no password on standard input")
        return line
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise InputError("the passwords differ")
    return first


def _run(fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    try:
        return fn(*a, **kw)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _cmd_add(args: argparse.Namespace) -> int:
    from node.console import users

    password = None if args.one_time else _read_password(args)
    store = _open(args)
    try:
        pw = _run(users.add_user, store, args.name, args.role, password, by=_who(), client="shell")
    finally:
        store.close()
    print(f"user {args.name} added ({args.role})")
    if pw:
        print(f"one-time password (change it at the first login): {pw}")
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    from node.console import users

    password = None if args.one_time else _read_password(args)
    store = _open(args)
    try:
        pw = _run(users.set_password, store, args.name, password, by=_who(), client="shell")
    finally:
        store.close()
    print(f"password of {args.name} set; the user's sessions were ended")
    if pw:
        print(f"one-time password (change it at the next login): {pw}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from node.console import users

    store = _open(args)
    try:
        rows = users.list_users(store)
    finally:
        store.close()
    if not rows:
        print("no console users (the first start of `dicom-node serve` creates 'admin')")
        return 0
    print(f"{'user':<24} {'role':<9} {'password':<12} created")
    for u in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(u["created_at"]))
        print(f"{u['username']:<24} {u['role']:<9} {'must change' if u['must_change'] else 'set':<12} {created}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from node.console import users

    store = _open(args)
    try:
        _run(users.remove_user, store, args.name, by=_who(), client="shell")
    finally:
        store.close()
    print(f"user {args.name} removed")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("users", help="console users: add, passwd, list, remove")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=None, metavar="FILE", help="node.yaml (default: embedded defaults)")
    common.add_argument("--db", default=None, metavar="PATH", help="the node's database (default: from the config)")
    sub = p.add_subparsers(dest="users_command", metavar="SUBCOMMAND", required=True)
    add = sub.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument("--role", choices=("admin", "operator", "viewer"), default="viewer")
    add.set_defaults(func=_cmd_add)
    pw = sub.add_parser("passwd", parents=[common], help="set a user's password (ends the user's sessions)")
    pw.add_argument("name")
    pw.set_defaults(func=_cmd_passwd)
    for sp in (add, pw):
        src = sp.add_mutually_exclusive_group()
        src.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        src.add_argument("--one-time", action="store_true",
                         help="make a one-time password (printed once) to change at the first login")
    ls = sub.add_parser("list", parents=[common], help="list the users")
    ls.set_defaults(func=_cmd_list)
    rm = sub.add_parser("remove", parents=[common], help="remove a user with its sessions and tokens")
    rm.add_argument("name")
    rm.set_defaults(func=_cmd_remove)
