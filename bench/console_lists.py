#!/usr/bin/env python3
"""The console's series and job lists with 100,000 jobs in the store (issue 15: under 200 ms).

Fills a fresh store (schema migrated as the node does) with ``--jobs`` jobs on about 0.6 series
each over 90 days: patients with names, IDs and accession numbers, 12 calling AEs, 8 rules on 7
profiles, states as a busy node has them (88 % done, 5 % superseded, 4 % failed, queued and
running), tags, parameters and results as the node writes them (about 2 kB a job).  Rows go in
with ``executemany`` in one transaction (the bench is about reading them; the instances table is
left empty: no list reads it).

Then times each list query of the console (``Store.jobs_page`` / ``Store.series_page``, 50 rows a
page, rows decoded into ``Job``/``Series`` as the console gets them), ``--repeat`` times with
varying values, first pages and pages deep in the list (keyset cursor), and prints p50/p99 in ms.
Peers in the same run, alternating order: the same deep page by ``OFFSET`` (what keyset
pagination replaces) and the same patient search on the tags JSON (``json_extract ... LIKE``,
what the ``series.search`` column replaces)::

    .venv/bin/python bench/console_lists.py [--jobs 100000] [--repeat 40] [--db /tmp/lists.db]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.contracts import JobState, SeriesState  # noqa: E402 - after the path insert
from node.store import Job, JobQuery, Series, SeriesQuery, Store, series_search_text  # noqa: E402 - same

LAST = ["SMITH", "MÜLLER", "GARCIA", "NGUYEN", "ROSSI", "DUBOIS", "KOWALSKI", "JANSEN", "SILVA", "BROWN",
        "WANG", "KIM", "NOVAK", "LARSEN", "OKAFOR", "HASHEMI", "PETROV", "COHEN", "MARTIN", "LOPEZ"]
FIRST = ["ANNA", "JOHN", "MARIA", "PETER", "LINA", "OMAR", "SARA", "IVAN", "MEI", "LUCA"]
AES = [f"CT_{n:02d}" for n in range(10)] + ["PACS_MAIN", "MR_01"]
RULES = [("body-bones", "bones"), ("chest-lungs", "lungs"), ("abdomen-liver", "liver"), ("renal", "kidneys"),
         ("cardiac", "heart"), ("head", "brain"), ("pancreas", "pancreas"), ("trauma-bones", "bones")]
STATES = [("done", 0.88), ("superseded", 0.05), ("failed", 0.04), ("queued", 0.02), ("running", 0.01)]


def _pick_state(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for s, p in STATES:
        acc += p
        if x < acc:
            return s
    return "done"


def fill(store: Store, jobs: int, seed: int = 1) -> tuple[int, int]:
    """``jobs`` jobs on about 0.6 series each; returns (series, jobs) written."""
    rng = random.Random(seed)
    now = time.time()
    t0 = now - 90 * 86400
    patients = [(f"{rng.choice(LAST)}^{rng.choice(FIRST)}", f"PID{n:07d}") for n in range(max(1, jobs // 5))]
    series_rows, job_rows = [], []
    job_id = 0
    n_series = 0
    while job_id < jobs:
        n_series += 1
        uid = f"1.2.826.0.1.3680043.8.498.{n_series}.{rng.randrange(10**9)}"
        study = f"1.2.826.0.1.3680043.8.498.{n_series}"
        at = t0 + (now - t0) * n_series / (jobs / 1.6)
        name, pid = rng.choice(patients)
        ae = rng.choice(AES)
        tags = {"Modality": "CT", "SeriesDescription": rng.choice(["CT Body 3.0", "Thorax 1.0 B70f", "Abdomen KM"]),
                "ProtocolName": "FDG_TK_KM", "BodyPartExamined": "CHEST", "StudyDescription": "CT Thorax Abdomen",
                "PatientName": name, "PatientID": pid, "AccessionNumber": f"ACC{rng.randrange(10**8):08d}",
                "StudyDate": time.strftime("%Y%m%d", time.gmtime(at)), "StudyTime": "101500", "SeriesNumber": 3,
                "Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force", "ImageType": ["ORIGINAL", "PRIMARY",
                "AXIAL"], "SliceThickness": 3.0, "ContrastBolusAgent": "APPLIED", "KVP": 120, "PatientSex": "F",
                "PatientAge": "063Y", "InstitutionName": "General Hospital", "StationName": "CTAWP1", "Rows": 512,
                "Columns": 512}
        matched = rng.sample(RULES, 1 if rng.random() < 0.4 else 2)
        states = [_pick_state(rng) for _ in matched]
        sstate = ("failed" if "failed" in states else "processing" if {"queued", "running"} & set(states) else "done")
        if rng.random() < 0.02:
            sstate, matched, states = "unrouted", [], []
        series_rows.append((uid, study, at, at + 20, 300, sstate, at + 60, 1, 1, ae, "DICOMNODE", "10.0.0.5",
                            "no rule matched" if sstate == "unrouted" else None, json.dumps(tags, sort_keys=True),
                            series_search_text(tags)))
        for (rule, profile), state in zip(matched, states):
            job_id += 1
            created = at + 21
            params = {"destinations": ["pacs"], "share": True, "backend_override": None, "calling_ae": ae,
                      "rule_line": 3, "supersede": True,
                      "slot": {"name": "cpu0", "kind": "cpu", "pid": 4242, "process": "job"}}
            out = f"/var/lib/dicom-node/results/{job_id}"
            result = {} if state in ("queued", "running", "failed") else {
                "output_dir": out, "seg": f"{out}/{profile}_seg.dcm", "report": f"{out}/report.json",
                "meshes": [f"{out}/{profile}_t{n}.stl" for n in range(3)], "seg_series_uid": uid + ".9",
                "timings_s": {"load": 3.1, "segment": 22.4, "seg": 2.2, "mesh": 8.9, "qc": 1.2, "total": 38.0},
                "backend": {"name": "hu_based"}, "qc": [f"{out}/qc/qc_t{n}_axial.png" for n in range(3)]}
            job_rows.append((job_id, uid, rule, profile, "hu_based", "a1b2c3d4e5f60718", 1, state,
                             "bad input: SliceThickness" if state == "failed" else None, 1, 3, None, created,
                             created + 1, created + 40 if state != "queued" else None, "node:cpu0",
                             json.dumps(params, sort_keys=True), json.dumps(result, sort_keys=True),
                             uid + ".9" if result else None, "cpu", ae))
            if job_id >= jobs:
                break
    with store.transaction() as c:
        c.executemany(
            "INSERT INTO series (series_uid, study_uid, first_received_at, last_received_at, instance_count, state,"
            " state_changed_at, generation, processed_generation, calling_ae, called_ae, peer_address, error, tags,"
            " search) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", series_rows)
        c.executemany(
            "INSERT INTO jobs (id, series_uid, rule, profile, backend, rules_version, generation, state, error,"
            " attempts, max_attempts, next_attempt_at, created_at, started_at, finished_at, worker, params, result,"
            " seg_series_uid, resource, calling_ae) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", job_rows)
    store.conn.execute("ANALYZE")
    return len(series_rows), len(job_rows)


def _ms(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def _p(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _offset_jobs(store: Store, offset: int) -> list[Job]:
    rows = store.conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT 51 OFFSET ?", (offset,)).fetchall()
    return [Job._from(r) for r in rows[:50]]


def _json_search_series(store: Store, text: str) -> list[Series]:
    rows = store.conn.execute(
        "SELECT * FROM series WHERE lower(coalesce(json_extract(tags, '$.PatientName'), '') || '|' ||"
        " coalesce(json_extract(tags, '$.PatientID'), '') || '|' || coalesce(json_extract(tags, '$.AccessionNumber'),"
        " '')) LIKE ? ORDER BY last_received_at DESC, series_uid DESC LIMIT 51", (f"%{text.lower()}%",)).fetchall()
    return [Series._from(r) for r in rows[:50]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--db", type=Path, default=None, help="database file (default: a temporary one)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="console-lists-")
    db = args.db or Path(tmp.name) / "node.db"
    if db.exists():
        db.unlink()
    store = Store(db)
    t = time.perf_counter()
    n_series, n_jobs = fill(store, args.jobs)
    print(f"store: {n_jobs} jobs on {n_series} series, {db.stat().st_size / 2**20:.0f} MB, filled in "
          f"{time.perf_counter() - t:.1f} s (schema {store.schema_version()})")
    rng = random.Random(7)
    some_series = [r[0] for r in store.conn.execute("SELECT series_uid FROM series ORDER BY random() LIMIT 200")]
    pids = [json.loads(r[0])["PatientID"] for r in store.conn.execute(
        "SELECT tags FROM series ORDER BY random() LIMIT 200")]
    mid = str(n_jobs // 2)
    mid_series = store.series_page(limit=1, after=None)  # cursor of a page in the middle: take a row there
    row = store.conn.execute("SELECT last_received_at, series_uid FROM series ORDER BY last_received_at DESC,"
                             " series_uid DESC LIMIT 1 OFFSET ?", (n_series // 2,)).fetchone()
    series_mid = f"{row[0]!r}|{row[1]}"
    del mid_series
    now = time.time()

    def week() -> tuple[float, float]:
        start = now - rng.uniform(7, 90) * 86400
        return start, start + 7 * 86400

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("jobs: no filter, first page", lambda: store.jobs_page()),
        ("jobs: no filter, page at the middle (keyset)", lambda: store.jobs_page(after=mid)),
        ("jobs: state failed", lambda: store.jobs_page(JobQuery(state=[JobState.FAILED]))),
        ("jobs: state failed, 20 pages deep", lambda: store.jobs_page(JobQuery(state=[JobState.FAILED]),
                                                                     after=str(n_jobs - 20 * 50 * 25))),
        ("jobs: state queued+running", lambda: store.jobs_page(JobQuery(state=[JobState.QUEUED, JobState.RUNNING]))),
        ("jobs: rule", lambda: store.jobs_page(JobQuery(rule=rng.choice(RULES)[0]))),
        ("jobs: profile + state done", lambda: store.jobs_page(JobQuery(profile=rng.choice(RULES)[1],
                                                                        state=[JobState.DONE]))),
        ("jobs: calling AE", lambda: store.jobs_page(JobQuery(calling_ae=rng.choice(AES)))),
        ("jobs: one week", lambda: store.jobs_page(JobQuery(since=(w := week())[0], until=w[1]))),
        ("jobs: patient name part", lambda: store.jobs_page(JobQuery(search=rng.choice(LAST)[:4]))),
        ("jobs: patient ID (rare)", lambda: store.jobs_page(JobQuery(search=rng.choice(pids)))),
        ("jobs: name part + failed + AE", lambda: store.jobs_page(JobQuery(
            search=rng.choice(LAST)[:3], state=[JobState.FAILED], calling_ae=rng.choice(AES)))),
        ("jobs: one series", lambda: store.jobs_page(JobQuery(series_uid=rng.choice(some_series)))),
        ("series: no filter, first page", lambda: store.series_page()),
        ("series: page at the middle (keyset)", lambda: store.series_page(after=series_mid)),
        ("series: unrouted", lambda: store.series_page(SeriesQuery(state=[SeriesState.UNROUTED]))),
        ("series: calling AE", lambda: store.series_page(SeriesQuery(calling_ae=rng.choice(AES)))),
        ("series: one week", lambda: store.series_page(SeriesQuery(since=(w := week())[0], until=w[1]))),
        ("series: patient name part", lambda: store.series_page(SeriesQuery(search=rng.choice(LAST)[:4]))),
        ("series: patient ID (rare)", lambda: store.series_page(SeriesQuery(search=rng.choice(pids)))),
    ]
    print(f"\n{'query (50 rows a page)':48s} {'p50 ms':>8s} {'p99 ms':>8s} {'rows':>5s}")
    worst = 0.0
    for label, fn in cases:
        fn()  # warm the page cache
        times = [_ms(fn) for _ in range(args.repeat)]
        worst = max(worst, _p(times, 0.99))
        print(f"{label:48s} {_p(times, 0.5):8.2f} {_p(times, 0.99):8.2f} {len(fn().items):5d}")
    print(f"\nworst p99: {worst:.1f} ms (target < 200 ms)")

    # peers, alternating order
    print(f"\n{'peer comparison':48s} {'ours p50':>9s} {'peer p50':>9s} {'ratio':>7s}")
    pairs: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("jobs page at the middle: keyset vs OFFSET", lambda: store.jobs_page(after=mid),
         lambda: _offset_jobs(store, n_jobs // 2)),
        ("series name search: column vs json_extract", lambda: store.series_page(SeriesQuery(search="kowa")),
         lambda: _json_search_series(store, "kowa")),
        ("series patient ID search: column vs json_extract", lambda: store.series_page(SeriesQuery(search=pids[0])),
         lambda: _json_search_series(store, pids[0])),
    ]
    for label, ours, peer in pairs:
        a: list[float] = []
        b: list[float] = []
        for n in range(args.repeat):
            if n % 2:
                a.append(_ms(ours))
                b.append(_ms(peer))
            else:
                b.append(_ms(peer))
                a.append(_ms(ours))
        pa, pb = statistics.median(a), statistics.median(b)
        print(f"{label:48s} {pa:9.2f} {pb:9.2f} {pb / pa:6.1f}x")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
