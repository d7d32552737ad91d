"""The node's durable state: one SQLite database (WAL mode).

Every stage hands work on through this store, so a crash or restart loses
nothing: the receiver records instances, the completion sweep marks quiet
series complete, the router creates jobs, workers claim and finish jobs, the
dispatcher sends results.  Any number of threads and processes may share one
database file:

* one connection per thread (and per process: a forked child opens its own),
  WAL journal, ``busy_timeout`` so writers wait instead of failing;
* every state change is a single conditional ``UPDATE`` (or an ``IMMEDIATE``
  transaction), so two workers can never claim the same job and a series can
  never be completed while an instance for it is being recorded;
* all clocks are the persisted timestamps (``time.time()`` seconds, UTC epoch),
  so a restart does not restart the quiet period.

Tables (see ``_SCHEMA``)::

    instances   one row per SOP Instance UID (+ received_count for duplicates,
                the rule tags as JSON)
    series      receiving -> complete -> routed|unrouted -> processing -> done|failed;
                ``generation`` grows when instances arrive after completion
    jobs        queued -> running -> done|failed (or back to queued for a retry),
                superseded when a newer generation of the series exists;
                UNIQUE(series_uid, rule, rules_version, generation);
                ``provisional`` while started early on a series that is not
                complete yet (its result is held until completion confirms it),
                ``instances_digest`` = the instance set the job ran on
    dispatches  pending -> sent|failed per (job, destination, kind)

Typical use::

    store = Store(cfg.database_path)             # creates / migrates
    store.record_instance(InstanceRecord(...))   # receiver -> "new" | "duplicate"
    for s in store.quiet_series(cfg.quiet_period_s):          # completion sweep
        if store.complete_series(s.series_uid, quiet_period_s=cfg.quiet_period_s):
            ...                                               # hand to the router
    job_id, created = store.create_job(s.series_uid, "liver", profile="liver",
                                       backend="threshold", rules_version=v,
                                       generation=s.generation)
    store.set_series_state(s.series_uid, "routed", from_states=("complete",))
    job = store.claim_job(worker="w1")                        # worker pool
    store.complete_job(job.id, {"seg": "..."}, seg_series_uid="1.2...")
    store.add_dispatch(job.id, "pacs", "dicom")
    d = store.claim_dispatch()                                # dispatcher
    store.mark_dispatch_sent(d.id)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

__all__ = [
    "SCHEMA_VERSION",
    "RESOURCES",
    "RULE_TAGS",
    "SERIES_STATES",
    "JOB_STATES",
    "DISPATCH_STATES",
    "InstanceRecord",
    "Instance",
    "Series",
    "Job",
    "Dispatch",
    "Store",
    "tags_from_dataset",
    "rules_version",
    "instances_digest",
]

SCHEMA_VERSION = 6

log = logging.getLogger("node.store")

#: slot kinds of the worker pool (``jobs.resource``)
RESOURCES: tuple[str, ...] = ("cpu", "gpu")

#: DICOM keywords copied into ``instances.tags`` / ``series.tags`` for the routing rules
RULE_TAGS: tuple[str, ...] = (
    "Modality",
    "SeriesDescription",
    "ProtocolName",
    "BodyPartExamined",
    "StudyDescription",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "SliceThickness",
    "ContrastBolusAgent",
    "ConvolutionKernel",
    "KVP",
    "PatientSex",
    "PatientAge",
    "InstitutionName",
    "StationName",
    "SOPClassUID",
    "Rows",
    "Columns",
)

SeriesState = Literal["receiving", "complete", "routed", "unrouted", "processing", "done", "failed"]
JobState = Literal["queued", "running", "done", "failed", "superseded"]
DispatchState = Literal["pending", "sent", "failed"]
DispatchKind = Literal["dicom", "outputs", "share"]
SERIES_STATES: tuple[str, ...] = ("receiving", "complete", "routed", "unrouted", "processing", "done", "failed")
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "superseded")
DISPATCH_STATES: tuple[str, ...] = ("pending", "sent", "failed")
#: dicom: the SEG (sent early); outputs: the other DICOM objects of a rule's outputs (issue 14); share
DISPATCH_KINDS: tuple[str, ...] = ("dicom", "outputs", "share")


def _in(values: Sequence[str]) -> str:
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
        state                TEXT NOT NULL DEFAULT 'receiving' CHECK (state IN ({_in(SERIES_STATES)})),
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
        state           TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ({_in(JOB_STATES)})),
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
        state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ({_in(DISPATCH_STATES)})),
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
    # 5 -> 6 (issue 14): dispatch kind 'outputs' (SR, overlay, Encapsulated STL of a rule's outputs,
    # beside the SEG's 'dicom').  SQLite cannot change a CHECK constraint: the table is rebuilt.
    f"""
    CREATE TABLE dispatches_v6 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id          INTEGER NOT NULL REFERENCES jobs(id),
        destination     TEXT NOT NULL,
        kind            TEXT NOT NULL CHECK (kind IN ('dicom','outputs','share')),
        state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ({_in(DISPATCH_STATES)})),
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
)


# ---------------------------------------------------------------------------
# helpers


def _jsonable(value: Any) -> Any:
    """Turn a pydicom element value into JSON (MultiValue -> list, DS -> float, IS -> int)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        # pydicom DSfloat/IS subclass float/int: plain numbers in JSON
        if isinstance(value, float):
            return float(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        return value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_jsonable(v) for v in value]
    return str(value)


def tags_from_dataset(ds: Any, keywords: Iterable[str] = RULE_TAGS) -> dict[str, Any]:
    """The rule tags present in ``ds`` (a pydicom Dataset) as a JSON-able dict.

    Absent tags are left out; present-but-empty tags are kept as ``""``
    (``None`` values become ``""``) so rules can tell "empty" from "absent".
    A value that cannot be decoded is skipped.
    """
    out: dict[str, Any] = {}
    for kw in keywords:
        try:
            if kw not in ds:
                continue
            value = ds[kw].value
        except Exception:  # noqa: BLE001 - a broken value must not stop indexing
            continue
        out[kw] = "" if value is None else _jsonable(value)
    return out


def _check_resource(value: str | None) -> str | None:
    if value is not None and value not in RESOURCES:
        raise ValueError(f"job resource must be one of {', '.join(RESOURCES)} (got {value!r})")
    return value


def rules_version(source: str | Path | bytes) -> str:
    """Version id of a rule file: the SHA-256 (hex, first 16 chars) of its bytes."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def instances_digest(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 (16 hex) of a set of SOP Instance UIDs, order-independent (see :meth:`Store.series_digest`)."""
    uids = sorted(set(sop_instance_uids))
    h = hashlib.sha256(f"{len(uids)}\n".encode())
    for u in uids:
        h.update(u.encode() + b"\n")
    return h.hexdigest()[:16]


def _add_column(c: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    """``ALTER TABLE table ADD COLUMN column decl`` unless the column exists (idempotent)."""
    have = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
    if column not in have:
        c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")




#: SET clause of a job restart (:meth:`Store.restart_job`, and the receiver's discard of an early
#: start that new instances made stale): queued again, no result, the try not counted; ``?`` = reason
_RESTART_SET = ("state = 'queued', attempts = MAX(attempts - 1, 0), next_attempt_at = NULL, finished_at = NULL,"
                " error = ?, result = '{}', seg_series_uid = NULL, instances_digest = NULL")


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


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
    state: str
    state_changed_at: float
    generation: int
    processed_generation: int
    calling_ae: str | None
    called_ae: str | None
    peer_address: str | None
    error: str | None
    tags: dict[str, Any]  #: rule tags of the first instance received

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Series":
        d = dict(r)
        d["tags"] = _loads(d["tags"])
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
    state: str
    error: str | None
    attempts: int  #: tries started so far (claim_job increments it)
    max_attempts: int
    next_attempt_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    params: dict[str, Any]  #: free-form rule parameters given to create_job
    result: dict[str, Any]  #: result paths (SEG path, mesh folder, report) given to complete_job
    seg_series_uid: str | None
    resource: str | None = None  #: worker-pool slot kind 'cpu' | 'gpu' (None: not classified yet)
    #: started early, before the series completed: its result is held until the router confirms it
    provisional: bool = False
    #: :meth:`Store.series_digest` of the instances the (last) try ran on
    instances_digest: str | None = None

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Job":
        d = dict(r)
        d["params"] = _loads(d["params"])
        d["result"] = _loads(d["result"])
        if "provisional" in d:
            d["provisional"] = bool(d["provisional"])
        return cls(**d)


@dataclass(frozen=True)
class Dispatch:
    id: int
    job_id: int
    destination: str
    kind: str
    state: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    sent_at: float | None

    @classmethod
    def _from(cls, r: sqlite3.Row) -> "Dispatch":
        return cls(**dict(r))


# ---------------------------------------------------------------------------


class Store:
    """The SQLite job store.  Thread-safe and multi-process-safe (see module docstring).

    Args:
        path: database file (its folder is created); ``":memory:"`` is not
            supported (each thread would see its own database).
        busy_timeout_s: how long a writer waits for a lock before failing.
        migrate: run :meth:`migrate` on open (default True).
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, migrate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if migrate:
            self.migrate()

    # -- connections -----------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, reopened after fork)."""
        c = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "pid", None) != os.getpid():
            c = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            c.row_factory = sqlite3.Row
            c.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            c.execute("PRAGMA journal_mode = WAL")
            c.execute("PRAGMA synchronous = NORMAL")
            c.execute("PRAGMA foreign_keys = ON")
            self._local.conn = c
            self._local.pid = os.getpid()
            with self._lock:
                self._all.append(c)
        return c

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error); yields the connection.

        IMMEDIATE takes the write lock up front, so read-then-write sequences
        inside are atomic with respect to other processes.
        """
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

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
                    f"{self.path}: database schema version {current} is newer than this program ({SCHEMA_VERSION})"
                )
            for version in range(current, SCHEMA_VERSION):
                for stmt in _MIGRATIONS[version].split(";"):
                    if stmt.strip().startswith("@add_column"):
                        _, table, column, decl = stmt.split(None, 3)
                        _add_column(c, table, column, decl)
                    elif stmt.strip():
                        c.execute(stmt)
                c.execute("UPDATE schema_version SET version = ?", (version + 1,))
        return SCHEMA_VERSION

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
        """
        now = rec.received_at if rec.received_at is not None else time.time()
        tags = json.dumps(dict(rec.tags), sort_keys=True)
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE instances SET received_count = received_count + 1, last_received_at = ?"
                " WHERE sop_instance_uid = ?",
                (now, rec.sop_instance_uid),
            )
            if cur.rowcount:
                return "duplicate"
            c.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, study_uid, path,"
                " transfer_syntax, size, sha256, calling_ae, called_ae, peer_address, received_at,"
                " last_received_at, tags) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
            )
            row = c.execute("SELECT state, generation FROM series WHERE series_uid = ?", (rec.series_uid,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at,"
                    " instance_count, state, state_changed_at, calling_ae, called_ae, peer_address, tags)"
                    " VALUES (?,?,?,?,1,'receiving',?,?,?,?,?)",
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
                    ),
                )
            elif row["state"] == "receiving":
                c.execute(
                    "UPDATE series SET instance_count = instance_count + 1,"
                    " last_received_at = MAX(last_received_at, ?) WHERE series_uid = ?",
                    (now, rec.series_uid),
                )
                # an early-started result of this generation no longer matches the series: run again
                cur = c.execute(
                    f"UPDATE jobs SET {_RESTART_SET} WHERE series_uid = ? AND generation = ?"
                    " AND provisional = 1 AND state IN ('done', 'failed')",
                    ("new instances arrived after an early start", rec.series_uid, row["generation"]),
                )
                if cur.rowcount:
                    log.info("series %s: %d early-start result(s) discarded: new instances arrived; queued again",
                             rec.series_uid, cur.rowcount)
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

    def list_series(self, state: str | Sequence[str] | None = None) -> list[Series]:
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

    def quiet_series(self, quiet_period_s: float, now: float | None = None) -> list[Series]:
        """Series still ``receiving`` whose last (persisted) receive is at least ``quiet_period_s`` old."""
        cutoff = (now if now is not None else time.time()) - quiet_period_s
        rows = self.conn.execute(
            "SELECT * FROM series WHERE state = 'receiving' AND last_received_at <= ? ORDER BY last_received_at",
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
        state: str,
        *,
        from_states: Sequence[str] | None = None,
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
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        sql = "UPDATE series SET state = ?, state_changed_at = ?, error = ?"
        args: list[Any] = [state, time.time(), error]
        if state == "done" and generation is not None:
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
        params: Mapping[str, Any] | None = None,
        resource: str | None = None,
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
                " max_attempts, params, created_at, resource, provisional) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (series_uid, rule, rules_version, generation) DO NOTHING",
                (
                    series_uid,
                    rule,
                    profile,
                    backend,
                    rules_version,
                    generation,
                    max_attempts,
                    json.dumps(dict(params or {}), sort_keys=True),
                    time.time(),
                    _check_resource(resource),
                    int(bool(provisional)),
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
                  kinds: Sequence[str] | None = None, early_quiet_s: float | None = None,
                  confirmed_only: bool = False) -> Job | None:
        """Atomically take the oldest due ``queued`` job: state -> running, attempts + 1.

        Safe with many worker threads/processes: exactly one caller gets each
        job (one conditional UPDATE).  Returns None when nothing is due.
        Confirmed jobs come before provisional ones.

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
        where, args = "", []
        if kinds is not None:
            ks = [_check_resource(k) for k in kinds]
            if not ks:
                return None
            where = f" AND resource IN ({','.join('?' * len(ks))})"
            args = ks
        if early_quiet_s is None or confirmed_only:
            where += " AND provisional = 0"
        else:
            where += (" AND (provisional = 0 OR EXISTS (SELECT 1 FROM series s WHERE s.series_uid = jobs.series_uid"
                      " AND s.state = 'receiving' AND s.generation = jobs.generation AND s.last_received_at <= ?))")
            args = [*args, t - float(early_quiet_s)]
        r = self.conn.execute(
            "UPDATE jobs SET state = 'running', started_at = ?, finished_at = NULL, attempts = attempts + 1,"
            " worker = ? WHERE state = 'queued' AND id = (SELECT id FROM jobs WHERE state = 'queued'"
            f" AND (next_attempt_at IS NULL OR next_attempt_at <= ?){where}"
            " ORDER BY provisional, created_at, id LIMIT 1) RETURNING *",
            (t, worker, t, *args),
        ).fetchone()
        return Job._from(r) if r else None

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

    def restart_job(self, job_id: int, why: str, *,
                    from_states: Sequence[str] = ("running", "done", "failed")) -> bool:
        """Back to ``queued`` with no result, without counting the try (its input changed under it).

        For an early-started job whose series received more instances while it ran, or whose
        result was computed from an instance set that is no longer the series'.
        """
        q = ",".join("?" * len(from_states))
        return self.conn.execute(
            f"UPDATE jobs SET {_RESTART_SET} WHERE id = ? AND state IN ({q})",
            (why, job_id, *from_states),
        ).rowcount == 1

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

    def merge_job_params(self, job_id: int, extra: Mapping[str, Any]) -> None:
        """Add keys to a job's ``params`` (e.g. the slot a try ran in); one atomic statement."""
        self.conn.execute("UPDATE jobs SET params = json_patch(params, ?) WHERE id = ?",
                          (json.dumps(dict(extra), sort_keys=True, default=str), job_id))

    def merge_job_result(self, job_id: int, extra: Mapping[str, Any]) -> None:
        """Add keys to a job's ``result`` (e.g. a SEG ready before the rest); one atomic statement."""
        self.conn.execute("UPDATE jobs SET result = json_patch(result, ?) WHERE id = ?",
                          (json.dumps(dict(extra), sort_keys=True, default=str), job_id))

    def complete_job(
        self, job_id: int, result: Mapping[str, Any] | None = None, *, seg_series_uid: str | None = None
    ) -> bool:
        """running -> done with the result paths (JSON); False if the job was not running."""
        cur = self.conn.execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, error = NULL, result = ?, seg_series_uid = ?"
            " WHERE id = ? AND state = 'running'",
            (time.time(), json.dumps(dict(result or {}), sort_keys=True, default=str), seg_series_uid, job_id),
        )
        return cur.rowcount == 1

    def fail_job(self, job_id: int, error: str, *, retry_at: float | None = None) -> str | None:
        """Record a failed try of a running job.

        With ``retry_at`` (epoch seconds) and attempts left, the job goes back
        to ``queued`` and is due at ``retry_at``; otherwise it is ``failed``.
        Returns the new state, or None if the job was not running.
        """
        t = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT state, attempts, max_attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running":
                return None
            if retry_at is not None and row["attempts"] < row["max_attempts"]:
                c.execute(
                    "UPDATE jobs SET state = 'queued', error = ?, next_attempt_at = ?, finished_at = ? WHERE id = ?",
                    (error, retry_at, t, job_id),
                )
                return "queued"
            c.execute("UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?", (error, t, job_id))
            return "failed"

    def supersede_jobs(self, series_uid: str, below_generation: int) -> int:
        """Mark queued jobs of older generations ``superseded``; returns how many."""
        return self.conn.execute(
            "UPDATE jobs SET state = 'superseded', finished_at = ? WHERE series_uid = ? AND state = 'queued'"
            " AND generation < ?",
            (time.time(), series_uid, below_generation),
        ).rowcount

    def requeue_running_jobs(self, worker: str | None = None) -> int:
        """Put ``running`` jobs back to ``queued`` (call once at startup, before workers start).

        A job interrupted by a crash keeps its ``attempts`` count, so a job
        that crashes the node every time still ends ``failed``.  With
        ``worker`` only that worker's jobs are requeued.
        """
        sql = "UPDATE jobs SET state = 'queued', next_attempt_at = NULL, error = 'interrupted (node restarted)'"
        sql += " WHERE state = 'running'"
        args: tuple[Any, ...] = ()
        if worker is not None:
            sql += " AND worker = ?"
            args = (worker,)
        return self.conn.execute(sql, args).rowcount

    def get_job(self, job_id: int) -> Job | None:
        r = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job._from(r) if r else None

    def list_jobs(self, state: str | Sequence[str] | None = None, *, series_uid: str | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if series_uid is not None:
            sql += " AND series_uid = ?"
            args.append(series_uid)
        return [Job._from(r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    # -- dispatches ------------------------------------------------------
    def add_dispatch(self, job_id: int, destination: str, kind: str) -> tuple[int, bool]:
        """Create a pending dispatch; idempotent on (job_id, destination, kind).  Returns (id, created)."""
        if kind not in DISPATCH_KINDS:
            raise ValueError(f"dispatch kind must be one of {', '.join(DISPATCH_KINDS)} (got {kind!r})")
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
        """Atomically take the oldest due ``pending`` dispatch.

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
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY created_at, id LIMIT 1)"
            " AND state = 'pending' RETURNING *",
            (t + lease_s, t),
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

    def mark_dispatch_failed(self, dispatch_id: int, error: str, *, retry_at: float | None = None) -> str | None:
        """Record a failed try: with ``retry_at`` stays ``pending`` (due then), else ``failed``.

        The caller decides on ``retry_at`` from its retry policy and
        ``Dispatch.attempts``.  Returns the new state (None if not pending).
        """
        if retry_at is not None:
            cur = self.conn.execute(
                "UPDATE dispatches SET last_error = ?, next_attempt_at = ? WHERE id = ? AND state = 'pending'",
                (error, retry_at, dispatch_id),
            )
            return "pending" if cur.rowcount else None
        cur = self.conn.execute(
            "UPDATE dispatches SET state = 'failed', last_error = ?, next_attempt_at = NULL"
            " WHERE id = ? AND state = 'pending'",
            (error, dispatch_id),
        )
        return "failed" if cur.rowcount else None

    def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        r = self.conn.execute("SELECT * FROM dispatches WHERE id = ?", (dispatch_id,)).fetchone()
        return Dispatch._from(r) if r else None

    def list_dispatches(self, *, job_id: int | None = None, state: str | None = None) -> list[Dispatch]:
        sql, args = "SELECT * FROM dispatches WHERE 1=1", []
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        return [Dispatch._from(r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]
