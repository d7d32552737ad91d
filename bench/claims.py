"""Job-claim throughput of the store: PostgreSQL against SQLite, with concurrent claimers.

    python bench/claims.py [--jobs N] [--claimers K] [--rounds R]

``bench/cluster.py`` runs :func:`claims` as its store part; alone, this prints the same.

For each engine (a throwaway PostgreSQL cluster started with initdb/pg_ctl as the tests do,
tests/pg_helpers.py; a SQLite file in WAL mode, the embedded default) and each round, ``N``
queued jobs are written, then ``K`` claimer processes (spawned and connected before the clock
starts) each loop ``Store.claim_job`` + ``Store.complete_job`` until the queue is empty: what a
worker slot does per job, without the job.  Throughput = N / wall time from the start signal
until the last claimer found the queue empty.  The engines alternate within each round (order
swapped every round); best and median of the rounds are printed, and the ratio PostgreSQL /
SQLite.  Every job must be claimed exactly once (checked; the run fails otherwise).

Figures only, no assertion on speed.  Target from issue 13: PostgreSQL >= 500 jobs/s with 4
claimers.  Measured figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/pg_helpers.py: the throwaway PostgreSQL cluster

from node.contracts import JobState, Resource  # noqa: E402 - after the sys.path line above
from node.store import InstanceRecord, Store  # noqa: E402 - after the sys.path line above

__all__ = ["claims", "main"]


def _fill(store: Store, n: int, tag: str) -> None:
    """``n`` series of one instance, one queued job each (through the store's own methods)."""
    for i in range(n):
        uid = f"1.2.{tag}.{i}"
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=uid,
            study_uid="1.2.9", path=f"/spool/{uid}.dcm", transfer_syntax="1.2.840.10008.1.2.1", size=1))
        store.create_job(uid, "r", profile="bones", backend="hu_based", rules_version="v", generation=1,
                         resource=Resource.CPU)


def _claimer(url: str, name: str, ready: Any, go: Any, out: Any) -> None:
    store = Store(url, migrate=False)
    store.list_jobs(None, series_uid="-")  # connect before the clock starts
    ready.put(name)
    go.wait()
    got: list[int] = []
    while (job := store.claim_job(f"bench:{name}")) is not None:
        store.complete_job(job.id)
        got.append(job.id)
    out.put((name, time.perf_counter(), got))
    store.close()


def _round(url: str, n: int, k: int, tag: str) -> float:
    store = Store(url)
    _fill(store, n, tag)
    expected = {j.id for j in store.list_jobs(JobState.QUEUED)}
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claimer, args=(url, f"c{i}", ready, go, out)) for i in range(k)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.perf_counter()
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    elapsed = max(r[1] for r in results) - t0
    got = [j for r in results for j in r[2]]
    if len(got) != len(set(got)) or set(got) != expected:
        raise SystemExit(f"claims not exclusive: {len(got)} claims, {len(set(got))} distinct, {len(expected)} jobs")
    per = ", ".join(f"{r[0]} {len(r[2])}" for r in sorted(results))
    print(f"    {tag}: {n} jobs in {elapsed:.3f} s = {n / elapsed:,.0f} jobs/s ({per})", flush=True)
    store.close()
    return n / elapsed


def claims(jobs: int = 2000, claimers: int = 4, rounds: int = 3) -> dict[str, float]:
    """Run the comparison; prints per-round lines and a summary, returns the best jobs/s per engine."""
    from pg_helpers import start_cluster

    cluster = start_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="bench-claims-"))
    rates: dict[str, list[float]] = {"postgresql": [], "sqlite": []}
    try:
        print(f"claims: {jobs} jobs, {claimers} concurrent claimer processes, claim_job + complete_job each; "
              f"{rounds} round(s), engines alternating", flush=True)
        for r in range(rounds):
            order = ["postgresql", "sqlite"] if r % 2 == 0 else ["sqlite", "postgresql"]
            print(f"  round {r + 1}", flush=True)
            for engine in order:
                url = cluster.create_database() if engine == "postgresql" else str(tmp / f"r{r}.db")
                rates[engine].append(_round(url, jobs, claimers, f"{engine}-{r + 1}"))
    finally:
        cluster.stop()
    best = {e: max(v) for e, v in rates.items()}
    for e, v in rates.items():
        print(f"  {e:10s}: best {best[e]:,.0f} jobs/s, median {statistics.median(v):,.0f} jobs/s", flush=True)
    print(f"  ratio postgresql / sqlite (best): {best['postgresql'] / best['sqlite']:.2f}; target postgresql >= 500 "
          f"jobs/s with 4 claimers: {'met' if best['postgresql'] >= 500 else 'NOT met'}", flush=True)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--claimers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    claims(a.jobs, a.claimers, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
