#!/usr/bin/env python3
"""Cluster benchmark: the same burst of series through the local worker pool and through a Dask
cluster with the same number of worker processes on this machine.

    python bench/cluster.py [--series 6] [--workers 2] [--rounds 2] [--size 256x256x60] [--json OUT]

Each run: a fresh ``dicom-node serve`` (fresh storage) and a fresh Orthanc (the PACS); the
``--series`` series (built once from ``$NODE_TEST_DATA/ct-body-3mm-small/ct.nii.gz`` with
:func:`node.tools.synth_series.write_series`, fresh UIDs each) are sent at once, one ``storescu``
per series in parallel; the figure is the time from the first send to the last SEG stored in
Orthanc (rule: CT -> bones -> Orthanc, quiet period 1 s, no early start).

* local: ``workers: W`` (the node's process pool);
* dask: ``executor: {kind: dask}`` against a ``dask scheduler`` and ``W`` workers started with
  ``dicom-node worker --nthreads 1`` (one worker process each), started once before the runs
  (long-lived, as deployed).

The order alternates (local, dask, dask, local, ...) so drift in the machine's load falls on
both sides.  Prints each run, the median per side and the ratio dask / local (target: <= 1.05).
Also the round trip of an empty task (Dask's own per-try cost) and the CPU the idle cluster's
processes use (taken from the jobs on the same cores).
Then the PostgreSQL claims figures of ``bench/claims.py`` when that benchmark exists (the store
side of the scale-out, issue 13), else says it is missing.  Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Orthanc and Dask cluster helpers
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
SMALL = DATA / "ct-body-3mm-small" / "ct.nii.gz"
DICOM_NODE = Path(sys.executable).with_name("dicom-node")
STORESCU = shutil.which("storescu") or "/usr/bin/storescu"


def build_series(root: Path, n: int, size: tuple[int, int, int] | None) -> list[list[Path]]:
    from node.tools.synth_series import write_series

    out = []
    for i in range(n):
        out.append(write_series(SMALL, root / f"s{i}", size=size, series_description=f"body burst {i}",
                                series_number=i + 1))
    return out


def run_once(kind: str, work: Path, series: list[list[Path]], workers: int, scheduler: str | None) -> dict[str, Any]:
    from orthanc import Orthanc, free_port

    work.mkdir(parents=True)
    pacs = Orthanc(work / "orthanc")
    node = None
    try:
        rules = {"rules": [{"name": "ct-bones", "match": {"Modality": "CT"}, "profile": "bones",
                            "destinations": ["pacs"], "share": False}]}
        (work / "rules.yaml").write_text(yaml.safe_dump(rules))
        port = free_port()
        cfg: dict[str, Any] = {
            "port": port, "bind_address": "127.0.0.1", "storage": str(work / "var"), "quiet_period_s": 1,
            "early_start_s": 0, "workers": workers, "rules": str(work / "rules.yaml"),
            "profiles": str(REPO / "profiles"), "log_level": "INFO",
            "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            "dispatch_retry": {"max_attempts": 30, "backoff_base_s": 1, "backoff_max_s": 2},
        }
        if kind == "dask":
            cfg["executor"] = {"kind": "dask", "scheduler": scheduler}
        (work / "node.yaml").write_text(yaml.safe_dump(cfg))
        log = open(work / "node.log", "wb")
        node = subprocess.Popen([str(DICOM_NODE), "serve", "--config", str(work / "node.yaml")], stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(work), start_new_session=True)
        log.close()
        ready = "connected to the Dask scheduler" if kind == "dask" else "worker pool:"
        end = time.monotonic() + 120
        while ready not in (work / "node.log").read_text(errors="replace"):
            if node.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"node did not come up:\n{(work / 'node.log').read_text()[-3000:]}")
            time.sleep(0.1)
        time.sleep(2.0)  # the local forkserver's preload (background) is done; both sides start warm
        t0 = time.monotonic()
        senders = [subprocess.Popen([STORESCU, "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for files in series]
        for s in senders:
            out, _ = s.communicate(timeout=300)
            if s.returncode != 0:
                raise RuntimeError(f"storescu failed ({s.returncode}): {out[-2000:]}\nnode log:\n"
                                   f"{(work / 'node.log').read_text(errors='replace')[-3000:]}")
        sent = time.monotonic() - t0
        end = time.monotonic() + 900
        while len(pacs.seg_series()) < len(series):
            if time.monotonic() > end:
                raise RuntimeError(f"not every SEG arrived:\n{(work / 'node.log').read_text()[-3000:]}")
            time.sleep(0.1)
        last_seg = time.monotonic() - t0
        from node.store import Store

        store = Store(work / "var" / "node.db", migrate=False)
        try:
            jobs = store.list_jobs()
            job_s = [j.finished_at - j.started_at for j in jobs if j.finished_at and j.started_at]
            where = sorted({j.params.slot.worker or j.params.slot.name for j in jobs if j.params.slot})
        finally:
            store.close()
        return {"kind": kind, "last_seg_s": last_seg, "sent_s": sent, "jobs": len(jobs),
                "job_s_mean": statistics.mean(job_s) if job_s else None, "ran_on": where}
    finally:
        if node is not None and node.poll() is None:
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        pacs.stop()


def _noop() -> int:
    return 0


def task_round_trip(address: str, n: int = 40) -> tuple[float, float]:
    """Median and p90 milliseconds of submitting an empty task and getting its result (the per-try
    cost of Dask itself, without the job)."""
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as client:
        client.submit(_noop, pure=False).result()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.submit(_noop, pure=False).result()
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def idle_cpu(cluster: Any, seconds: float = 20.0) -> float:
    """Percent of one core the cluster's own processes (scheduler, ``dicom-node worker`` supervisors,
    nannies, workers and their helpers) use while no task runs: what they take from the jobs on the
    same cores (Dask's timers, node.dask_worker.QUIET_DASK_CONFIG)."""
    import psutil

    procs: list[Any] = []
    for p in [cluster.scheduler, *cluster.workers.values()]:
        root = psutil.Process(p.pid)
        procs += [root, *root.children(recursive=True)]

    def used() -> float:
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    before = used()
    time.sleep(seconds)
    return (used() - before) / seconds * 100


def claims_figures(rounds: int) -> None:
    """The store side of the scale-out: :func:`bench.claims.claims` (PostgreSQL against SQLite, 4
    concurrent claimers), when bench/claims.py is in the tree."""
    path = REPO / "bench" / "claims.py"
    print("\nPostgreSQL claims (bench/claims.py):", flush=True)
    if not path.is_file():
        print("  bench/claims.py is not in this tree (the PostgreSQL store's benchmark)")
        return
    sys.path.insert(0, str(path.parent))  # by its own name: its claimer processes (spawn) import it again
    import claims

    claims.claims(jobs=2000, claimers=4, rounds=rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="runs per side (alternating order)")
    ap.add_argument("--size", default=None, help="series size WxHxS (default: the scan's 122x101x30)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-claims", action="store_true", help="skip bench/claims.py")
    args = ap.parse_args(argv)
    size: tuple[int, int, int] | None = None
    if args.size:
        w, h, d = (int(v) for v in args.size.split("x"))
        size = (w, h, d)
    from dask_cluster import DaskCluster

    root = Path(tempfile.mkdtemp(prefix="dicom-node-bench-cluster-"))
    try:
        series = build_series(root / "series", args.series, size)
        print(f"{args.series} series of {len(series[0])} instances, {args.workers} worker process(es) per side, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        with DaskCluster(root / "dask") as cluster:
            for i in range(args.workers):
                cluster.add_worker(f"w{i}", nthreads=1)
            cluster.wait_workers(args.workers)
            med_ms, p90_ms = task_round_trip(cluster.address)
            print(f"  empty Dask task round trip: median {med_ms:.1f} ms, p90 {p90_ms:.1f} ms", flush=True)
            idle = idle_cpu(cluster)
            print(f"  the cluster's processes while idle: {idle:.1f} % of one core", flush=True)
            order = []
            for r in range(args.rounds):
                order += ["local", "dask"] if r % 2 == 0 else ["dask", "local"]
            runs = []
            for n, kind in enumerate(order):
                res = run_once(kind, root / f"run{n}-{kind}", series, args.workers, cluster.address)
                res["load"] = os.getloadavg()[0]
                runs.append(res)
                print(f"  run {n + 1} {kind:<5}: last SEG {res['last_seg_s']:6.2f} s (sent in {res['sent_s']:.2f} s, "
                      f"{res['jobs']} jobs, {res['job_s_mean']:.2f} s claim to finish per job, load {res['load']:.1f}, "
                      f"ran on {', '.join(res['ran_on'])})", flush=True)
        med = {k: statistics.median(r["last_seg_s"] for r in runs if r["kind"] == k) for k in ("local", "dask")}
        print(f"time to the last SEG, median: local {med['local']:.2f} s, dask {med['dask']:.2f} s, "
              f"ratio dask/local {med['dask'] / med['local']:.3f} (target <= 1.05)")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "median": med, "task_ms": [med_ms, p90_ms],
                                                   "idle_cpu_percent": idle}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_claims:
        claims_figures(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
