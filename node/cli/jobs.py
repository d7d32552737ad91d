"""``dicom-node jobs``: the operator's view of the store: list, show, retry and cancel jobs; list the
series (unrouted ones with their reason), re-run one or route an unrouted one with a chosen rule;
list the instances the receiver quarantined, release or delete one (the actions are
node/operations.py, as in the console, and go to the audit log as ``shell:<user>``).  The database
is ``--db PATH`` (or a ``postgresql://`` URL) or the one ``--config node.yaml`` names (no config:
``./var/node.db``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import time
from pathlib import Path
from typing import Callable

from node import operations
from node.config import NodeConfig, load_config
from node.contracts import DispatchState, JobState, SeriesState
from node.errors import InputError
from node.jobs import retry_job
from node.operations import Outcome
from node.store import Store
from node.store_db import is_postgres_url


def _open(args: argparse.Namespace) -> Store:
    if args.db and is_postgres_url(args.db):
        return Store(args.db, migrate=False)
    if not args.db:
        cfg = load_config(args.config)
        if cfg.store.postgres:
            return Store(cfg.database_url, migrate=False)
    db = Path(args.db) if args.db else load_config(args.config).database_path
    if not db.is_file():
        raise InputError("no node database here (has the node run with this configuration?)", path=db)
    return Store(db, migrate=False)


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _short(uid: str | None, n: int = 24) -> str:
    uid = uid or "-"
    return uid if len(uid) <= n else "..." + uid[-(n - 3):]


def _cmd_list(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        jobs = store.list_jobs(JobState(args.state) if args.state else None)
    finally:
        store.close()
    print(f"{'ID':>5}  {'STATE':<10} {'TRIES':>5}  {'RULE':<20} {'PROFILE':<9} {'GEN':>3}  {'SERIES':<26} "
          f"{'CREATED':<19}  ERROR / WARNING")
    for j in jobs:
        err = (j.error or "").replace("\n", " ")
        warnings = j.result.warnings
        if warnings and not err:  # delivered, but a sanity check failed (see jobs show)
            err = f"WARNING ({len(warnings)}): " + "; ".join(warnings)
        state = f"{j.state}/early" if j.provisional else j.state  # early start, not confirmed yet
        print(f"{j.id:>5}  {state:<10} {j.attempts:>2}/{j.max_attempts:<2}  {j.rule[:20]:<20} {j.profile[:9]:<9} "
              f"{j.generation:>3}  {_short(j.series_uid, 26):<26} {_ts(j.created_at):<19}  {err[:100]}")
    print(f"{len(jobs)} job(s)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        job = store.get_job(args.id)
        if job is None:
            raise InputError(f"no job {args.id}")
        dispatches = store.list_dispatches(job_id=job.id)
        attempts = store.dispatch_attempts(job_id=job.id)
        series = store.get_series(job.series_uid)
    finally:
        store.close()
    rows = [
        ("job", job.id), ("state", job.state), ("error", job.error or "-"),
        ("series", job.series_uid), ("generation", job.generation),
        ("series state", series.state if series else "-"),
        ("early start", "provisional (result held until the series is complete)" if job.provisional else "no"),
        ("instances", job.instances_digest or "-"),
        ("rule", job.rule), ("rules version", job.rules_version), ("profile", job.profile),
        ("backend", job.backend), ("attempts", f"{job.attempts}/{job.max_attempts}"),
        ("next attempt", _ts(job.next_attempt_at)), ("worker", job.worker or "-"),
        ("ran on", job.params.slot.where() if job.params.slot else "-"),
        ("created", _ts(job.created_at)), ("started", _ts(job.started_at)), ("finished", _ts(job.finished_at)),
        ("SEG series UID", job.seg_series_uid or "-"),
    ]
    for k, v in rows:
        print(f"{k + ':':<16} {v}")
    print(f"{'params:':<16} {json.dumps(job.params.to_json(), sort_keys=True)}")
    result = job.result.to_json()
    if result:
        print("result:")
        for k, v in sorted(result.items()):
            if isinstance(v, list):
                print(f"  {k}:")
                for item in v:
                    print(f"    {item}")
            else:
                print(f"  {k}: {json.dumps(v) if isinstance(v, dict) else v}")
    print(f"dispatches: {len(dispatches)}")
    for d in dispatches:
        print(f"  #{d.id} {d.kind}:{d.destination} {d.state} attempts={d.attempts} sent={_ts(d.sent_at)}"
              f"{' next=' + _ts(d.next_attempt_at) if d.state == DispatchState.PENDING and d.next_attempt_at else ''}"
              f"{' error=' + d.last_error if d.last_error else ''}")
        for a in (a for a in attempts if a["dispatch_id"] == d.id):
            # the location once: a DICOM detail already names the AE@host:port it stored at
            where = f" -> {a['location']}" if a["location"] and a["location"] not in (a["detail"] or "") else ""
            print(f"     attempt {a['attempt']} {_ts(a['finished_at'])} {a['outcome']}{where}: {a['detail']}")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        msg = retry_job(store, args.id)
    finally:
        store.close()
    print(msg)
    return 0 if ("re-queued" in msg) else 1


def _cmd_series(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        series = store.list_series(SeriesState(args.state) if args.state else None)
        refused = {s.series_uid: len(store.refused_instances(s.series_uid)) for s in series}
    finally:
        store.close()
    print(f"{'STATE':<10} {'GEN':>3} {'INST':>5}  {'MODALITY':<8} {'DESCRIPTION':<24} {'CALLING AE':<16} "
          f"{'LAST RECEIVED':<19}  SERIES / NOTE")
    for s in series:
        desc = str(s.tags.get("SeriesDescription", ""))[:24]
        notes = [s.error] if s.error else []
        if s.incomplete:
            notes.append("INCOMPLETE: processed without instances refused for want of space")
        if refused[s.series_uid]:
            notes.append(f"{refused[s.series_uid]} instance(s) refused for want of space, "
                         + ("not sent again" if s.incomplete else "waiting for them"))
        if s.conflicts:
            notes.append(f"{s.conflicts} instance(s) re-sent with other content")
        note = f"  ({'; '.join(notes)})" if notes else ""
        print(f"{s.state:<10} {s.generation:>3} {s.instance_count:>5}  {str(s.tags.get('Modality', ''))[:8]:<8} "
              f"{desc:<24} {(s.calling_ae or '-')[:16]:<16} {_ts(s.last_received_at):<19}  {s.series_uid}"
              f"{note[:300]}")
    print(f"{len(series)} series")
    return 0


def _cmd_quarantine(args: argparse.Namespace) -> int:
    from node.spool import read_quarantine

    folder = Path(args.db).parent / "quarantine" if args.db else load_config(args.config).quarantine_dir
    entries = read_quarantine(folder)
    print(f"{'RECEIVED':<20} {'CALLING AE':<16} {'PEER':<15} {'SIZE':>9}  REASON / SOP INSTANCE / FILE")
    for e in entries:
        size = f"{e.size}" if e.size is not None else "missing"
        print(f"{e.received_at:<20} {(e.calling or '-')[:16]:<16} {(e.peer or '-')[:15]:<15} {size:>9}  {e.reason}")
        print(f"{'':<63}  sop={e.sop or '-'}  file={e.path}  (name {e.path.name})")
    print(f"{len(entries)} quarantined instance(s) in {folder}")
    return 0


def _operate(args: argparse.Namespace, action: str, target: str, fn: Callable[[NodeConfig, Store], Outcome]) -> int:
    """Run one of node/operations.py's actions on the node's store, audit it, print what happened."""
    config = load_config(args.config)
    if args.db:
        config = config.model_copy(update={"storage": Path(args.db).parent})
    store = _open(args)
    try:
        out = fn(config, store)
        user = f"shell:{getpass.getuser()}"
        store.add_audit(action, username=user, client="shell", target=target,
                        detail={"ok": out.ok, "message": out.message, "job_id": out.job_id, **out.detail})
    finally:
        store.close()
    print(out.message)
    return 0 if out.ok else 1


def _cmd_cancel(args: argparse.Namespace) -> int:
    return _operate(args, "job.cancel", f"job {args.id}",
                    lambda _c, s: operations.cancel(s, args.id, by=f"shell:{getpass.getuser()}"))


def _cmd_rerun(args: argparse.Namespace) -> int:
    return _operate(args, "series.rerun", f"series {args.series}", lambda c, s: operations.rerun(
        c, s, args.series, rule=args.rule, profile=args.profile, by=f"shell:{getpass.getuser()}"))


def _cmd_route(args: argparse.Namespace) -> int:
    return _operate(args, "series.route", f"series {args.series}", lambda c, s: operations.route_now(
        c, s, args.series, args.rule, by=f"shell:{getpass.getuser()}"))


def _cmd_release(args: argparse.Namespace) -> int:
    return _operate(args, "quarantine.release", f"quarantine {args.name}",
                    lambda c, s: operations.release(c, s, args.name))


def _cmd_delete_quarantined(args: argparse.Namespace) -> int:
    return _operate(args, "quarantine.delete", f"quarantine {args.name}",
                    lambda c, _s: operations.delete_quarantined(c, args.name))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="list, show and retry the node's jobs; list its series and quarantine")
    sub = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", default=None, metavar="FILE", help="node.yaml (finds the database)")
        sp.add_argument("--db", default=None, metavar="PATH", help="the node database: a SQLite file or a postgresql:// URL (instead of --config)")

    lp = sub.add_parser("list", help="one line per job")
    lp.add_argument("--state", choices=[str(s) for s in JobState], default=None)
    common(lp)
    lp.set_defaults(func=_cmd_list)
    sp = sub.add_parser("show", help="everything about one job")
    sp.add_argument("id", type=int)
    common(sp)
    sp.set_defaults(func=_cmd_show)
    rp = sub.add_parser("retry", help="re-queue a failed job (or a done job's failed dispatches)")
    rp.add_argument("id", type=int)
    common(rp)
    rp.set_defaults(func=_cmd_retry)
    ser = sub.add_parser("series", help="the series the node knows (unrouted ones included)")
    ser.add_argument("--state", choices=[str(s) for s in SeriesState], default=None)
    common(ser)
    ser.set_defaults(func=_cmd_series)

    qp = sub.add_parser("quarantine", help="the instances the receiver refused, with the reason and the file")
    common(qp)
    qp.set_defaults(func=_cmd_quarantine)

    cp = sub.add_parser("cancel", help="cancel a queued or running job (failed: 'cancelled by ...'; retry brings it back)")
    cp.add_argument("id", type=int)
    common(cp)
    cp.set_defaults(func=_cmd_cancel)
    rr = sub.add_parser("rerun", help="a new job for a series with a rule of the rules in force and/or a profile")
    rr.add_argument("series", metavar="SERIES_UID")
    rr.add_argument("--rule", default=None)
    rr.add_argument("--profile", default=None)
    common(rr)
    rr.set_defaults(func=_cmd_rerun)
    ro = sub.add_parser("route", help="route an unrouted series now with a chosen rule")
    ro.add_argument("series", metavar="SERIES_UID")
    ro.add_argument("--rule", required=True)
    common(ro)
    ro.set_defaults(func=_cmd_route)
    rl = sub.add_parser("release", help="put a quarantined instance back into the spool (checked again as if received)")
    rl.add_argument("name", help="its file name as `jobs quarantine` lists it")
    common(rl)
    rl.set_defaults(func=_cmd_release)
    dq = sub.add_parser("delete-quarantined", help="delete a quarantined instance and its reason")
    dq.add_argument("name", help="its file name as `jobs quarantine` lists it")
    common(dq)
    dq.set_defaults(func=_cmd_delete_quarantined)

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
