"""The console's series and job lists in the store (issue 15): each filter, keyset pagination that
visits every row once in order, the patient search (name, ID, accession; LIKE characters taken
literally), and the schema migration that fills the search column of older rows.  Speed with
100,000 jobs: bench/console_lists.py."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import pytest

from node.contracts import JobParams, JobResult, JobState, SeriesState
from node.store import JobQuery, Series, SeriesQuery, Store, series_search_text
from test_store import rec as _rec  # tests/ is on sys.path


def rec(sop: str, *, calling_ae: str = "CT01", **kw):
    return dataclasses.replace(_rec(sop, **kw), calling_ae=calling_ae)

PATIENTS = [("DOE^JANE", "PID001", "ACC-100"), ("ROE^RICHARD", "PID002", "ACC_200"), ("Müller^Anna", "X%3", "")]


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[Store]:
    """18 series from three patients and two AEs, 1-2 jobs each, in every job state."""
    store = Store(tmp_path / "node.db")
    t0 = time.time() - 1000
    for n in range(18):
        name, pid, acc = PATIENTS[n % 3]
        series = f"1.2.{n}"
        store.record_instance(rec(f"{n}.1", series=series, at=t0 + n,
                                  calling_ae="CT_A" if n % 2 else "CT_B",
                                  tags={"Modality": "CT", "PatientName": name, "PatientID": pid,
                                        "AccessionNumber": acc}))
        store.complete_series(series, quiet_period_s=0, now=t0 + n + 0.5)
        store.set_series_state(series, SeriesState.ROUTED)
        for r, rule in enumerate(("bones", "liver")[: 1 + n % 2]):
            job_id, _ = store.create_job(series, rule, profile=rule, backend="hu_based", rules_version="v",
                                         generation=1, params=JobParams(calling_ae="CT_A" if n % 2 else "CT_B"))
            store.conn.execute("UPDATE jobs SET created_at = ? WHERE id = ?", (t0 + n + r * 0.1, job_id))
            if n % 4 == 1:
                continue  # stays queued
            store.conn.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (job_id,))
            if n % 4 == 2:
                store.fail_job(job_id, "bad input: x")
            elif n % 4 == 3:
                store.complete_job(job_id, JobResult())
    yield store
    store.close()


def _series(store: Store, uid: str) -> Series:
    s = store.get_series(uid)
    assert s is not None, uid
    return s


def _all_pages(fetch, limit: int) -> tuple[list, int]:
    items, after, pages = [], None, 0
    while True:
        page = fetch(limit=limit, after=after)
        pages += 1
        items += page.items
        if page.next is None:
            return items, pages
        after = page.next


@pytest.mark.parametrize("limit", [1, 4, 50])
def test_job_pages_visit_every_job_once_newest_first(filled: Store, limit: int) -> None:
    jobs, pages = _all_pages(filled.jobs_page, limit)
    assert [j.id for j in jobs] == sorted((j.id for j in filled.list_jobs()), reverse=True)
    assert pages == -(-len(jobs) // limit)


@pytest.mark.parametrize("few", [500, 1])  # a search's series looked up first, or filtered in list order
def test_job_filters(filled: Store, few: int) -> None:
    filled.SEARCH_FEW = few
    every = filled.list_jobs()
    series = {s.series_uid: s for s in filled.list_series()}

    def ids(q: JobQuery) -> list[int]:
        return [j.id for j in _all_pages(lambda **kw: filled.jobs_page(q, **kw), 5)[0]]

    def want(pred) -> list[int]:
        return sorted((j.id for j in every if pred(j)), reverse=True)

    assert ids(JobQuery(state=[JobState.FAILED])) == want(lambda j: j.state == "failed") != []
    assert ids(JobQuery(state=[JobState.QUEUED, JobState.DONE])) == want(lambda j: j.state in ("queued", "done"))
    assert ids(JobQuery(rule="liver")) == want(lambda j: j.rule == "liver") != []
    assert ids(JobQuery(profile="bones", state=[JobState.DONE])) == want(lambda j: j.profile == "bones"
                                                                         and j.state == "done")
    assert ids(JobQuery(calling_ae="CT_A")) == want(lambda j: series[j.series_uid].calling_ae == "CT_A") != []
    t = sorted(j.created_at for j in every)
    assert ids(JobQuery(since=t[5], until=t[12])) == want(lambda j: t[5] <= j.created_at < t[12])
    assert len(ids(JobQuery(since=t[5], until=t[12]))) == 7
    assert ids(JobQuery(series_uid="1.2.3")) == want(lambda j: j.series_uid == "1.2.3")
    # patient search: part of the name, the ID, the accession; any case
    doe = want(lambda j: series[j.series_uid].tags["PatientName"] == "DOE^JANE")
    assert ids(JobQuery(search="doe")) == ids(JobQuery(search="PID001")) == ids(JobQuery(search=" acc-1")) == doe
    assert ids(JobQuery(search="müller")) == want(lambda j: series[j.series_uid].tags["PatientID"] == "X%3")
    # LIKE's own characters are literal: "_" and "%" match only themselves
    assert ids(JobQuery(search="acc_")) == want(lambda j: series[j.series_uid].tags["AccessionNumber"] == "ACC_200")
    assert ids(JobQuery(search="x%")) == want(lambda j: series[j.series_uid].tags["PatientID"] == "X%3")
    assert ids(JobQuery(search="nobody")) == []
    assert ids(JobQuery(search="doe", state=[JobState.FAILED], calling_ae="CT_B")) == want(
        lambda j: j.state == "failed" and series[j.series_uid].calling_ae == "CT_B"
        and series[j.series_uid].tags["PatientName"] == "DOE^JANE")


@pytest.mark.parametrize("few", [500, 1])
def test_series_pages_and_filters(filled: Store, few: int) -> None:
    filled.SEARCH_FEW = few
    every = filled.list_series()
    order = [s.series_uid for s in sorted(every, key=lambda s: (s.last_received_at, s.series_uid), reverse=True)]
    for limit in (1, 7, 100):
        assert [s.series_uid for s in _all_pages(filled.series_page, limit)[0]] == order

    def uids(q: SeriesQuery) -> list[str]:
        return [s.series_uid for s in _all_pages(lambda **kw: filled.series_page(q, **kw), 4)[0]]

    assert uids(SeriesQuery(calling_ae="CT_B")) == [u for u in order if _series(filled, u).calling_ae == "CT_B"]
    assert uids(SeriesQuery(search="roe^")) == [u for u in order if _series(filled, u).tags["PatientID"] == "PID002"]
    filled.set_series_state("1.2.4", SeriesState.UNROUTED, error="no rule matched")
    assert uids(SeriesQuery(state=[SeriesState.UNROUTED])) == ["1.2.4"]
    t = sorted(s.last_received_at for s in every)
    assert len(uids(SeriesQuery(since=t[3], until=t[9]))) == 6
    page = filled.series_page(limit=3)
    by_series = filled.jobs_of_series([s.series_uid for s in page.items])
    assert {u: [j.id for j in js] for u, js in by_series.items()} == {
        s.series_uid: [j.id for j in filled.list_jobs(series_uid=s.series_uid)] for s in page.items}


def test_search_text_and_migration_fills_older_rows(tmp_path: Path) -> None:
    assert series_search_text({"PatientName": "DOE^JANE", "PatientID": "P1", "AccessionNumber": None}) == "doe^jane|p1|"
    assert series_search_text({"PatientName": {"Alphabetic": "Roe^R"}}) == "roe^r||"
    store = Store(tmp_path / "node.db")
    store.record_instance(rec("1", series="S", tags={"PatientName": "DOE^JANE", "PatientID": "P1"}))
    assert _series(store, "S").search == "doe^jane|p1|"
    # a database of the previous schema: the column empty, the migration fills it from the tags
    store.conn.execute("UPDATE series SET search = NULL")
    store.conn.execute("UPDATE schema_version SET version = 9")
    store.close()
    store = Store(tmp_path / "node.db")
    assert _series(store, "S").search == "doe^jane|p1|"
    assert store.series_page(SeriesQuery(search="jane")).items[0].series_uid == "S"
    store.close()


def test_series_refused_first_gets_its_tags_from_its_first_instance(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    store.record_refusal("1", "S", "T1", "disk full")
    store.record_instance(rec("2", series="S", tags={"PatientName": "DOE^JANE", "Modality": "CT"}))
    s = _series(store, "S")
    assert s.tags["PatientName"] == "DOE^JANE" and s.search == "doe^jane||"
    store.close()
