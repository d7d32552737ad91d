"""Micro-benchmark: the receiver's index insert and spool write from many threads, one by one vs grouped.

    PYTHONPATH=$PWD python bench/index_group.py [--threads 16] [--instances 150] [--rounds 3] [--work-ms 2] [--spool]

Each of ``--threads`` threads plays an association: for each of ``--instances`` instances it does
``--work-ms`` of pure-Python work (holding the GIL, as the receiver's checks do), then indexes the
instance, timed: ``one`` = :meth:`Store.record_instance` (a transaction per instance, the path
before group commit), ``grouped`` = :meth:`Store.record_instance_grouped` (what the receiver
uses).  Each thread sends its own series (as the soak's senders do).  With ``--spool`` the
durable spool write (temp, fsync, rename, folder fsync) is timed before it: ``one`` with an
fsync of the folder per instance, ``grouped`` with the shared folder fsync
(:class:`node.durable.FolderSync`); ``--shared-series`` makes all threads send the same series
(one folder: the case the shared fsync is for).  The two modes alternate, ``--rounds`` times
each, on a fresh store every time.  Prints p50/p99/max per instance, instances per second,
transactions and folder fsyncs, and the load average: figures only, compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import node  # the code of the environment: PYTHONPATH=<checkout> picks the one to measure (printed)
from node import durable
from node.store import InstanceRecord, Store

DATA = os.urandom(74 * 1024)  # the soak's instances are ~74 KB


def folder_fsync_each() -> Any:
    """A :class:`node.durable.FolderSync` that fsyncs the folder once per rename, as before it."""

    class FolderFsyncEach(durable.FolderSync):
        def after_rename(self, folder: str | os.PathLike[str]) -> None:
            durable.fsync_dir(folder)
            self.fsyncs += 1

    return FolderFsyncEach()


def busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        x += 1


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def one_round(mode: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=root))
    store = Store(work / "node.db")
    record = store.record_instance if mode == "one" else store.record_instance_grouped
    saved: Any = getattr(durable, "FOLDER_SYNC", None)  # (a checkout before FolderSync: --modes one, no --spool)
    folder_sync: Any = None
    if args.spool:
        folder_sync = durable.FolderSync() if mode == "grouped" else folder_fsync_each()
        durable.FOLDER_SYNC = folder_sync  # what durable.atomic_write uses (restored after the round)
    index_s: list[float] = []
    spool_s: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(args.threads + 1)
    transactions = [0]
    tx = store.engine.transaction

    def counted() -> Any:
        transactions[0] += 1
        return tx()

    store.engine.transaction = counted  # type: ignore[method-assign]  # counting the transactions begun

    def sender(k: int) -> None:
        series = "S" if args.shared_series else f"S{k}"
        mine_i: list[float] = []
        mine_s: list[float] = []
        start.wait()
        for i in range(args.instances):
            busy(args.work_ms)
            path = work / "spool" / series / f"{k}.{i}.dcm"
            if args.spool:
                t = time.perf_counter()
                durable.atomic_write(path, DATA)  # the receiver's spool write (temp, fsync, rename, folder fsync)
                mine_s.append(time.perf_counter() - t)
            rec = InstanceRecord(
                sop_instance_uid=f"{k}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series,
                study_uid="T", path=str(path), transfer_syntax="1.2.840.10008.1.2.1", size=len(DATA),
                calling_ae="SOAK", called_ae="DICOMNODE", peer_address="127.0.0.1",
                tags={"Modality": "CT", "SeriesDescription": "bench", "ImageType": ["ORIGINAL", "PRIMARY"]},
            )
            t = time.perf_counter()
            record(rec)
            mine_i.append(time.perf_counter() - t)
        with lock:
            index_s.extend(mine_i)
            spool_s.extend(mine_s)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(args.threads)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if args.spool:
        durable.FOLDER_SYNC = saved
    n = store.count_instances()
    assert n == args.threads * args.instances, n
    store.close()
    out = {
        "index_p50": pct(index_s, 0.5) * 1e3, "index_p99": pct(index_s, 0.99) * 1e3, "index_max": max(index_s) * 1e3,
        "per_s": n / wall, "transactions": float(transactions[0]),
    }
    if spool_s:
        out.update(spool_p50=pct(spool_s, 0.5) * 1e3, spool_p99=pct(spool_s, 0.99) * 1e3,
                   spool_max=max(spool_s) * 1e3,
                   fsyncs=float(folder_sync.fsyncs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--instances", type=int, default=150, help="per thread and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    ap.add_argument("--work-ms", type=float, default=2.0, help="pure-Python work per instance before indexing")
    ap.add_argument("--spool", action="store_true", help="time the durable spool write too")
    ap.add_argument("--shared-series", action="store_true", help="all threads send the same series (one folder)")
    ap.add_argument("--modes", default="one,grouped", choices=["one,grouped", "one", "grouped"],
                    help="'one' alone runs on a checkout before group commit too (PYTHONPATH=that checkout)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    print(f"{args.threads} threads x {args.instances} instances, {args.work_ms} ms Python work each, "
          f"spool {'on' if args.spool else 'off'}{', one series' if args.shared_series else ''}; "
          f"node code {Path(node.__file__).parent.parent}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    modes = tuple(args.modes.split(","))
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            res = one_round(mode, args, root)
            results[mode].append(res)
            spool = (f"  spool p50 {res['spool_p50']:6.1f} p99 {res['spool_p99']:6.1f} max {res['spool_max']:6.1f} ms,"
                     f" {res['fsyncs']:.0f} folder fsyncs" if "spool_p50" in res else "")
            print(f"round {r + 1} {mode:8s} index p50 {res['index_p50']:6.2f} p99 {res['index_p99']:6.2f} "
                  f"max {res['index_max']:6.1f} ms, {res['per_s']:6.0f} instances/s, "
                  f"{res['transactions']:.0f} transactions{spool}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for key in ("index_p50", "index_p99", "per_s") + (("spool_p50", "spool_p99") if args.spool else ()):
        if len(modes) == 1:
            print(f"median {key:10s} {modes[0]} {statistics.median(x[key] for x in results[modes[0]]):8.2f}")
            continue
        one = statistics.median(x[key] for x in results["one"])
        grouped = statistics.median(x[key] for x in results["grouped"])
        print(f"median {key:10s} one {one:8.2f}  grouped {grouped:8.2f}  one/grouped {one / grouped:5.2f}x")
    import shutil

    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
