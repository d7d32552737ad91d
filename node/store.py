"""The node's durable state: one SQLite database (WAL mode), shared by every thread and process.

The store is the only owner of state: every state change of an instance, series, job or
dispatch is one of its methods, a single conditional ``UPDATE`` or ``IMMEDIATE`` transaction,
so concurrent stages never take the same work twice.  The tables and their states are
described in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from node.contracts import (
    DispatchKind,
    DispatchState,
    JobParams,
    JobResult,
    JobState,
    Resource,
    SeriesState,
    SlotInfo,
)
from node.store_db import Connection, Engine, SQLiteEngine, open_engine, sqlite_add_column
from node.store_group import GroupCommit

__all__ = [
    "SCHEMA_VERSION",
    "InstanceRecord",
    "Instance",
    "Series",
    "Job",
    "Dispatch",
    "ConsoleUser",
    "RuleVersion",
    "Store",
    "instances_digest",
    "series_search_text",
    "SeriesQuery",
    "JobQuery",
    "Page",
]

SCHEMA_VERSION = 11

log = logging.getLogger("node.store")


class _UndoBatch(Exception):
    """Rolls back a :meth:`Store.record_instances` transaction in which one instance failed."""


def _in(values: Iterable[str]) -> str:
    return ",".join(f"'{v}'" for v in values)


# Each entry migrates from version i to i+1; never edit a shipped entry, append.
_MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid    TEXT NOT NULL,
        series_uid       TEXT NOT NULL,
        study_uid        TEXT NOT NULL,
        path             TEXT NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        size             INTEGER NOT NULL,
        sha256           TEXT,
        calling_ae       TEXT,
        called_ae        TEXT,
        peer_address     TEXT,
        received_at      REAL NOT NULL,
        last_received_at REAL NOT NULL,
        received_count   INTEGER NOT NULL DEFAULT 1,
        tags             TEXT NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE INDEX instances_path ON instances(path);

    CREATE TABLE series (
        series_uid           TEXT PRIMARY KEY,
        study_uid            TEXT NOT NULL,
        first_received_at    REAL NOT NULL,
        last_received_at     REAL NOT NULL,
        instance_count       INTEGER NOT NULL DEFAULT 0,
        state                TEXT NOT NULL DEFAULT 'receiving' CHECK (state IN ({_in(SeriesState)})),
        state_changed_at     REAL NOT NULL,
        generation           INTEGER NOT NULL DEFAULT 1,
        processed_generation INTEGER NOT NULL DEFAULT 0,
        calling_ae           TEXT,
        called_ae            TEXT,
        peer_address         TEXT,
        error                TEXT,
        tags                 TEXT NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX series_state ON series(state, last_received_at);

    CREATE TABLE jobs (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        series_uid      TEXT NOT NULL REFERENCES series(series_uid),
        rule            TEXT NOT NULL,
        profile         TEXT NOT NULL,
        backend         TEXT NOT NULL,
        rules_version   TEXT NOT NULL,
        generation      INTEGER NOT NULL,
        state           TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ({_in(JobState)})),
        error           TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL DEFAULT 3,
        next_attempt_at REAL,
        created_at      REAL NOT NULL,
        started_at      REAL,
        finished_at     REAL,
        worker          TEXT,
        params          TEXT NOT NULL DEFAULT '{{}}',
        result          TEXT NOT NULL DEFAULT '{{}}',
        seg_series_uid  TEXT,
        UNIQUE (series_uid, rule, rules_version, generation)
    );
    CREATE INDEX jobs_state ON jobs(state, next_attempt_at);
    CREATE INDEX jobs_series ON jobs(series_uid);

    CREATE TABLE dispatches (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id          INTEGER NOT NULL REFERENCES jobs(id),
        destination     TEXT NOT NULL,
        kind            TEXT NOT NULL CHECK (kind IN ('dicom','share')),
        state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ({_in(DispatchState)})),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_error      TEXT,
        created_at      REAL NOT NULL,
        sent_at         REAL,
        UNIQUE (job_id, destination, kind)
    );
    CREATE INDEX dispatches_state ON dispatches(state, next_attempt_at);
    """,
    # 1 -> 2: jobs.resource = the worker-pool slot kind a job needs ('cpu' | 'gpu'; NULL on rows
    # written before: the pool classifies them, claim_job falls back on the backend).  The ALTER
    # is applied only when the column is missing (see _add_column), so re-running it is harmless.
    "@add_column jobs resource TEXT",
    # 2 -> 3: one row per dispatch attempt: when, outcome, detail and where it went
    # (AE@host:port or share folder).  IF NOT EXISTS: earlier builds created it lazily.
    """
    CREATE TABLE IF NOT EXISTS dispatch_attempts (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        dispatch_id INTEGER NOT NULL,
        job_id      INTEGER NOT NULL,
        attempt     INTEGER NOT NULL,
        started_at  REAL NOT NULL,
        finished_at REAL NOT NULL,
        outcome     TEXT NOT NULL,
        detail      TEXT,
        location    TEXT
    );
    CREATE INDEX IF NOT EXISTS dispatch_attempts_dispatch ON dispatch_attempts(dispatch_id);
    CREATE INDEX IF NOT EXISTS dispatch_attempts_job ON dispatch_attempts(job_id)
    """,
    # 3 -> 4: early start (speculative processing of a series still inside its quiet period):
    # jobs.provisional = 1 while the series is not complete (its result is not published),
    # jobs.instances_digest = digest of the instance set a try ran on (series_digest).
    "@add_column jobs provisional INTEGER NOT NULL DEFAULT 0; @add_column jobs instances_digest TEXT",
    # 4 -> 5: the store stops knowing backends.  Until now claim_job derived the slot kind of a
    # row without ``resource`` (written before schema 2) from its backend at every claim; this
    # fills it once, the same way, with the model backends as they were at schema 4.  From here
    # on a row without ``resource`` is one the pool has not classified yet.
    "UPDATE jobs SET resource = CASE WHEN backend IN ('totalsegmentator','nnunet','monai') THEN 'gpu' ELSE 'cpu' END"
    " WHERE resource IS NULL",
    # 5 -> 6: dispatch kind 'outputs' (SR, overlay, Encapsulated STL of a rule's outputs,
    # beside the SEG's 'dicom').  SQLite cannot change a CHECK constraint: the table is rebuilt.
    f"""
    CREATE TABLE dispatches_v6 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id          INTEGER NOT NULL REFERENCES jobs(id),
        destination     TEXT NOT NULL,
        kind            TEXT NOT NULL CHECK (kind IN ('dicom','outputs','share')),
        state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ({_in(DispatchState)})),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_error      TEXT,
        created_at      REAL NOT NULL,
        sent_at         REAL,
        UNIQUE (job_id, destination, kind)
    );
    INSERT INTO dispatches_v6 (id, job_id, destination, kind, state, attempts, next_attempt_at, last_error,
                               created_at, sent_at)
        SELECT id, job_id, destination, kind, state, attempts, next_attempt_at, last_error, created_at, sent_at
        FROM dispatches;
    DROP TABLE dispatches;
    ALTER TABLE dispatches_v6 RENAME TO dispatches;
    CREATE INDEX dispatches_state ON dispatches(state, next_attempt_at)
    """,
    # 6 -> 7: hardening.  series.conflicts counts SOP instances re-sent with other
    # content; refused_instances: instances the receiver refused for want of resources (disk
    # full), until they are received after all: they hold the completion of their series;
    # series.incomplete = 1 once it was completed without them (after ``incomplete_series_wait_s``).
    "@add_column series conflicts INTEGER NOT NULL DEFAULT 0;"
    " @add_column series incomplete INTEGER NOT NULL DEFAULT 0;"
    " CREATE TABLE IF NOT EXISTS refused_instances (sop_instance_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL,"
    " study_uid TEXT, refused_at REAL NOT NULL, reason TEXT);"
    " CREATE INDEX IF NOT EXISTS refused_instances_series ON refused_instances(series_uid)",
    # 7 -> 8: the operations console (node/console/): its users (argon2 hashes), API tokens (SHA-256
    # of the token), browser sessions (server-side: logout and a password change end them), the
    # audit log of logins and changes, console settings (the cookie signing key) and the dispatch
    # pause per destination (honoured by node/dispatcher.py).
    """
    CREATE TABLE IF NOT EXISTS console_users (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        username      TEXT NOT NULL UNIQUE,
        role          TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        must_change   INTEGER NOT NULL DEFAULT 0,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS console_tokens (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id      INTEGER NOT NULL,
        name         TEXT NOT NULL,
        token_hash   TEXT NOT NULL UNIQUE,
        created_at   REAL NOT NULL,
        last_used_at REAL,
        revoked_at   REAL
    );
    CREATE INDEX IF NOT EXISTS console_tokens_user ON console_tokens(user_id);
    CREATE TABLE IF NOT EXISTS console_sessions (
        id           TEXT PRIMARY KEY,
        user_id      INTEGER NOT NULL,
        csrf         TEXT NOT NULL,
        client       TEXT,
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS console_sessions_user ON console_sessions(user_id);
    CREATE TABLE IF NOT EXISTS audit_log (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at       REAL NOT NULL,
        username TEXT,
        client   TEXT,
        action   TEXT NOT NULL,
        target   TEXT,
        detail   TEXT
    );
    CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log(action, at);
    CREATE TABLE IF NOT EXISTS console_settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS destination_state (
        name       TEXT PRIMARY KEY,
        paused     INTEGER NOT NULL DEFAULT 0,
        changed_at REAL,
        changed_by TEXT
    )
    """,
    # 8 -> 9: rule administration (node/rules_admin.py): every version of the routing rule file that
    # went live, its whole text, who applied it, when, why, and how (apply, rollback, reorder, enable,
    # disable, or found: a file edited outside the console, recorded before the next change).
    """
    CREATE TABLE IF NOT EXISTS rule_versions (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        version    TEXT NOT NULL,
        text       TEXT NOT NULL,
        applied_by TEXT NOT NULL,
        applied_at REAL NOT NULL,
        action     TEXT NOT NULL,
        comment    TEXT,
        path       TEXT
    );
    CREATE INDEX IF NOT EXISTS rule_versions_version ON rule_versions(version)
    """,
    # 9 -> 10: scale-out (several node processes sharing a PostgreSQL store).  jobs.lease_until: a
    # running job's claim holds until then (jobs.worker = the claimer, host:pid:slot); its node
    # renews it while the job runs, and any node puts it back in the queue once it has run out
    # (the claimer's host is gone).  node_leases: which node process does the store-wide periodic
    # work (completion and routing, retention) until when.  jobs_claim: claim_job's order, so a
    # claim reads the first due row instead of sorting the whole queue (claims per second).
    "@add_column jobs lease_until REAL;"
    " CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(state, lease_until);"
    " CREATE INDEX IF NOT EXISTS jobs_claim ON jobs(state, provisional, created_at, id);"
    " CREATE TABLE IF NOT EXISTS node_leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    " lease_until REAL NOT NULL, taken_at REAL NOT NULL)",
    # 10 -> 11: the console's series and job lists (filters, keyset pagination, fast at 100,000 jobs).
    # series.search = lower-case "PatientName|PatientID|AccessionNumber" of the series' tags (filled
    # by record_instance; here for the rows before), searched with LIKE; indexes for each filter in
    # list order (newest first: jobs by id, series by last receive); series_search covers the
    # LIKE scan (an index a fraction of the table's size); jobs.calling_ae = params.calling_ae (the
    # series' calling AE when it was routed), a column for its index.
    "@add_column series search TEXT;"
    " UPDATE series SET search = lower(coalesce(json_extract(tags, '$.PatientName'), '') || '|'"
    " || coalesce(json_extract(tags, '$.PatientID'), '') || '|' || coalesce(json_extract(tags, '$.AccessionNumber'), ''));"
    " CREATE INDEX IF NOT EXISTS series_search ON series(search, series_uid);"
    " CREATE INDEX IF NOT EXISTS series_received ON series(last_received_at, series_uid);"
    " CREATE INDEX IF NOT EXISTS series_state_received ON series(state, last_received_at, series_uid);"
    " CREATE INDEX IF NOT EXISTS series_calling ON series(calling_ae, last_received_at);"
    " CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs(state, id);"
    " CREATE INDEX IF NOT EXISTS jobs_rule_id ON jobs(rule, id);"
    " CREATE INDEX IF NOT EXISTS jobs_profile_id ON jobs(profile, id);"
    " CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);"
    " @add_column jobs calling_ae TEXT;"
    " UPDATE jobs SET calling_ae = json_extract(params, '$.calling_ae');"
    " CREATE INDEX IF NOT EXISTS jobs_calling_id ON jobs(calling_ae, id)",
)


# ---------------------------------------------------------------------------
# helpers


def _check_resource(value: str | None) -> Resource | None:
    if value is None:
        return None
    try:
        return Resource(value)
    except ValueError:
        raise ValueError(f"job resource must be one of {', '.join(Resource)} (got {value!r})") from None


def instances_digest(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 (16 hex) of a set of SOP Instance UIDs, order-independent (see :meth:`Store.series_digest`)."""
    uids = sorted(set(sop_instance_uids))
    h = hashlib.sha256(f"{len(uids)}\n".encode())
    for u in uids:
        h.update(u.encode() + b"\n")
    return h.hexdigest()[:16]


#: the SQLite ``@add_column`` step (tests build old SQLite schemas with it)
_add_column = sqlite_add_column


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern for "starts with ``prefix``" (its ``%`` and ``_`` taken literally is not needed:
    claimer names are host:pid[:slot], and a host name has neither)."""
    return prefix + "%"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


def series_search_text(tags: Mapping[str, Any]) -> str:
    """``series.search``: lower-case ``PatientName|PatientID|AccessionNumber`` of a series' tags."""
    def one(v: Any) -> str:
        if isinstance(v, Mapping):  # a PN in the DICOM JSON model
            v = v.get("Alphabetic") or ""
        return str(v or "").strip()

    return "|".join(one(tags.get(k)) for k in ("PatientName", "PatientID", "AccessionNumber")).lower()


def _like(text: str) -> str:
    """``text`` as a LIKE pattern that matches it anywhere (its own % and _ taken literally)."""
    esc = text.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{esc}%"


@dataclass(frozen=True)
class SeriesQuery:
    """Filters of :meth:`Store.series_page` (each None: any)."""

    state: Sequence[SeriesState] | None = None
    calling_ae: str | None = None
    since: float | None = None  #: last instance received at or after (epoch s)
    until: float | None = None  #: ... and before
    search: str | None = None  #: part of the patient name, patient ID or accession number


@dataclass(frozen=True)
class JobQuery:
    """Filters of :meth:`Store.jobs_page` (each None: any)."""

    state: Sequence[JobState] | None = None
    rule: str | None = None
    profile: str | None = None
    calling_ae: str | None = None  #: of the job's series when it was routed
    since: float | None = None  #: created at or after (epoch s)
    until: float | None = None  #: ... and before
    search: str | None = None  #: part of the series' patient name, patient ID or accession number
    series_uid: str | None = None


@dataclass(frozen=True)
class Page:
    """One page of a list, newest first; ``next`` is the cursor of the following page (None: last)."""

    items: list[Any]
    next: str | None


# ---------------------------------------------------------------------------
# row types


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about one stored instance (input of :meth:`Store.record_instance`)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    path: str
    transfer_syntax: str
    size: int
    calling_ae: str | None = None
    called_ae: str | None = None
    peer_address: str | None = None
    received_at: float | None = None  #: default: now
    sha256: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    path: str
    transfer_syntax: str
    size: int
    sha256: str | None
    calling_ae: str | None
    called_ae: str | None
    peer_address: str | None
    received_at: float
    last_received_at: float
    received_count: int
    tags: dict[str, Any]

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Instance":
        d = dict(r)
        d["tags"] = _loads(d["tags"])
        return cls(**d)


@dataclass(frozen=True)
class Series:
    series_uid: str
    study_uid: str
    first_received_at: float
    last_received_at: float
    instance_count: int
    state: SeriesState
    state_changed_at: float
    generation: int
    processed_generation: int
    calling_ae: str | None
    called_ae: str | None
    peer_address: str | None
    error: str | None
    tags: dict[str, Any]  #: rule tags of the first instance received
    conflicts: int = 0  #: SOP instances re-sent with different content (see ``duplicates`` in node.yaml)
    incomplete: bool = False  #: completed although instances refused for want of space never came again
    search: str | None = None  #: lower-case "PatientName|PatientID|AccessionNumber" (the console's search)

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Series":
        d = dict(r)
        d["tags"] = _loads(d["tags"])
        d["state"] = SeriesState(d["state"])
        d["incomplete"] = bool(d.get("incomplete"))
        return cls(**d)


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    rule: str
    profile: str
    backend: str
    rules_version: str
    generation: int
    state: JobState
    error: str | None
    attempts: int  #: tries started so far (claim_job increments it)
    max_attempts: int
    next_attempt_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    params: JobParams  #: the rule's parameters given to create_job (and the slot of the last try)
    result: JobResult  #: result paths given to complete_job (empty until then, or the early SEG)
    seg_series_uid: str | None
    resource: Resource | None = None  #: worker-pool slot kind (None: not classified yet)
    #: started early, before the series completed: its result is held until the router confirms it
    provisional: bool = False
    #: :meth:`Store.series_digest` of the instances the (last) try ran on
    instances_digest: str | None = None
    #: a running job's claim holds until then (epoch seconds; renewed by its node, see :meth:`Store.claim_job`)
    lease_until: float | None = None
    calling_ae: str | None = None  #: ``params.calling_ae`` as a column (the console's filter)

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Job":
        d = dict(r)
        d["state"] = JobState(d["state"])
        d["params"] = JobParams.from_json(_loads(d["params"]))
        d["result"] = JobResult.from_json(_loads(d["result"]))
        if d.get("resource") is not None:
            d["resource"] = Resource(d["resource"])
        if "provisional" in d:
            d["provisional"] = bool(d["provisional"])
        return cls(**d)


@dataclass(frozen=True)
class RuleVersion:
    """One version of the routing rule file that went live (:meth:`Store.add_rule_version`)."""

    id: int
    version: str  #: :func:`node.routing.rules.rules_version` of ``text``
    text: str
    applied_by: str
    applied_at: float
    action: str  #: apply | rollback | reorder | enable | disable | found
    comment: str | None
    path: str | None

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "RuleVersion":
        return cls(**dict(r))


@dataclass(frozen=True)
class Dispatch:
    id: int
    job_id: int
    destination: str
    kind: DispatchKind
    state: DispatchState
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    sent_at: float | None

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Dispatch":
        d = dict(r)
        d["kind"] = DispatchKind(d["kind"])
        d["state"] = DispatchState(d["state"])
        return cls(**d)


# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleUser:
    """A console user (node/console/): ``role`` is ``admin`` | ``operator`` | ``viewer``."""

    id: int
    username: str
    role: str
    password_hash: str
    must_change: bool
    created_at: float
    updated_at: float

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "ConsoleUser":
        return cls(int(r["id"]), r["username"], r["role"], r["password_hash"], bool(r["must_change"]),
                   float(r["created_at"]), float(r["updated_at"]))


class Store:
    """The job store on SQLite (a file, the embedded default) or PostgreSQL (several hosts).

    Thread-safe and multi-process-safe (see module docstring); on PostgreSQL also safe with
    several node processes on several hosts (node/store_db.py: the same statements, translated,
    with SQLite's write-lock semantics kept).

    Args:
        path: database file (its folder is created), ``sqlite:///path``, or a
            ``postgresql://`` URL; ``":memory:"`` is not supported (each thread
            would see its own database).
        busy_timeout_s: how long a writer waits for a lock before failing.
        migrate: run :meth:`migrate` on open (default True).
    """

    #: how long a job claim holds without renewal (the pool renews running jobs' claims every few seconds)
    JOB_LEASE_S = 60.0

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, migrate: bool = True) -> None:
        self.engine: Engine = open_engine(path, busy_timeout_s=busy_timeout_s)
        #: the SQLite file (for PostgreSQL: the URL without its password, for messages)
        self.path = Path(self.engine.path) if isinstance(self.engine, SQLiteEngine) else Path(self.engine.name)
        self.busy_timeout_s = busy_timeout_s
        # record_instance_grouped's batching (made on first use, again in a forked child)
        self._index_group: GroupCommit[InstanceRecord, Literal["new", "duplicate"]] | None = None
        self._index_group_pid = 0
        if migrate:
            self.migrate()

    @property
    def shared(self) -> bool:
        """True when several node processes on several hosts may share this store (PostgreSQL)."""
        return self.engine.postgres

    @property
    def url(self) -> str:
        """What the store is, for messages: the SQLite path or the PostgreSQL URL without password."""
        return self.engine.name

    # -- connections -----------------------------------------------------
    @property
    def conn(self) -> Connection:
        """This thread's connection (opened on first use, reopened after fork)."""
        conn: Connection = self.engine.conn
        return conn

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        self.engine.close()

    def defer_checkpoints(self) -> None:
        """This store's commits stop checkpointing SQLite's write-ahead log; the caller runs
        :meth:`checkpoint` every second or so from a thread of its own (the node does).

        SQLite checkpoints in whichever commit makes the log pass 1000 pages: that commit copies
        the log into the database file and syncs it while holding the write lock, so every few
        hundred received instances one C-STORE (and those queued behind it) waited for a sync of
        the database.  PostgreSQL: nothing to do.  Call it before other threads use the store
        (their connections opened before keep SQLite's default).
        """
        if isinstance(self.engine, SQLiteEngine):
            self.engine.defer_checkpoints()

    def checkpoint(self) -> None:
        """Checkpoint SQLite's write-ahead log without blocking writers (PostgreSQL: nothing to do)."""
        if isinstance(self.engine, SQLiteEngine):
            self.engine.checkpoint()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error); yields the connection.

        IMMEDIATE takes the write lock up front, so read-then-write sequences
        inside are atomic with respect to other processes (on PostgreSQL: other hosts too).
        """
        with self.engine.transaction() as c:
            yield c

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent.  Returns the schema version."""
        with self.transaction() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if row is None:
                c.execute("INSERT INTO schema_version(version) VALUES (0)")
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.url}: database schema version {current} is newer than this program ({SCHEMA_VERSION})"
                )
            for version in range(current, SCHEMA_VERSION):
                for stmt in _MIGRATIONS[version].split(";"):
                    if stmt.strip().startswith("@add_column"):
                        _, table, column, decl = stmt.split(None, 3)
                        self.engine.add_column(c, table, column, decl)
                    elif stmt.strip():
                        c.execute(stmt)
                self.engine.after_migration(c)
                c.execute("UPDATE schema_version SET version = ?", (version + 1,))
        return SCHEMA_VERSION

    def schema(self) -> dict[str, Any]:
        """Tables, columns (normalised type, not null), indexes and unique keys, for comparing engines."""
        return self.engine.schema()

    def schema_version(self) -> int:
        return int(self.conn.execute("SELECT version FROM schema_version").fetchone()[0])

    # -- instances -------------------------------------------------------
    def record_instance(self, rec: InstanceRecord) -> Literal["new", "duplicate"]:
        """Index one received instance; returns ``"new"`` or ``"duplicate"``.

        * new instance: inserted; its series is created (state ``receiving``,
          tags of this instance) or updated (``instance_count``,
          ``last_received_at``).  If the series had already left
          ``receiving`` (complete, routed, done, ...), it goes back to
          ``receiving`` with ``generation + 1`` and its still-queued jobs of
          older generations become ``superseded``: the completion sweep will
          complete it again after a new quiet period.
          While the series is ``receiving``, a finished early start (provisional job, done or
          failed) of the same generation goes back to ``queued``: it ran on fewer instances.
        * duplicate (same SOP Instance UID): ``received_count`` and
          ``last_received_at`` of the instance are bumped; the series clock is
          *not* restarted and nothing else changes.

        Either way a refusal of the instance for want of resources (:meth:`record_refusal`) is
        forgotten.
        """
        tags, search = self._instance_texts(rec)
        with self.transaction() as c:
            outcome = self._record_instance_in(c, rec, tags, search)
            c.execute("DELETE FROM refused_instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,))
        return outcome

    def record_instances(self, recs: Sequence[InstanceRecord]) -> list[Literal["new", "duplicate"] | Exception]:
        """Index several received instances in ONE transaction (group commit); one outcome per
        instance, in order: ``"new"``, ``"duplicate"`` or the exception its statements raised.

        The result is that of :meth:`record_instance` called for each instance in this order (a
        second copy of a SOP Instance UID in the same batch is a ``"duplicate"``), an instance
        that fails leaving no trace: when one fails, the transaction is rolled back and run again
        without it (rare; no savepoints, whose two extra statements per instance would each give
        the GIL away in a busy receiver).  Raises when the transaction as a whole fails (begin,
        commit, rollback); then nothing of it was committed.
        """
        out: list[Literal["new", "duplicate"] | Exception | None] = [None] * len(recs)
        texts: list[tuple[str, str] | None] = []
        for k, rec in enumerate(recs):  # before taking the write lock
            try:
                texts.append(self._instance_texts(rec))
            except Exception as exc:  # noqa: BLE001 - this instance's own failure, handed to its caller
                texts.append(None)
                out[k] = exc
        todo = [k for k, text in enumerate(texts) if text is not None]
        while todo:
            failed: tuple[int, Exception] | None = None
            try:
                with self.transaction() as c:
                    for k in todo:
                        text = texts[k]
                        assert text is not None
                        try:
                            out[k] = self._record_instance_in(c, recs[k], *text)
                        except Exception as exc:  # this instance's own failure: undo the batch, run it again without
                            failed = (k, exc)
                            raise _UndoBatch() from exc
                    # the refusals of all of them in one statement: nothing above reads that table
                    uids = [recs[k].sop_instance_uid for k in todo]
                    c.execute(f"DELETE FROM refused_instances WHERE sop_instance_uid IN ({','.join('?' * len(uids))})",
                              uids)
            except _UndoBatch:
                pass
            if failed is None:
                break
            out[failed[0]] = failed[1]  # the others again without it, as if it had never come
            todo.remove(failed[0])
        return [x if x is not None else RuntimeError("not indexed") for x in out]

    def record_instance_grouped(self, rec: InstanceRecord) -> Literal["new", "duplicate"]:
        """:meth:`record_instance` for many concurrent callers (the receiver's association threads):
        the instance joins the next batch of :meth:`record_instances` (node/store_group.py), and
        this returns (or raises) only when that batch has committed, with this instance's outcome.
        Not from inside :meth:`transaction` (the batch's leader would wait for that transaction's
        lock while this thread waits for the batch)."""
        group = self._index_group
        if group is None or self._index_group_pid != os.getpid():  # a forked child gets its own
            group = self._index_group = GroupCommit(self.record_instances, self.record_instance)
            self._index_group_pid = os.getpid()
        return group.submit(rec)

    @staticmethod
    def _instance_texts(rec: InstanceRecord) -> tuple[str, str]:
        """The tags as stored (JSON) and the series' search text, for :meth:`_record_instance_in`."""
        return json.dumps(dict(rec.tags), sort_keys=True), series_search_text(rec.tags)

    def _record_instance_in(self, c: Connection, rec: InstanceRecord, tags: str,
                            search: str) -> Literal["new", "duplicate"]:
        """The statements of :meth:`record_instance` but the refusal's, inside the caller's transaction.

        Three statements in the usual case (insert or count the duplicate; the series with its
        finished early starts counted; the series' update): each statement gives the GIL away
        and waits to get it back, which is what a C-STORE's index time is made of in a busy
        receiver (bench/README.md)."""
        now = rec.received_at if rec.received_at is not None else time.time()
        (count,) = c.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, study_uid, path,"
            " transfer_syntax, size, sha256, calling_ae, called_ae, peer_address, received_at,"
            " last_received_at, tags) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (sop_instance_uid) DO UPDATE SET received_count = instances.received_count + 1,"
            " last_received_at = excluded.last_received_at RETURNING received_count",
            (
                rec.sop_instance_uid,
                rec.sop_class_uid,
                rec.series_uid,
                rec.study_uid,
                str(rec.path),
                rec.transfer_syntax,
                rec.size,
                rec.sha256,
                rec.calling_ae,
                rec.called_ae,
                rec.peer_address,
                now,
                now,
                tags,
            ),
        ).fetchall()[0]  # fetchall: the statement runs to its end (SQLite)
        if count > 1:  # the row was there: a duplicate, counted
            return "duplicate"
        row = c.execute(
            "SELECT state, generation, (SELECT COUNT(*) FROM jobs WHERE jobs.series_uid = series.series_uid"
            " AND jobs.generation = series.generation AND provisional = 1 AND jobs.state IN (?, ?)) AS early"
            " FROM series WHERE series_uid = ?", (JobState.DONE, JobState.FAILED, rec.series_uid)).fetchone()
        if row is None:
            c.execute(
                "INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at,"
                " instance_count, state, state_changed_at, calling_ae, called_ae, peer_address, tags, search)"
                " VALUES (?,?,?,?,1,'receiving',?,?,?,?,?,?)",
                (
                    rec.series_uid,
                    rec.study_uid,
                    now,
                    now,
                    now,
                    rec.calling_ae,
                    rec.called_ae,
                    rec.peer_address,
                    tags,
                    search,
                ),
            )
        elif row["state"] == SeriesState.RECEIVING:
            # a series created by a refusal (record_refusal) has no tags until its first instance
            c.execute(
                "UPDATE series SET instance_count = instance_count + 1,"
                " last_received_at = MAX(last_received_at, ?),"
                " tags = CASE WHEN instance_count = 0 AND tags = '{}' THEN ? ELSE tags END,"
                " search = CASE WHEN instance_count = 0 AND tags = '{}' THEN ? ELSE search END"
                " WHERE series_uid = ?",
                (now, tags, search, rec.series_uid),
            )
            if row["early"]:
                # an early-started result of this generation no longer matches the series: run again
                stale = [r[0] for r in c.execute(
                    "SELECT id FROM jobs WHERE series_uid = ? AND generation = ? AND provisional = 1"
                    " AND state IN (?, ?)", (rec.series_uid, row["generation"], JobState.DONE, JobState.FAILED))]
                n = sum(self.requeue_job(job_id, "new instances arrived after an early start", counts_as_try=False,
                                         discard_result=True, from_states=(JobState.DONE, JobState.FAILED))
                        for job_id in stale)
                if n:
                    log.info("series %s: %d early-start result(s) discarded: new instances arrived; queued again",
                             rec.series_uid, n)
        else:
            c.execute(
                "UPDATE series SET instance_count = instance_count + 1,"
                " last_received_at = MAX(last_received_at, ?), state = 'receiving',"
                " state_changed_at = ?, generation = generation + 1, error = NULL WHERE series_uid = ?",
                (now, now, rec.series_uid),
            )
            c.execute(
                "UPDATE jobs SET state = 'superseded', finished_at = ?,"
                " error = 'new instances arrived for the series' WHERE series_uid = ? AND state = 'queued'",
                (now, rec.series_uid),
            )
        return "new"

    def record_conflict(self, series_uid: str, replacement: InstanceRecord | None = None) -> None:
        """Count a SOP instance re-sent with different content on its series; with ``replacement``
        (policy ``keep_last``: the file was already overwritten) the instance row takes the new
        copy's facts and the series counts it as a new arrival (its clock restarts; a series that
        had left ``receiving`` is received again with ``generation + 1``, as for a new instance)."""
        with self.transaction() as c:
            c.execute("UPDATE series SET conflicts = conflicts + 1 WHERE series_uid = ?", (series_uid,))
            if replacement is None:
                return
            rec = replacement
            now = rec.received_at if rec.received_at is not None else time.time()
            c.execute(
                "UPDATE instances SET received_count = received_count + 1, last_received_at = ?, size = ?,"
                " sha256 = ?, transfer_syntax = ?, tags = ?, calling_ae = ?, peer_address = ?"
                " WHERE sop_instance_uid = ?",
                (now, rec.size, rec.sha256, rec.transfer_syntax, json.dumps(dict(rec.tags), sort_keys=True),
                 rec.calling_ae, rec.peer_address, rec.sop_instance_uid),
            )
            c.execute(
                "UPDATE series SET last_received_at = MAX(last_received_at, ?),"
                " generation = generation + CASE WHEN state != 'receiving' THEN 1 ELSE 0 END,"
                " state_changed_at = CASE WHEN state != 'receiving' THEN ? ELSE state_changed_at END,"
                " error = CASE WHEN state != 'receiving' THEN NULL ELSE error END, state = 'receiving'"
                " WHERE series_uid = ?",
                (now, now, series_uid),
            )
            c.execute(
                "UPDATE jobs SET state = 'superseded', finished_at = ?,"
                " error = 'an instance of the series was replaced' WHERE series_uid = ? AND state = 'queued'",
                (now, series_uid),
            )

    def record_refusal(self, sop_instance_uid: str, series_uid: str, study_uid: str, reason: str,
                       *, now: float | None = None) -> None:
        """An instance refused for want of resources (disk full): its series is not completed until
        it is received after all (see :meth:`refused_instances`).  A series not seen before gets
        its row (``receiving``, no instances), so the instances that do arrive later wait for it."""
        t = now if now is not None else time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO refused_instances (sop_instance_uid, series_uid, study_uid, refused_at, reason)"
                " VALUES (?,?,?,?,?) ON CONFLICT(sop_instance_uid) DO UPDATE SET refused_at = excluded.refused_at,"
                " reason = excluded.reason",
                (sop_instance_uid, series_uid, study_uid, t, reason),
            )
            c.execute(
                "INSERT OR IGNORE INTO series (series_uid, study_uid, first_received_at, last_received_at,"
                " instance_count, state, state_changed_at, tags) VALUES (?,?,?,?,0,'receiving',?,'{}')",
                (series_uid, study_uid, t, t, t),
            )

    def refused_instances(self, series_uid: str) -> list[tuple[str, float, str]]:
        """``(SOP Instance UID, refused at, reason)`` of the series' instances refused for want of
        resources and not received since."""
        rows = self.conn.execute(
            "SELECT sop_instance_uid, refused_at, reason FROM refused_instances WHERE series_uid = ?"
            " ORDER BY refused_at", (series_uid,)).fetchall()
        return [(str(r[0]), float(r[1]), str(r[2] or "")) for r in rows]

    def mark_incomplete(self, series_uid: str) -> None:
        """The series was completed without instances refused for want of resources."""
        self.conn.execute("UPDATE series SET incomplete = 1 WHERE series_uid = ?", (series_uid,))

    def get_instance(self, sop_instance_uid: str) -> Instance | None:
        r = self.conn.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return Instance._from(r) if r else None

    def series_instances(self, series_uid: str) -> list[Instance]:
        """All instances of a series (ordered by path, i.e. by SOP Instance UID)."""
        rows = self.conn.execute(
            "SELECT * FROM instances WHERE series_uid = ? ORDER BY path", (series_uid,)
        ).fetchall()
        return [Instance._from(r) for r in rows]

    def indexed_paths(self) -> set[str]:
        """The spool paths of every indexed instance (for the startup rescan)."""
        return {r[0] for r in self.conn.execute("SELECT path FROM instances")}

    def count_instances(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    # -- series ----------------------------------------------------------
    def get_series(self, series_uid: str) -> Series | None:
        r = self.conn.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return Series._from(r) if r else None

    def list_series(self, state: SeriesState | Sequence[SeriesState] | None = None) -> list[Series]:
        """Series, optionally filtered by state(s), oldest first."""
        if state is None:
            rows = self.conn.execute("SELECT * FROM series ORDER BY first_received_at").fetchall()
        else:
            states = [state] if isinstance(state, str) else list(state)
            q = ",".join("?" * len(states))
            rows = self.conn.execute(
                f"SELECT * FROM series WHERE state IN ({q}) ORDER BY first_received_at", states
            ).fetchall()
        return [Series._from(r) for r in rows]

    def recent_series(self, limit: int) -> list[Series]:
        """The ``limit`` series received last (newest first)."""
        rows = self.conn.execute("SELECT * FROM series ORDER BY last_received_at DESC, series_uid LIMIT ?",
                                 (int(limit),)).fetchall()
        return [Series._from(r) for r in rows]

    def quiet_series(self, quiet_period_s: float, now: float | None = None) -> list[Series]:
        """Series still ``receiving`` whose last (persisted) receive is at least ``quiet_period_s`` old
        (and that hold an instance: a series of refused instances only has none)."""
        cutoff = (now if now is not None else time.time()) - quiet_period_s
        rows = self.conn.execute(
            "SELECT * FROM series WHERE state = 'receiving' AND last_received_at <= ? AND instance_count > 0"
            " ORDER BY last_received_at",
            (cutoff,),
        ).fetchall()
        return [Series._from(r) for r in rows]

    def complete_series(self, series_uid: str, *, quiet_period_s: float, now: float | None = None) -> bool:
        """Atomically mark a quiet series ``complete``.

        Succeeds only if the series is still ``receiving`` and still quiet, so
        an instance recorded between :meth:`quiet_series` and this call keeps
        the series open.  Returns True if this call completed it.
        """
        t = now if now is not None else time.time()
        cur = self.conn.execute(
            "UPDATE series SET state = 'complete', state_changed_at = ?"
            " WHERE series_uid = ? AND state = 'receiving' AND last_received_at <= ?",
            (t, series_uid, t - quiet_period_s),
        )
        return cur.rowcount == 1

    def set_series_state(
        self,
        series_uid: str,
        state: SeriesState | str,
        *,
        from_states: Sequence[SeriesState] | None = None,
        generation: int | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a series to ``state`` atomically; returns False if the condition did not hold.

        Args:
            from_states: only if the current state is one of these.
            generation: only if the series is still at this generation (so a
                stage working on generation N does not overwrite the state of
                a series that received more instances meanwhile).
            error: stored in ``series.error`` (cleared when None).
        """
        try:
            state = SeriesState(state)
        except ValueError:
            raise ValueError(f"unknown series state {state!r}") from None
        sql = "UPDATE series SET state = ?, state_changed_at = ?, error = ?"
        args: list[Any] = [state, time.time(), error]
        if state == SeriesState.DONE and generation is not None:
            sql += ", processed_generation = MAX(processed_generation, ?)"
            args.append(generation)
        sql += " WHERE series_uid = ?"
        args.append(series_uid)
        if from_states is not None:
            sql += f" AND state IN ({','.join('?' * len(from_states))})"
            args.extend(from_states)
        if generation is not None:
            sql += " AND generation = ?"
            args.append(generation)
        return self.conn.execute(sql, args).rowcount == 1

    # -- jobs ------------------------------------------------------------
    def create_job(
        self,
        series_uid: str,
        rule: str,
        *,
        profile: str,
        backend: str,
        rules_version: str,
        generation: int,
        max_attempts: int = 3,
        params: JobParams | None = None,
        resource: Resource | None = None,
        provisional: bool = False,
    ) -> tuple[int, bool]:
        """Queue a job; idempotent on (series_uid, rule, rules_version, generation).

        ``resource`` ('cpu' | 'gpu') is the worker-pool slot kind the job needs; None leaves it to
        the pool (:meth:`unclassified_jobs` / :meth:`set_job_resource`).  ``provisional``: an early
        start on a series still receiving (see :meth:`claim_job`, :meth:`confirm_job`).

        Returns ``(job_id, created)``; ``created`` is False when the job
        already existed (whatever its state), e.g. the router ran twice
        around a crash.
        """
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO jobs (series_uid, rule, profile, backend, rules_version, generation,"
                " max_attempts, params, created_at, resource, provisional, calling_ae) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (series_uid, rule, rules_version, generation) DO NOTHING",
                (
                    series_uid,
                    rule,
                    profile,
                    backend,
                    rules_version,
                    generation,
                    max_attempts,
                    json.dumps((params or JobParams()).to_json(), sort_keys=True),
                    time.time(),
                    _check_resource(resource),
                    int(bool(provisional)),
                    (params or JobParams()).calling_ae,
                ),
            )
            if cur.rowcount == 1:
                return int(cur.lastrowid or 0), True
            row = c.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND rule = ? AND rules_version = ? AND generation = ?",
                (series_uid, rule, rules_version, generation),
            ).fetchone()
            return int(row[0]), False

    def claim_job(self, worker: str, now: float | None = None, *,
                  kinds: Sequence[Resource] | None = None, early_quiet_s: float | None = None,
                  confirmed_only: bool = False, lease_s: float | None = None) -> Job | None:
        """Atomically take the oldest due ``queued`` job: state -> running, attempts + 1.

        Safe with many worker threads/processes and, on PostgreSQL, many hosts: exactly one
        caller gets each job (one conditional UPDATE; the candidate row is taken
        ``FOR UPDATE SKIP LOCKED``, so concurrent claimers take different jobs instead of
        queueing behind one).  Returns None when nothing is due.
        Confirmed jobs come before provisional ones.

        The claim is a lease: ``worker`` is the claimer and ``lease_until`` = now + ``lease_s``
        (default :attr:`JOB_LEASE_S`).  The claimer renews it while the job runs
        (:meth:`renew_job_leases`); once it has run out, :meth:`requeue_expired_jobs` (any node)
        puts the job back in the queue.

        Args:
            kinds: only jobs whose slot kind (``resource``: 'cpu' | 'gpu') is one of these;
                None: any job.  A job the pool has not classified yet (``resource`` NULL,
                see :meth:`unclassified_jobs`) is claimed only with None.
            early_quiet_s: a provisional job is due only while its series is still
                ``receiving`` and has been quiet for at least this long (so a series that is
                still arriving is not started again after every instance); None: provisional
                jobs are never claimed.
            confirmed_only: only non-provisional jobs.
        """
        t = now if now is not None else time.time()
        where = ""
        args: list[object] = []
        if kinds is not None:
            ks = [_check_resource(k) for k in kinds]
            if not ks:
                return None
            where = f" AND resource IN ({','.join('?' * len(ks))})"
            args = list(ks)
        if early_quiet_s is None or confirmed_only:
            where += " AND provisional = 0"
        else:
            where += (" AND (provisional = 0 OR EXISTS (SELECT 1 FROM series s WHERE s.series_uid = jobs.series_uid"
                      " AND s.state = 'receiving' AND s.generation = jobs.generation AND s.last_received_at <= ?))")
            args = [*args, t - float(early_quiet_s)]
        lease = self.JOB_LEASE_S if lease_s is None else float(lease_s)
        r = self.conn.execute(
            "UPDATE jobs SET state = 'running', started_at = ?, finished_at = NULL, attempts = attempts + 1,"
            " worker = ?, lease_until = ? WHERE state = 'queued' AND id = (SELECT id FROM jobs WHERE state = 'queued'"
            f" AND (next_attempt_at IS NULL OR next_attempt_at <= ?){where}"
            " ORDER BY provisional, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING *",
            (t, worker, t + lease, t, *args),
        ).fetchone()
        return Job._from(r) if r else None

    def renew_job_leases(self, worker_prefix: str, job_ids: Sequence[int], *, lease_s: float | None = None,
                         now: float | None = None) -> set[int]:
        """Extend the claims of ``job_ids`` still ``running`` under a claimer whose name starts with ``worker_prefix``
        (this node process); returns the ids renewed (a job missing from it is no longer ours)."""
        if not job_ids:
            return set()
        t = now if now is not None else time.time()
        lease = self.JOB_LEASE_S if lease_s is None else float(lease_s)
        q = ",".join("?" * len(job_ids))
        rows = self.conn.execute(
            f"UPDATE jobs SET lease_until = ? WHERE state = 'running' AND id IN ({q}) AND worker LIKE ?"
            " RETURNING id", (t + lease, *job_ids, _like_prefix(worker_prefix))).fetchall()
        return {int(r[0]) for r in rows}

    def requeue_expired_jobs(self, now: float | None = None) -> list[int]:
        """Running jobs whose claim ran out (their node process or host is gone) -> ``queued``, due at
        once, the try counted (as after a crash); returns their ids."""
        t = now if now is not None else time.time()
        rows = self.conn.execute(
            "UPDATE jobs SET state = 'queued', next_attempt_at = NULL, lease_until = NULL,"
            " error = 'interrupted: the claim of ' || COALESCE(worker, '?') || ' ran out (node gone)'"
            " WHERE state = 'running' AND lease_until IS NOT NULL AND lease_until < ? RETURNING id",
            (t,)).fetchall()
        return sorted(int(r[0]) for r in rows)

    def requeue_orphaned_jobs(self, host: str | None = None, *, now: float | None = None) -> list[int]:
        """At a node's start: running jobs that no live node process can finish -> ``queued`` (try
        counted).  On SQLite (one node) every running job; on a shared store those claimed on this
        host by a process that no longer exists, or claimed without a lease, or whose lease ran out
        (other hosts' live claims stay)."""
        if not self.shared:
            rows = self.conn.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = NULL, lease_until = NULL,"
                " error = 'interrupted (node restarted)' WHERE state = 'running' RETURNING id").fetchall()
            return sorted(int(r[0]) for r in rows)
        t = now if now is not None else time.time()
        me = host or socket.gethostname()
        gone: list[int] = []
        for r in self.conn.execute("SELECT id, worker, lease_until FROM jobs WHERE state = 'running'").fetchall():
            parts = str(r["worker"] or "").split(":")
            dead_here = len(parts) >= 2 and parts[0] == me and parts[1].isdigit() and not _pid_alive(int(parts[1]))
            if r["lease_until"] is None or float(r["lease_until"]) < t or dead_here:
                gone.append(int(r["id"]))
        return [j for j in gone if self.requeue_job(j, "interrupted (node restarted)", counts_as_try=True)]

    # -- store-wide periodic work ------------------------------------------
    def take_node_lease(self, name: str, holder: str, lease_s: float, *, now: float | None = None) -> bool:
        """Hold the store-wide lease ``name`` (e.g. ``"series"``: completion and routing) for
        ``lease_s`` more seconds; True if ``holder`` holds it now (it took a free or expired one, or
        renewed its own).  Exactly one node process does such work at a time; when its holder
        dies, another takes over once the lease has run out."""
        t = now if now is not None else time.time()
        row = self.conn.execute(
            "INSERT INTO node_leases (name, holder, lease_until, taken_at) VALUES (?,?,?,?)"
            " ON CONFLICT (name) DO UPDATE SET lease_until = excluded.lease_until,"
            " taken_at = CASE WHEN node_leases.holder = excluded.holder THEN node_leases.taken_at"
            " ELSE excluded.taken_at END, holder = excluded.holder"
            " WHERE node_leases.holder = excluded.holder OR node_leases.lease_until < ? RETURNING holder",
            (name, holder, t + lease_s, t, t)).fetchone()
        return row is not None

    def release_node_lease(self, name: str, holder: str) -> None:
        """Give a lease up (a clean stop), so another node takes the work over at once."""
        self.conn.execute("DELETE FROM node_leases WHERE name = ? AND holder = ?", (name, holder))

    def node_leases(self) -> list[tuple[str, str, float]]:
        """``(name, holder, lease_until)`` of every store-wide lease."""
        return [(str(r[0]), str(r[1]), float(r[2])) for r in self.conn.execute(
            "SELECT name, holder, lease_until FROM node_leases ORDER BY name").fetchall()]

    def series_digest(self, series_uid: str) -> str:
        """Identity of the series' current instance set: SHA-256 (16 hex) of its sorted SOP Instance UIDs.

        A result is only valid for the instance set it was computed from; an early-started job
        records this when it starts and is checked against it when it ends and at completion.
        """
        return instances_digest(r[0] for r in self.conn.execute(
            "SELECT sop_instance_uid FROM instances WHERE series_uid = ?", (series_uid,)))

    def set_job_digest(self, job_id: int, digest: str) -> None:
        """Record the instance set (:meth:`series_digest`) the running try of a job works on."""
        self.conn.execute("UPDATE jobs SET instances_digest = ? WHERE id = ?", (digest, job_id))

    def confirm_job(self, job_id: int) -> bool:
        """provisional -> confirmed (the series completed and the rule still matches); True if this call did it."""
        return self.conn.execute("UPDATE jobs SET provisional = 0 WHERE id = ? AND provisional = 1",
                                 (job_id,)).rowcount == 1

    def requeue_job(self, job_id: int, why: str, *, counts_as_try: bool, retry_at: float | None = None,
                    discard_result: bool = False, from_states: Sequence[JobState] = (JobState.RUNNING,)) -> bool:
        """Put a job back in the queue (``queued``, due at ``retry_at`` or at once); True if this call did it.

        Args:
            why: kept as the job's ``error`` (the reason the operator sees).
            counts_as_try: True keeps the try counted (a failed try retried with backoff, a try cut
                short by a crash of the node), so a job that fails every time still ends ``failed``
                after ``max_attempts``; False gives it back (``attempts - 1``): the node stopped it
                itself (shutdown, an early start whose input changed or whose slot went to a
                confirmed job).
            retry_at: when it is due again (epoch seconds); ``finished_at`` then records when the
                failed try ended.  None: due at once.
            discard_result: the result was computed on an instance set the series no longer has:
                result, SEG identity, instance digest and end time are cleared.  Otherwise the
                result stays: an early SEG already queued for its destinations is the instance the
                next try writes again.
            from_states: only from one of these states.
        """
        sets, args = "state = ?, error = ?, next_attempt_at = ?", [JobState.QUEUED, why, retry_at]
        if not counts_as_try:
            sets += ", attempts = MAX(attempts - 1, 0)"
        if discard_result:
            sets += ", finished_at = NULL, result = '{}', seg_series_uid = NULL, instances_digest = NULL"
        elif retry_at is not None:
            sets += ", finished_at = ?"
            args.append(time.time())
        q = ",".join("?" * len(from_states))
        return self.conn.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({q})",
                                 (*args, job_id, *from_states)).rowcount == 1

    def drop_job(self, job_id: int, why: str) -> bool:
        """A job that is no longer wanted (e.g. an early start whose rule does not match the complete
        series) -> ``superseded`` with the reason; a running one is stopped by the worker pool."""
        return self.conn.execute(
            "UPDATE jobs SET state = 'superseded', finished_at = ?, error = ?"
            " WHERE id = ? AND state IN ('queued', 'running', 'done')",
            (time.time(), why, job_id),
        ).rowcount == 1

    def unclassified_jobs(self) -> list[Job]:
        """Queued jobs whose ``resource`` is not set yet (the pool classifies them)."""
        rows = self.conn.execute(
            "SELECT * FROM jobs WHERE state = 'queued' AND resource IS NULL ORDER BY id").fetchall()
        return [Job._from(r) for r in rows]

    def set_job_resource(self, job_id: int, resource: str) -> bool:
        """Set the slot kind of a job that has none yet; False if it already had one."""
        return self.conn.execute("UPDATE jobs SET resource = ? WHERE id = ? AND resource IS NULL",
                                 (_check_resource(resource), job_id)).rowcount == 1

    def set_job_slot(self, job_id: int, slot: SlotInfo) -> None:
        """Record the slot and process the try that starts now runs in (``params.slot``)."""
        self.conn.execute("UPDATE jobs SET params = json_patch(params, ?) WHERE id = ?",
                          (json.dumps({"slot": slot.to_json()}, sort_keys=True), job_id))

    def set_job_early_seg(self, job_id: int, seg_early: Path, seg_series_uid: str) -> None:
        """Record the SEG a running job handed on before its meshes (``result.seg_early``)."""
        patch = {"seg_early": str(seg_early), "seg_series_uid": seg_series_uid}
        self.conn.execute("UPDATE jobs SET result = json_patch(result, ?) WHERE id = ?",
                          (json.dumps(patch, sort_keys=True), job_id))

    def complete_job(self, job_id: int, result: JobResult | None = None, *, claimer: str | None = None) -> bool:
        """running -> done with the result (and its SEG identity); False if the job was not running
        (or, with ``claimer``, not running under that claim: its lease ran out and another node
        claimed it, whose try is the one that counts)."""
        result = result or JobResult()
        cur = self.conn.execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, error = NULL, result = ?, seg_series_uid = ?"
            " WHERE id = ? AND state = 'running' AND (CAST(? AS TEXT) IS NULL OR worker = ?)",
            (time.time(), json.dumps(result.to_json(), sort_keys=True, default=str), result.seg_series_uid, job_id,
             claimer, claimer),
        )
        return cur.rowcount == 1

    def fail_job(self, job_id: int, error: str, *, retry_at: float | None = None,
                 claimer: str | None = None) -> JobState | None:
        """Record a failed try of a running job.

        With ``retry_at`` (epoch seconds) and attempts left, the job goes back to the queue
        (:meth:`requeue_job`, the try counted) and is due at ``retry_at``; otherwise it is
        ``failed``.  Returns the new state, or None if the job was not running (with ``claimer``:
        not running under that claim, see :meth:`complete_job`).
        """
        with self.transaction() as c:
            row = c.execute("SELECT state, attempts, max_attempts, worker FROM jobs WHERE id = ?",
                            (job_id,)).fetchone()
            if row is None or row["state"] != JobState.RUNNING or (claimer is not None and row["worker"] != claimer):
                return None
            if retry_at is not None and row["attempts"] < row["max_attempts"]:
                self.requeue_job(job_id, error, counts_as_try=True, retry_at=retry_at)
                return JobState.QUEUED
            c.execute("UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?",
                      (error, time.time(), job_id))
            return JobState.FAILED

    def supersede_results(self, job: Job) -> int | None:
        """Settle which generation's result of (series, rule) stands, now that ``job`` is done.

        In one transaction: when a newer generation already has a confirmed ``done`` result,
        ``job`` becomes ``superseded`` and that job's id is returned; otherwise the ``done``
        results of older generations become ``superseded`` and None is returned.
        """
        with self.transaction() as c:
            newer = c.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND rule = ? AND generation > ? AND state = 'done'"
                " AND provisional = 0",
                (job.series_uid, job.rule, job.generation),
            ).fetchone()
            if newer is not None:
                c.execute("UPDATE jobs SET state = 'superseded', error = ? WHERE id = ?",
                          (f"superseded by job {newer[0]} (newer generation)", job.id))
                return int(newer[0])
            c.execute(
                "UPDATE jobs SET state = 'superseded', error = ? WHERE series_uid = ? AND rule = ?"
                " AND generation < ? AND state = 'done'",
                (f"superseded by job {job.id} (generation {job.generation})", job.series_uid, job.rule,
                 job.generation),
            )
            return None

    def retry_failed(self, job_id: int) -> tuple[JobState | None, int]:
        """The operator's retry, in one transaction: a ``failed`` job goes back to ``queued`` with
        fresh attempts (and its failed series generation back to ``routed``); a ``done`` job's
        failed dispatches go back to ``pending`` with fresh attempts.

        Returns the job's state before (None: no such job) and how many dispatches were re-queued.
        """
        with self.transaction() as c:
            row = c.execute("SELECT state, series_uid, generation FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, 0
            state = JobState(row["state"])
            if state == JobState.FAILED:
                c.execute("UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = NULL, error = NULL,"
                          " finished_at = NULL WHERE id = ?", (job_id,))
                c.execute("UPDATE series SET state = 'routed', error = NULL, state_changed_at = ?"
                          " WHERE series_uid = ? AND generation = ? AND state = 'failed'",
                          (time.time(), row["series_uid"], row["generation"]))
                return state, 0
            if state == JobState.DONE:
                n = c.execute("UPDATE dispatches SET state = 'pending', next_attempt_at = NULL, attempts = 0"
                              " WHERE job_id = ? AND state = 'failed'", (job_id,)).rowcount
                return state, n
            return state, 0

    def cancel_job(self, job_id: int, why: str) -> JobState | None:
        """The operator's cancel: a ``queued`` or ``running`` job -> ``failed`` with ``why`` (the worker
        pool kills a running job's process within a second, see ``WorkerPool._check_running``; a
        failed job can be retried).  Returns the state before, or None when the job was not
        queued or running."""
        with self.transaction() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in (JobState.QUEUED, JobState.RUNNING):
                return None
            c.execute("UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, next_attempt_at = NULL"
                      " WHERE id = ?", (why, time.time(), job_id))
            return JobState(row[0])

    def supersede_jobs(self, series_uid: str, below_generation: int) -> int:
        """Mark queued jobs of older generations ``superseded``; returns how many."""
        return self.conn.execute(
            "UPDATE jobs SET state = 'superseded', finished_at = ? WHERE series_uid = ? AND state = 'queued'"
            " AND generation < ?",
            (time.time(), series_uid, below_generation),
        ).rowcount

    def get_job(self, job_id: int) -> Job | None:
        r = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job._from(r) if r else None

    def list_jobs(self, state: JobState | Sequence[JobState] | None = None, *,
                  series_uid: str | None = None) -> list[Job]:
        sql = "SELECT * FROM jobs WHERE 1=1"
        args: list[Any] = []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if series_uid is not None:
            sql += " AND series_uid = ?"
            args.append(series_uid)
        return [Job._from(r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    # -- the console's lists ---------------------------------------------
    def jobs_page(self, query: JobQuery = JobQuery(), *, limit: int = 50, after: str | None = None) -> Page:
        """Jobs matching ``query``, newest first, ``limit`` per page; ``after``: the ``next`` cursor of
        the previous page (keyset pagination: every page costs the same, however deep)."""
        where, args = self._job_filters(query)
        if after:
            where.append("j.id < ?")
            args.append(int(after))
        sql = ("SELECT j.* FROM jobs j" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY j.id DESC LIMIT ?")
        rows = self.conn.execute(sql, (*args, int(limit) + 1)).fetchall()
        items = [Job._from(r) for r in rows[:limit]]
        return Page(items, str(items[-1].id) if len(rows) > limit and items else None)

    #: a patient search matching at most this many series looks them up first (see _search_series)
    SEARCH_FEW = 1000

    def _search_series(self, text: str | None) -> list[str] | None:
        """The series whose ``search`` holds ``text`` when there are at most :data:`SEARCH_FEW` of
        them (a rare name or an ID: the lists then fetch those rows by key); None when there are
        more or no text (the list query filters as it reads in list order, where matches are dense)."""
        if not text or not text.strip():
            return None
        rows = self.conn.execute("SELECT series_uid FROM series WHERE search LIKE ? ESCAPE '\\' LIMIT ?",
                                 (_like(text), self.SEARCH_FEW + 1)).fetchall()
        return [r[0] for r in rows] if len(rows) <= self.SEARCH_FEW else None

    def _job_filters(self, q: JobQuery) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if q.state:
            where.append(f"j.state IN ({','.join('?' * len(q.state))})")
            args.extend(JobState(x) for x in q.state)
        for col, value in (("rule", q.rule), ("profile", q.profile), ("series_uid", q.series_uid)):
            if value:
                where.append(f"j.{col} = ?")
                args.append(value)
        if q.calling_ae:
            where.append("j.calling_ae = ?")
            args.append(q.calling_ae)
        if q.since is not None or q.until is not None:
            # ids grow with created_at: the ids of the range's first and last job bound it, so
            # the list is read in id order from there (``+``: created_at is checked, not indexed)
            cond, cargs = [], []
            if q.since is not None:
                cond.append("created_at >= ?")
                cargs.append(float(q.since))
            if q.until is not None:
                cond.append("created_at < ?")
                cargs.append(float(q.until))
            lo, hi = self.conn.execute(f"SELECT MIN(id), MAX(id) FROM jobs WHERE {' AND '.join(cond)}",
                                       cargs).fetchone()
            where.append("j.id BETWEEN ? AND ?")
            args.extend((lo if lo is not None else 0, hi if hi is not None else -1))
            where.extend(f"+j.{c}" for c in cond)
            args.extend(cargs)
        series_where: list[str] = []
        series_args: list[Any] = []
        found = self._search_series(q.search)
        if found is not None:  # few series: their jobs by index
            where.append(f"j.series_uid IN ({','.join('?' * len(found)) or 'NULL'})")
            args.extend(found)
        elif q.search and q.search.strip():  # many: filtered while the list is read in order
            series_where.append("s.search LIKE ? ESCAPE '\\'")
            series_args.append(_like(q.search))
        if series_where:
            # read the jobs in list order and look up each one's series (many match: the page fills
            # after a few rows), rather than every job of every matching series, then sorted
            where.append("EXISTS (SELECT 1 FROM series s WHERE s.series_uid = j.series_uid AND "
                         + " AND ".join(series_where) + ")")
            args.extend(series_args)
        return where, args

    def series_page(self, query: SeriesQuery = SeriesQuery(), *, limit: int = 50, after: str | None = None) -> Page:
        """Series matching ``query``, most recently received first, ``limit`` per page; ``after``: the
        ``next`` cursor of the previous page (``<last_received_at>|<series uid>``, keyset)."""
        where: list[str] = []
        args: list[Any] = []
        if query.state:
            where.append(f"state IN ({','.join('?' * len(query.state))})")
            args.extend(SeriesState(x) for x in query.state)
        if query.calling_ae:
            where.append("calling_ae = ?")
            args.append(query.calling_ae)
        if query.since is not None:
            where.append("last_received_at >= ?")
            args.append(float(query.since))
        if query.until is not None:
            where.append("last_received_at < ?")
            args.append(float(query.until))
        found = self._search_series(query.search)
        if found is not None:
            where.append(f"series_uid IN ({','.join('?' * len(found)) or 'NULL'})")
            args.extend(found)
        elif query.search and query.search.strip():
            where.append("search LIKE ? ESCAPE '\\'")
            args.append(_like(query.search))
        if after:
            t, _, uid = after.partition("|")
            where.append("(last_received_at < ? OR (last_received_at = ? AND series_uid < ?))")
            args.extend((float(t), float(t), uid))
        sql = ("SELECT * FROM series" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY last_received_at DESC, series_uid DESC LIMIT ?")
        rows = self.conn.execute(sql, (*args, int(limit) + 1)).fetchall()
        items = [Series._from(r) for r in rows[:limit]]
        nxt = f"{items[-1].last_received_at!r}|{items[-1].series_uid}" if len(rows) > limit and items else None
        return Page(items, nxt)

    def jobs_of_series(self, series_uids: Sequence[str]) -> dict[str, list[Job]]:
        """The jobs of each of ``series_uids`` (a page of the series list), oldest first."""
        out: dict[str, list[Job]] = {u: [] for u in series_uids}
        if series_uids:
            q = ",".join("?" * len(series_uids))
            for r in self.conn.execute(f"SELECT * FROM jobs WHERE series_uid IN ({q}) ORDER BY id", list(series_uids)):
                out[r["series_uid"]].append(Job._from(r))
        return out

    # -- dispatches ------------------------------------------------------
    def add_dispatch(self, job_id: int, destination: str, kind: DispatchKind | str) -> tuple[int, bool]:
        """Create a pending dispatch; idempotent on (job_id, destination, kind).  Returns (id, created)."""
        try:
            kind = DispatchKind(kind)
        except ValueError:
            raise ValueError(f"dispatch kind must be one of {', '.join(DispatchKind)} (got {kind!r})") from None
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO dispatches (job_id, destination, kind, created_at) VALUES (?,?,?,?)"
                " ON CONFLICT (job_id, destination, kind) DO NOTHING",
                (job_id, destination, kind, time.time()),
            )
            if cur.rowcount == 1:
                return int(cur.lastrowid or 0), True
            row = c.execute(
                "SELECT id FROM dispatches WHERE job_id = ? AND destination = ? AND kind = ?",
                (job_id, destination, kind),
            ).fetchone()
            return int(row[0]), False

    def claim_dispatch(self, *, lease_s: float = 300.0, now: float | None = None) -> Dispatch | None:
        """Atomically take the oldest due ``pending`` dispatch to a destination that is not paused
        (:meth:`set_destination_paused`: the console's pause; its dispatches wait, due, until resumed).

        The dispatch stays ``pending`` but its ``next_attempt_at`` moves
        ``lease_s`` ahead and ``attempts`` grows by one, so no other
        dispatcher takes it meanwhile and, if this process dies, it becomes
        due again after the lease.  Finish with :meth:`mark_dispatch_sent` or
        :meth:`mark_dispatch_failed`.
        """
        t = now if now is not None else time.time()
        r = self.conn.execute(
            "UPDATE dispatches SET attempts = attempts + 1, next_attempt_at = ?"
            " WHERE id = (SELECT id FROM dispatches WHERE state = 'pending'"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
            " AND destination NOT IN (SELECT name FROM destination_state WHERE paused = 1)"
            " ORDER BY created_at, id LIMIT 1"
            " FOR UPDATE SKIP LOCKED)"
            " AND state = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= ?) RETURNING *",
            (t + lease_s, t, t),
        ).fetchone()
        return Dispatch._from(r) if r else None

    def mark_dispatch_sent(self, dispatch_id: int) -> bool:
        return (
            self.conn.execute(
                "UPDATE dispatches SET state = 'sent', sent_at = ?, last_error = NULL, next_attempt_at = NULL"
                " WHERE id = ? AND state = 'pending'",
                (time.time(), dispatch_id),
            ).rowcount
            == 1
        )

    def record_dispatch_attempt(
        self, dispatch: Dispatch, *, started_at: float, outcome: str, detail: str, location: str | None
    ) -> None:
        """Log one attempt of ``dispatch`` (outcome ``sent`` | ``retry`` | ``failed``)."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO dispatch_attempts (dispatch_id, job_id, attempt, started_at, finished_at, outcome,"
                " detail, location) VALUES (?,?,?,?,?,?,?,?)",
                (dispatch.id, dispatch.job_id, dispatch.attempts, started_at, time.time(), outcome, detail, location),
            )

    def dispatch_attempts(self, *, job_id: int | None = None, dispatch_id: int | None = None) -> list[dict[str, Any]]:
        """Logged dispatch attempts, oldest first."""
        sql, args = "SELECT * FROM dispatch_attempts WHERE 1=1", []
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if dispatch_id is not None:
            sql += " AND dispatch_id = ?"
            args.append(dispatch_id)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    def mark_dispatch_failed(self, dispatch_id: int, error: str, *,
                             retry_at: float | None = None) -> DispatchState | None:
        """Record a failed try: with ``retry_at`` stays ``pending`` (due then), else ``failed``.

        The caller decides on ``retry_at`` from its retry policy and
        ``Dispatch.attempts``.  Returns the new state (None if not pending).
        """
        if retry_at is not None:
            cur = self.conn.execute(
                "UPDATE dispatches SET last_error = ?, next_attempt_at = ? WHERE id = ? AND state = 'pending'",
                (error, retry_at, dispatch_id),
            )
            return DispatchState.PENDING if cur.rowcount else None
        cur = self.conn.execute(
            "UPDATE dispatches SET state = 'failed', last_error = ?, next_attempt_at = NULL"
            " WHERE id = ? AND state = 'pending'",
            (error, dispatch_id),
        )
        return DispatchState.FAILED if cur.rowcount else None

    def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        r = self.conn.execute("SELECT * FROM dispatches WHERE id = ?", (dispatch_id,)).fetchone()
        return Dispatch._from(r) if r else None

    def list_dispatches(self, *, job_id: int | None = None, state: DispatchState | None = None) -> list[Dispatch]:
        sql = "SELECT * FROM dispatches WHERE 1=1"
        args: list[object] = []
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        return [Dispatch._from(r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    # -- console: users, tokens, sessions, audit, settings, destination pause ---------------------
    def add_user(self, username: str, role: str, password_hash: str, *, must_change: bool = False) -> int:
        """Create a console user; raises ``ValueError`` when the name is taken.  Returns its id."""
        t = time.time()
        try:
            cur = self.conn.execute(
                "INSERT INTO console_users (username, role, password_hash, must_change, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?)",
                (username, role, password_hash, int(must_change), t, t),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"user {username!r} exists already") from None
        return int(cur.lastrowid or 0)

    def get_user(self, username: str | None = None, *, user_id: int | None = None) -> ConsoleUser | None:
        if user_id is not None:
            r = self.conn.execute("SELECT * FROM console_users WHERE id = ?", (user_id,)).fetchone()
        else:
            r = self.conn.execute("SELECT * FROM console_users WHERE username = ?", (username,)).fetchone()
        return ConsoleUser._from(r) if r else None

    def list_users(self) -> list[ConsoleUser]:
        return [ConsoleUser._from(r) for r in self.conn.execute("SELECT * FROM console_users ORDER BY username")]

    def count_users(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM console_users").fetchone()[0])

    def update_user(self, username: str, *, role: str | None = None, password_hash: str | None = None,
                    must_change: bool | None = None) -> bool:
        """Change a user's role, password hash and/or must-change flag; False when there is no such user."""
        sets: list[str] = ["updated_at = ?"]
        args: list[object] = [time.time()]
        for col, value in (("role", role), ("password_hash", password_hash), ("must_change", must_change)):
            if value is not None:
                sets.append(f"{col} = ?")
                args.append(int(value) if isinstance(value, bool) else value)
        args.append(username)
        return self.conn.execute(f"UPDATE console_users SET {', '.join(sets)} WHERE username = ?", args).rowcount == 1

    def remove_user(self, username: str) -> bool:
        """Delete a user with its sessions and tokens; False when there is no such user."""
        with self.transaction() as c:
            r = c.execute("SELECT id FROM console_users WHERE username = ?", (username,)).fetchone()
            if r is None:
                return False
            c.execute("DELETE FROM console_sessions WHERE user_id = ?", (r[0],))
            c.execute("DELETE FROM console_tokens WHERE user_id = ?", (r[0],))
            c.execute("DELETE FROM console_users WHERE id = ?", (r[0],))
            return True

    def add_session(self, session_id: str, user_id: int, csrf: str, client: str | None, expires_at: float) -> None:
        self.conn.execute(
            "INSERT INTO console_sessions (id, user_id, csrf, client, created_at, expires_at) VALUES (?,?,?,?,?,?)",
            (session_id, user_id, csrf, client, time.time(), expires_at),
        )

    def get_session(self, session_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The unexpired session ``{id, user_id, csrf, client, created_at, expires_at}``, or None."""
        r = self.conn.execute("SELECT * FROM console_sessions WHERE id = ? AND expires_at > ?",
                              (session_id, now if now is not None else time.time())).fetchone()
        return dict(r) if r else None

    def end_sessions(self, *, session_id: str | None = None, user_id: int | None = None,
                     keep: str | None = None) -> int:
        """Delete one session, or every session of a user (but ``keep``), and expired ones."""
        with self.transaction() as c:
            n = 0
            if session_id is not None:
                n += c.execute("DELETE FROM console_sessions WHERE id = ?", (session_id,)).rowcount
            if user_id is not None:
                n += c.execute("DELETE FROM console_sessions WHERE user_id = ? AND id != ?",
                               (user_id, keep or "")).rowcount
            c.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (time.time(),))
            return n

    def add_token(self, user_id: int, name: str, token_hash: str) -> int:
        cur = self.conn.execute("INSERT INTO console_tokens (user_id, name, token_hash, created_at) VALUES (?,?,?,?)",
                                (user_id, name, token_hash, time.time()))
        return int(cur.lastrowid or 0)

    def token_user(self, token_hash: str) -> tuple[int, ConsoleUser] | None:
        """(token id, its user) for an unrevoked token, marking it used; None when unknown or revoked."""
        r = self.conn.execute("SELECT id, user_id FROM console_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                              (token_hash,)).fetchone()
        if r is None:
            return None
        user = self.get_user(user_id=int(r["user_id"]))
        if user is None:
            return None
        self.conn.execute("UPDATE console_tokens SET last_used_at = ? WHERE id = ?", (time.time(), r["id"]))
        return int(r["id"]), user

    def list_tokens(self, user_id: int | None = None) -> list[dict[str, Any]]:
        """Tokens (never their hash) with the owner's name, newest first: ``{id, username, name, created_at,
        last_used_at, revoked_at}``."""
        sql = ("SELECT t.id, u.username, t.user_id, t.name, t.created_at, t.last_used_at, t.revoked_at"
               " FROM console_tokens t JOIN console_users u ON u.id = t.user_id")
        args: list[object] = []
        if user_id is not None:
            sql += " WHERE t.user_id = ?"
            args.append(user_id)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY t.id DESC", args)]

    def revoke_token(self, token_id: int, *, user_id: int | None = None) -> bool:
        """Revoke a token (only one of ``user_id`` when given); False when there is none to revoke."""
        sql = "UPDATE console_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
        args: list[object] = [time.time(), token_id]
        if user_id is not None:
            sql += " AND user_id = ?"
            args.append(user_id)
        return self.conn.execute(sql, args).rowcount == 1

    def add_audit(self, action: str, *, username: str | None, client: str | None = None, target: str | None = None,
                  detail: Mapping[str, Any] | None = None, at: float | None = None) -> int:
        """Append to the audit log: who (``username``, None: anonymous), from where (``client`` address),
        what (``action`` like ``login.failed``, ``rules.apply``, ``job.retry``), on what (``target``) and
        the particulars (``detail``, stored as JSON).  Returns the entry id."""
        cur = self.conn.execute(
            "INSERT INTO audit_log (at, username, client, action, target, detail) VALUES (?,?,?,?,?,?)",
            (at if at is not None else time.time(), username, client, action, target,
             json.dumps(dict(detail), sort_keys=True, default=str) if detail else None),
        )
        return int(cur.lastrowid or 0)

    def list_audit(self, *, limit: int = 200, before_id: int | None = None, action: str | None = None,
                   username: str | None = None, since: float | None = None,
                   after_id: int | None = None) -> list[dict[str, Any]]:
        """Audit entries newest first (``after_id`` given: oldest first, from after that entry), ``detail``
        decoded: ``{id, at, username, client, action, target, detail}``."""
        sql = "SELECT * FROM audit_log WHERE 1=1"
        args: list[object] = []
        if before_id is not None:
            sql += " AND id < ?"
            args.append(before_id)
        if after_id is not None:
            sql += " AND id > ?"
            args.append(after_id)
        if action is not None:
            sql += " AND action = ?"
            args.append(action)
        if username is not None:
            sql += " AND username = ?"
            args.append(username)
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        sql += f" ORDER BY id {'ASC' if after_id is not None else 'DESC'} LIMIT ?"
        args.append(limit)
        return [{**dict(r), "detail": _loads(r["detail"])} for r in self.conn.execute(sql, args)]

    def count_audit(self, action: str, *, since: float, username: str | None = None, client: str | None = None) -> int:
        """How many ``action`` entries since ``since`` (for one user name and/or client address)."""
        sql = "SELECT COUNT(*) FROM audit_log WHERE action = ? AND at >= ?"
        args: list[object] = [action, since]
        if username is not None:
            sql += " AND username = ?"
            args.append(username)
        if client is not None:
            sql += " AND client = ?"
            args.append(client)
        return int(self.conn.execute(sql, args).fetchone()[0])

    def get_setting(self, key: str) -> str | None:
        r = self.conn.execute("SELECT value FROM console_settings WHERE key = ?", (key,)).fetchone()
        return str(r[0]) if r else None

    def setdefault_setting(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` has one; returns the stored value (first writer wins)."""
        self.conn.execute("INSERT INTO console_settings (key, value) VALUES (?,?) ON CONFLICT (key) DO NOTHING",
                          (key, value))
        return str(self.get_setting(key))

    def set_destination_paused(self, name: str, paused: bool, *, by: str | None = None) -> None:
        self.conn.execute(
            "INSERT INTO destination_state (name, paused, changed_at, changed_by) VALUES (?,?,?,?)"
            " ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, changed_at = excluded.changed_at,"
            " changed_by = excluded.changed_by",
            (name, int(paused), time.time(), by),
        )

    def paused_destinations(self) -> set[str]:
        return {str(r[0]) for r in self.conn.execute("SELECT name FROM destination_state WHERE paused = 1")}

    # -- rule versions ---------------------------------------------------
    def add_rule_version(self, version: str, text: str, *, applied_by: str, action: str,
                         comment: str | None = None, path: str | None = None,
                         applied_at: float | None = None) -> int:
        """Record a version of the rule file that went live; returns its id."""
        cur = self.conn.execute(
            "INSERT INTO rule_versions (version, text, applied_by, applied_at, action, comment, path)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (version, text, applied_by, time.time() if applied_at is None else applied_at, action, comment, path),
        )
        return int(cur.lastrowid or 0)

    def rule_versions(self, limit: int | None = None, offset: int = 0) -> list[RuleVersion]:
        """Recorded rule versions, newest first."""
        rows = self.conn.execute("SELECT * FROM rule_versions ORDER BY id DESC LIMIT ? OFFSET ?",
                                 (-1 if limit is None else int(limit), int(offset))).fetchall()
        return [RuleVersion._from(r) for r in rows]

    def get_rule_version(self, version_id: int) -> RuleVersion | None:
        r = self.conn.execute("SELECT * FROM rule_versions WHERE id = ?", (int(version_id),)).fetchone()
        return RuleVersion._from(r) if r else None

    def find_rule_versions(self, version_prefix: str) -> list[RuleVersion]:
        """Recorded rows whose version hash starts with ``version_prefix`` (newest first)."""
        rows = self.conn.execute("SELECT * FROM rule_versions WHERE version LIKE ? ORDER BY id DESC",
                                 (version_prefix.replace("%", "").replace("_", "") + "%",)).fetchall()
        return [RuleVersion._from(r) for r in rows]

    def previous_rule_version(self, version_id: int) -> RuleVersion | None:
        """The row recorded before ``version_id`` (what it replaced), or None for the first."""
        r = self.conn.execute("SELECT * FROM rule_versions WHERE id < ? ORDER BY id DESC LIMIT 1",
                              (int(version_id),)).fetchone()
        return RuleVersion._from(r) if r else None

    def spool_bytes(self, *, retention_cutoff: float | None = None) -> int:
        """Bytes of the instances still in the spool: all but those of series done before
        ``retention_cutoff``, whose files retention deletes.  Reads every instance row: cache it."""
        cutoff = retention_cutoff if retention_cutoff is not None else float("-inf")
        return int(self.conn.execute(
            "SELECT COALESCE(SUM(i.size), 0) FROM instances i JOIN series s ON s.series_uid = i.series_uid"
            " WHERE NOT (s.state = 'done' AND s.state_changed_at <= ?)", (cutoff,)).fetchone()[0])

    def gauges(self) -> dict[str, Any]:
        """Counts for health and metrics: ``jobs`` [(state, backend, n)], ``queued`` [(resource, n)],
        ``dispatches`` [(state, destination, n)]."""
        c = self.conn
        return {
            "jobs": [(str(s), str(b), int(n)) for s, b, n in
                     c.execute("SELECT state, backend, COUNT(*) FROM jobs GROUP BY state, backend")],
            "queued": [(str(r), int(n)) for r, n in
                       c.execute("SELECT COALESCE(resource, 'unclassified'), COUNT(*) FROM jobs"
                                 " WHERE state = 'queued' GROUP BY 1")],
            "dispatches": [(str(s), str(d), int(n)) for s, d, n in
                           c.execute("SELECT state, destination, COUNT(*) FROM dispatches GROUP BY state, destination")],
        }

    def destination_stats(self) -> dict[str, dict[str, Any]]:
        """Per destination name found in dispatches or paused: ``pending`` and ``failed`` counts,
        ``last_success`` (time), ``last_error`` (time and detail of the latest unsuccessful attempt),
        ``paused`` with ``changed_at``/``changed_by``."""
        out: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            return out.setdefault(name, {"pending": 0, "failed": 0, "last_success": None, "last_error": None,
                                         "last_error_at": None, "paused": False, "changed_at": None,
                                         "changed_by": None})

        c = self.conn
        for dest, pending, failed, last_sent in c.execute(
                "SELECT destination, SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END), MAX(sent_at) FROM dispatches"
                " GROUP BY destination"):
            e = entry(str(dest))
            e.update(pending=int(pending or 0), failed=int(failed or 0), last_success=last_sent)
        for dest, at, detail in c.execute(
                "SELECT d.destination, a.finished_at, a.detail FROM dispatch_attempts a"
                " JOIN dispatches d ON d.id = a.dispatch_id WHERE a.id IN (SELECT MAX(a2.id) FROM dispatch_attempts a2"
                " JOIN dispatches d2 ON d2.id = a2.dispatch_id WHERE a2.outcome != 'sent' GROUP BY d2.destination)"):
            entry(str(dest)).update(last_error=detail, last_error_at=at)
        for name, paused, changed_at, changed_by in c.execute(
                "SELECT name, paused, changed_at, changed_by FROM destination_state"):
            entry(str(name)).update(paused=bool(paused), changed_at=changed_at, changed_by=changed_by)
        return out
