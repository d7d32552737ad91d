"""Rule administration in the console: the live rule file with its version, validation against
the node (every problem at its line), dry runs of a draft (stored series, the last N received,
an uploaded folder), apply, history with diffs, rollback, reorder, enable/disable
(node/rules_admin.py, node/rules_dryrun.py).

Roles: a viewer reads and validates; an operator also dry-runs; only an admin changes the file.
Every change is audited (``rules.apply``, ``rules.rollback``, ``rules.reorder``, ``rules.enable``,
``rules.disable``) with the version, the one it replaced, the comment and the diff.
JSON under ``/api/v1/rules``; the page is ``/rules`` (its forms post to ``/rules/...``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from node.console.auth import Principal, Role, client_address, require
from node.console.context import ConsoleContext, get_ctx
from node.console.web import redirect_with_message, render
from node.errors import InputError
from node.routing.rules import RuleSet, RulesError, parse_rules
from node.rules_admin import (
    ApplyOutcome,
    NotFound,
    RulesAdmin,
    RulesConflict,
    RulesInvalid,
    Validation,
    replace_rule_text,
    rule_block,
)
from node.rules_dryrun import DryRun, dry_run, facts_for_folder, facts_for_recent, facts_for_series

router = APIRouter()
_viewer = require(Role.VIEWER)
_operator = require(Role.OPERATOR)
_admin = require(Role.ADMIN)

#: what an upload may hold: files, and bytes kept of each (headers only: pixel data comes last)
MAX_UPLOAD_FILES = 2000
HEADER_BYTES = 4 << 20
#: the most series one dry run looks at
MAX_DRY_RUN_SERIES = 200
#: audit detail: the diff, cut to this many characters
AUDIT_DIFF_CHARS = 20000


def admin_of(request: Request, ctx: ConsoleContext) -> RulesAdmin:
    """One :class:`RulesAdmin` per app (its lock serialises applies); a change reloads the node's rules."""
    admin: RulesAdmin | None = getattr(request.app.state, "rules_admin", None)
    if admin is None:
        node = ctx.node
        admin = RulesAdmin(ctx.config, ctx.store, on_applied=node.reload_rules if node is not None else None)
        request.app.state.rules_admin = admin
    return admin


def _loaded(ctx: ConsoleContext) -> dict[str, Any]:
    """The rules the running node uses now (they differ from the file while a hand edit is broken)."""
    held = ctx.node.rules_in_force() if ctx.node is not None else None
    if held is None:
        return {"version": None, "rules": None, "error": None}
    rs = held.ruleset
    return {"version": rs.version, "rules": len(rs), "error": held.last_error}


def _rules_table(rs: RuleSet | None) -> list[dict[str, Any]]:
    if rs is None:
        return []
    return [{"position": k + 1, "name": r.name, "line": r.line, "enabled": r.enabled, "profile": r.profile,
             "backend": r.backend, "destinations": list(r.destinations), "stop": r.stop, "share": r.share,
             "description": r.description} for k, r in enumerate(rs.rules)]


def _audit(request: Request, ctx: ConsoleContext, p: Principal, action: str, out: ApplyOutcome) -> None:
    if not out.changed or out.version is None:
        return
    ctx.store.add_audit(action, username=p.username, client=client_address(request),
                        target=f"rules {out.version.version[:12]}",
                        detail={"version": out.version.version, "version_id": out.version.id,
                                "previous_version": out.previous_version, "comment": out.version.comment,
                                "path": out.version.path, "diff": out.diff[:AUDIT_DIFF_CHARS]})


def _change(request: Request, ctx: ConsoleContext, p: Principal, action: str,
            fn: Callable[[RulesAdmin], ApplyOutcome]) -> ApplyOutcome:
    """Run a change for the API: invalid 422 (with every issue), stale 409, unknown 404, else 400."""
    try:
        out = fn(admin_of(request, ctx))
    except RulesInvalid as exc:
        raise HTTPException(422, {"message": str(exc), "validation": exc.validation.to_json()}) from None
    except RulesConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except InputError as exc:
        raise HTTPException(400, str(exc)) from None
    _audit(request, ctx, p, action, out)
    return out


def _live_rules(admin: RulesAdmin) -> RuleSet | None:
    try:
        return parse_rules(admin.live().text.encode())
    except (RulesError, InputError):
        return None


def _dry_run(request: Request, ctx: ConsoleContext, text: str | None, uids: list[str], last: int | None,
             folder: Path | None = None, calling_ae: str | None = None) -> tuple[Validation, DryRun | None]:
    admin = admin_of(request, ctx)
    live = admin.live()
    validation = admin.validate(live.text if text is None else text)
    if not validation.ok or validation.ruleset is None:
        return validation, None
    errors: list[str] = []
    if folder is not None:
        try:
            targets = facts_for_folder(folder, calling_ae or None)
        except InputError as exc:
            raise HTTPException(400, f"no series in the upload: {exc.message}") from None
    elif uids:
        targets, errors = facts_for_series(ctx.store, uids[:MAX_DRY_RUN_SERIES])
    else:
        n = last or 10
        if not 1 <= n <= MAX_DRY_RUN_SERIES:
            raise HTTPException(400, f"last must be 1..{MAX_DRY_RUN_SERIES}")
        targets, errors = facts_for_recent(ctx.store, n)
    return validation, dry_run(validation.ruleset, targets[:MAX_DRY_RUN_SERIES], ctx.config,
                               live=_live_rules(admin), errors=errors)


async def _save_upload(files: list[UploadFile], folder: Path) -> int:
    """Write the first :data:`HEADER_BYTES` of each uploaded file under ``folder``; returns the count."""
    n = 0
    for k, f in enumerate(files[:MAX_UPLOAD_FILES]):
        data = await f.read(HEADER_BYTES)
        (folder / f"{k:05d}.dcm").write_bytes(data)
        n += 1
    return n


# ------------------------------------------------------------------------------------ API


class TextBody(BaseModel):
    text: str = Field(description="the whole rule file")


class ApplyBody(BaseModel):
    text: str = Field(description="the whole rule file, or one rule's text with `rule`")
    rule: str | None = Field(None, description="replace only this rule's text (as GET /api/v1/rules/{name} gives it)")
    comment: str | None = None
    expected_version: str | None = Field(None, description="refuse (409) unless this version is live")


class DryRunBody(BaseModel):
    text: str | None = Field(None, description="the draft (default: the live file)")
    series_uids: list[str] = Field(default_factory=list, description="stored series")
    last: int | None = Field(None, description="else the N series received last (default 10)")


class ChangeBody(BaseModel):
    comment: str | None = None
    expected_version: str | None = None


class OrderBody(ChangeBody):
    order: list[str] = Field(description="every rule name once, in the new order")


class MoveBody(ChangeBody):
    position: int = Field(description="1 = first")


class RollbackBody(ChangeBody):
    pass


@router.get("/api/v1/rules", tags=["rules"])
def rules_live(request: Request, _p: Principal = Depends(_viewer),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """The live rule file: text, version, validation against the node, its rules, and the version the
    running node has loaded."""
    try:
        live = admin_of(request, ctx).live()
    except InputError as exc:
        raise HTTPException(404, str(exc)) from None
    return {**live.to_json(), "loaded": _loaded(ctx), "rules": _rules_table(live.validation.ruleset)}


@router.get("/api/v1/rules/rule/{name}", tags=["rules"])
def rule_text(name: str, request: Request, _p: Principal = Depends(_viewer),
              ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """One rule's text as written in the live file, and its first line."""
    live = admin_of(request, ctx).live()
    try:
        line, text = rule_block(live.text, name)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except InputError as exc:
        raise HTTPException(400, str(exc)) from None
    return {"name": name, "line": line, "text": text, "version": live.version}


@router.post("/api/v1/rules/validate", tags=["rules"])
def rules_validate(body: TextBody, request: Request, _p: Principal = Depends(_viewer),
                   ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Check a draft against this node: every error and warning with its line and column."""
    return admin_of(request, ctx).validate(body.text).to_json()


@router.post("/api/v1/rules/dry-run", tags=["rules"])
def rules_dry_run(body: DryRunBody, request: Request, _p: Principal = Depends(_operator),
                  ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """What a draft would do with stored series (or the last N), per rule and condition; changes nothing.
    A draft with errors: 422 with the validation."""
    validation, result = _dry_run(request, ctx, body.text, body.series_uids, body.last)
    if result is None:
        raise HTTPException(422, {"message": "the draft has errors", "validation": validation.to_json()})
    return {"validation": validation.to_json(), **result.to_json()}


@router.post("/api/v1/rules/dry-run/upload", tags=["rules"])
async def rules_dry_run_upload(request: Request, _p: Principal = Depends(_operator),
                               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Dry run against uploaded DICOM files (multipart: ``files`` repeated, optional ``text`` and
    ``calling_ae``); only their headers are read, nothing is kept."""
    form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=100)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise HTTPException(400, "no files uploaded (multipart field 'files')")
    text = form.get("text")
    ae = form.get("calling_ae")
    with tempfile.TemporaryDirectory(prefix="dn-dry-run-") as tmp:
        await _save_upload(files, Path(tmp))
        validation, result = await run_in_threadpool(_dry_run, request, ctx, text if isinstance(text, str) and text.strip() else None, [],
                                      None, Path(tmp), ae if isinstance(ae, str) else None)
    if result is None:
        raise HTTPException(422, {"message": "the draft has errors", "validation": validation.to_json()})
    return {"validation": validation.to_json(), **result.to_json()}


@router.post("/api/v1/rules/apply", tags=["rules"])
def rules_apply(body: ApplyBody, request: Request, p: Principal = Depends(_admin),
                ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Validate and make live (atomic write, version recorded, node reloaded). 422: errors, nothing
    written; 409: the live file is not ``expected_version``."""
    def run(admin: RulesAdmin) -> ApplyOutcome:
        text = body.text
        if body.rule:
            text = replace_rule_text(admin.live().text, body.rule, body.text)
        return admin.apply(text, user=p.username, comment=body.comment, expected_version=body.expected_version)
    return _change(request, ctx, p, "rules.apply", run).to_json()


@router.get("/api/v1/rules/history", tags=["rules"])
def rules_history(request: Request, limit: int = 50, offset: int = 0, _p: Principal = Depends(_viewer),
                  ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Applied versions, newest first, each with who, when, why and its diff against the one before."""
    limit = max(1, min(limit, 500))
    entries = admin_of(request, ctx).history(limit, max(0, offset))
    return {"versions": [e.to_json() for e in entries], "limit": limit, "offset": offset}


@router.get("/api/v1/rules/versions/{version_id}", tags=["rules"])
def rules_version(version_id: int, request: Request, _p: Principal = Depends(_viewer),
                  ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """One recorded version with its whole text."""
    row = ctx.store.get_rule_version(version_id)
    if row is None:
        raise HTTPException(404, f"no recorded rule version #{version_id}")
    return {"id": row.id, "version": row.version, "text": row.text, "applied_by": row.applied_by,
            "applied_at": row.applied_at, "action": row.action, "comment": row.comment, "path": row.path}


@router.get("/api/v1/rules/diff", tags=["rules"])
def rules_diff(request: Request, a: str | None = None, b: str | None = None, _p: Principal = Depends(_viewer),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Unified diff of two recorded versions (id or hash prefix); ``b`` absent: against the live file."""
    try:
        return {"a": a, "b": b, "diff": admin_of(request, ctx).diff(a, b)}
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except InputError as exc:
        raise HTTPException(400, str(exc)) from None


@router.post("/api/v1/rules/versions/{version_id}/rollback", tags=["rules"])
def rules_rollback(version_id: int, body: RollbackBody, request: Request, p: Principal = Depends(_admin),
                   ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Make a recorded version live again (validated against the node as it is now)."""
    return _change(request, ctx, p, "rules.rollback", lambda a: a.rollback(
        version_id, user=p.username, comment=body.comment, expected_version=body.expected_version)).to_json()


@router.post("/api/v1/rules/order", tags=["rules"])
def rules_order(body: OrderBody, request: Request, p: Principal = Depends(_admin),
                ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Put the rules in a new order (comments above a rule move with it)."""
    return _change(request, ctx, p, "rules.reorder", lambda a: a.reorder(
        body.order, user=p.username, comment=body.comment, expected_version=body.expected_version)).to_json()


@router.post("/api/v1/rules/rule/{name}/move", tags=["rules"])
def rules_move(name: str, body: MoveBody, request: Request, p: Principal = Depends(_admin),
               ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """Move one rule to a position (1 = first)."""
    return _change(request, ctx, p, "rules.reorder", lambda a: a.move(
        name, body.position, user=p.username, comment=body.comment,
        expected_version=body.expected_version)).to_json()


@router.post("/api/v1/rules/rule/{name}/enable", tags=["rules"])
def rules_enable(name: str, body: ChangeBody, request: Request, p: Principal = Depends(_admin),
                 ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """``enabled: true`` on one rule."""
    return _change(request, ctx, p, "rules.enable", lambda a: a.set_enabled(
        name, True, user=p.username, comment=body.comment, expected_version=body.expected_version)).to_json()


@router.post("/api/v1/rules/rule/{name}/disable", tags=["rules"])
def rules_disable(name: str, body: ChangeBody, request: Request, p: Principal = Depends(_admin),
                  ctx: ConsoleContext = Depends(get_ctx)) -> dict[str, Any]:
    """``enabled: false`` on one rule: the router skips it, the file keeps it."""
    return _change(request, ctx, p, "rules.disable", lambda a: a.set_enabled(
        name, False, user=p.username, comment=body.comment, expected_version=body.expected_version)).to_json()


# ---------------------------------------------------------------------------------- pages


def _numbered(text: str, validation: Validation | None, first_line: int = 1) -> list[dict[str, Any]]:
    """The draft's lines with the issues at each (what the editor shows under the text area)."""
    at: dict[int, list[Any]] = {}
    for issue in validation.issues if validation is not None else ():
        at.setdefault(issue.line or first_line, []).append(issue)
    lines = text.splitlines() or [""]
    return [{"n": first_line + k, "text": ln, "issues": at.get(first_line + k, [])} for k, ln in enumerate(lines)]


def _page(request: Request, ctx: ConsoleContext, *, draft: str | None = None, rule: str | None = None,
          validation: Validation | None = None, result: DryRun | None = None, flash: str | None = None,
          error: str | None = None, status_code: int = 200, dry: dict[str, Any] | None = None) -> Response:
    admin = admin_of(request, ctx)
    live = admin.live()
    first = 1
    if rule:
        try:
            first, block = rule_block(live.text, rule)
        except InputError as exc:  # renamed or removed meanwhile, or a file the editor cannot split
            error = (error + " " if error else "") + str(exc)
            rule, block = None, None
        draft = block if draft is None else draft
    text = live.text if draft is None else draft
    if validation is not None and rule:  # the whole file was checked: name the errors outside this rule
        span = range(first, first + max(1, len(text.splitlines())))
        outside = [i for i in validation.errors if i.line not in span]
        if outside:
            error = (error + " " if error else "") + "Elsewhere in the file: " + "; ".join(
                f"line {i.line}: {i.message}" for i in outside)
    context = {
        "title": "Rules", "live": live, "loaded": _loaded(ctx), "rules": _rules_table(live.validation.ruleset),
        "history": admin.history(20), "draft": text, "rule": rule, "first_line": first,
        "validation": validation, "listing": _numbered(text, validation, first) if validation else None,
        "result": result, "flash": flash,
        "error": error, "dry": dry or {"last": 5, "uids": ""},
        "recent": ctx.store.recent_series(10),
    }
    return render(request, "rules.html", context, status_code=status_code)


@router.get("/rules", include_in_schema=False)
def rules_page(request: Request, edit: str | None = None, _p: Principal = Depends(_viewer),
               ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    try:
        return _page(request, ctx, rule=edit or None)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None


def _whole(admin: RulesAdmin, text: str, rule: str | None) -> str:
    return replace_rule_text(admin.live().text, rule, text) if rule else text


def _form_text(form: Any, key: str) -> str:
    v = form.get(key)
    return v.replace("\r\n", "\n") if isinstance(v, str) else ""


@router.post("/rules/validate", include_in_schema=False)
async def rules_validate_page(request: Request, _p: Principal = Depends(_viewer),
                              ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    form = await request.form()
    text, rule = _form_text(form, "text"), _form_text(form, "rule") or None
    admin = admin_of(request, ctx)
    try:
        v = await run_in_threadpool(lambda: admin.validate(_whole(admin, text, rule)))
    except InputError as exc:
        return _page(request, ctx, draft=text, rule=rule, error=str(exc), status_code=400)
    flash = None if v.errors else ("Valid" + (f", {len(v.warnings)} warning(s)" if v.warnings else "") + ".")
    return _page(request, ctx, draft=text, rule=rule, validation=v, flash=flash,
                 error=f"{len(v.errors)} error(s): nothing applied." if v.errors else None)


@router.post("/rules/dry-run", include_in_schema=False)
async def rules_dry_run_page(request: Request, _p: Principal = Depends(_operator),
                             ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=100)
    text, rule = _form_text(form, "text"), _form_text(form, "rule") or None
    uids = [u.strip() for u in _form_text(form, "series_uids").split() if u.strip()]
    last_s = _form_text(form, "last").strip()
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
    dry = {"last": last_s, "uids": " ".join(uids)}
    admin = admin_of(request, ctx)
    try:
        whole = _whole(admin, text, rule)
        last = int(last_s) if last_s else None
        if files:
            with tempfile.TemporaryDirectory(prefix="dn-dry-run-") as tmp:
                await _save_upload(files, Path(tmp))
                v, result = await run_in_threadpool(_dry_run, request, ctx, whole, [], None, Path(tmp), _form_text(form, "calling_ae"))
        else:
            v, result = await run_in_threadpool(_dry_run, request, ctx, whole, uids, last)
    except (InputError, ValueError) as exc:
        return _page(request, ctx, draft=text, rule=rule, error=str(exc), status_code=400, dry=dry)
    except HTTPException as exc:
        return _page(request, ctx, draft=text, rule=rule, error=str(exc.detail), status_code=exc.status_code, dry=dry)
    if result is None:
        return _page(request, ctx, draft=text, rule=rule, validation=v, dry=dry,
                     error=f"{len(v.errors)} error(s): fix them before a dry run.")
    return _page(request, ctx, draft=text, rule=rule, validation=v, result=result, dry=dry,
                 flash=f"Dry run of the draft on {len(result.series)} series: nothing was changed.")


def _redirect(request: Request, flash: str | None = None, error: str | None = None) -> Response:
    return redirect_with_message(request, "/rules", flash or error or "", ok=bool(flash))


def _page_change(request: Request, ctx: ConsoleContext, p: Principal, action: str,
                 fn: Callable[[RulesAdmin], ApplyOutcome], *, draft: str | None = None,
                 rule: str | None = None) -> Response:
    try:
        out = fn(admin_of(request, ctx))
    except RulesInvalid as exc:
        v = exc.validation
        return _page(request, ctx, draft=draft, rule=rule, validation=v, status_code=422,
                     error=f"Not applied: {len(v.errors)} error(s). The live file is unchanged.")
    except InputError as exc:
        if draft is not None:
            return _page(request, ctx, draft=draft, rule=rule, error=f"Not applied: {exc}", status_code=409
                         if isinstance(exc, RulesConflict) else 400)
        return _redirect(request, error=f"Not applied: {exc}")
    _audit(request, ctx, p, action, out)
    if not out.changed:
        return _redirect(request, flash="No change: the file already is this version.")
    assert out.version is not None
    return _redirect(request, flash=f"Applied version {out.version.version[:12]} (#{out.version.id}); the node uses it now.")


@router.post("/rules/apply", include_in_schema=False)
async def rules_apply_page(request: Request, p: Principal = Depends(_admin),
                           ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    form = await request.form()
    text, rule = _form_text(form, "text"), _form_text(form, "rule") or None
    comment, expected = _form_text(form, "comment") or None, _form_text(form, "expected_version") or None
    return await run_in_threadpool(_page_change, request, ctx, p, "rules.apply", lambda a: a.apply(
        _whole(a, text, rule), user=p.username, comment=comment, expected_version=expected), draft=text, rule=rule)


@router.post("/rules/rollback/{version_id}", include_in_schema=False)
async def rules_rollback_page(version_id: int, request: Request, p: Principal = Depends(_admin),
                              ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return await run_in_threadpool(_page_change, request, ctx, p, "rules.rollback", lambda a: a.rollback(version_id, user=p.username))


@router.post("/rules/rule/{name}/move", include_in_schema=False)
async def rules_move_page(name: str, request: Request, p: Principal = Depends(_admin),
                          ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    form = await request.form()
    try:
        position = int(_form_text(form, "position"))
    except ValueError:
        return _redirect(request, error="position must be a number")
    return await run_in_threadpool(_page_change, request, ctx, p, "rules.reorder", lambda a: a.move(name, position, user=p.username))


@router.post("/rules/rule/{name}/enable", include_in_schema=False)
async def rules_enable_page(name: str, request: Request, p: Principal = Depends(_admin),
                            ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return await run_in_threadpool(_page_change, request, ctx, p, "rules.enable", lambda a: a.set_enabled(name, True, user=p.username))


@router.post("/rules/rule/{name}/disable", include_in_schema=False)
async def rules_disable_page(name: str, request: Request, p: Principal = Depends(_admin),
                             ctx: ConsoleContext = Depends(get_ctx)) -> Response:
    return await run_in_threadpool(_page_change, request, ctx, p, "rules.disable", lambda a: a.set_enabled(name, False, user=p.username))
