"""Ingest benchmark: DCMTK ``storescu`` over loopback to the node, DCMTK ``storescp`` and Orthanc.

    python bench/ingest.py [--series DIR] [--repeat N] [--keep] [--early-start S]

1. A 300-instance 512x512 CT series (Explicit VR Little Endian) is made with
   :func:`node.tools.synth_series.write_series` from
   ``$NODE_TEST_DATA/ct-body-3mm/ct.nii.gz`` resampled to 512x512x300 (cached in
   ``$TMPDIR/dicom-node-bench-series-512x512x300``; ``--series`` uses another folder).
2. The same files are sent with one ``storescu`` run (one association) to

   (a) the node: ``dicom-node serve`` (receiver with durable spool + indexing in the
       job store, the scheduler and worker pool running), rule body -> bones,
       destination Orthanc;
   (b) ``storescp`` writing to a temp folder (its defaults);
   (c) Orthanc (Debian package, temp storage, no plugins).

   Throughput = file bytes / wall time of the ``storescu`` run, best of ``--repeat``
   (each repeat targets a fresh node / storescp / Orthanc storage, so nothing is a
   duplicate).
3. Latency (first node repeat only): from the end of the ``storescu`` run to the
   node (last instance sent) to the SEG being stored in Orthanc (bones profile,
   quiet period 10 s, ``early_start_s`` the node's default unless ``--early-start``),
   with the node's own timestamps for the stages (job rows, dispatch rows, and the
   completion line of the node's log).

Prints figures only; no assertion on timing.  Targets from the issue: node >=
1.5x storescp and >= 5x Orthanc; SEG latency <= quiet period + 15 s.

``--console-load`` instead compares the node's receive with its operations console (a) off
(``http.enabled: false``), (b) on and idle, (c) on and under load: ``--console-clients``
threads loop over API and page requests (health, jobs/series lists where present, metrics,
destinations, audit) with an API token for the whole send (``--console-think`` seconds between
requests; default none).  Each repeat runs the three in a rotated order, each on a fresh node
whose series never complete (no job competes for the CPU), sending once the node is idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/orthanc.py: the Orthanc helper
from orthanc import Orthanc, free_port

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
NIFTI = DATA / "ct-body-3mm" / "ct.nii.gz"
SIZE = (512, 512, 300)
QUIET_S = 10.0
DICOM_NODE = Path(sys.executable).with_name("dicom-node")


def make_series(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) == SIZE[2]:
        return files
    from node.tools.synth_series import write_series

    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    files = write_series(NIFTI, folder, size=SIZE, transfer_syntax="explicit",
                         series_description="CT Body bench 3mm", series_number=2)
    print(f"series: wrote {len(files)} files in {time.perf_counter() - t:.1f} s -> {folder}", flush=True)
    return sorted(files)


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def storescu(port: int, aec: str, files: list[Path]) -> float:
    """Wall seconds of one storescu run sending ``files`` in one association."""
    cmd = ["storescu", "-aet", "BENCHSCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
    return dt


def start_node(work: Path, pacs: Orthanc, early_start_s: float | None = None) -> tuple[subprocess.Popen, int, Path]:
    import yaml

    port = free_port()
    rules = work / "routing_rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        "name": "body-ct-bones", "match": {"Modality": "CT", "SeriesDescription": {"regex": "(?i)body"}},
        "profile": "bones", "destinations": ["pacs"], "share": True}]}))
    cfg = {
        "ae_title": "DICOMNODE", "port": port, "bind_address": "127.0.0.1", "storage": str(work / "var"),
        "quiet_period_s": QUIET_S, "rules": str(rules), "profiles": str(REPO / "profiles"),
        "share": {"root": str(work / "share")},
        "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        "dispatch_retry": {"max_attempts": 10, "backoff_base_s": 2, "backoff_max_s": 30},
        "log_level": "INFO",
    }
    if early_start_s is not None:
        cfg["early_start_s"] = early_start_s
    (work / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = open(work / "node.log", "ab")
    proc = subprocess.Popen([str(DICOM_NODE), "serve", "--config", str(work / "node.yaml")], stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(work), start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while "listening as" not in (work / "node.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("dicom-node serve did not start:\n" + (work / "node.log").read_text()[-3000:])
        time.sleep(0.1)
    return proc, port, work / "var" / "node.db"


def start_console_node(work: Path, console: bool) -> tuple[subprocess.Popen, int, str, str]:
    """A node whose series never complete (no job runs), with or without its console; with it, an admin
    API token made beforehand in its store.  Returns (process, DICOM port, console URL, token)."""
    import yaml

    from node.console.auth import Role, create_user, new_token, token_hash
    from node.store import Store

    port, http_port = free_port(), free_port()
    cfg = {
        "ae_title": "DICOMNODE", "port": port, "bind_address": "127.0.0.1", "storage": str(work / "var"),
        "quiet_period_s": 3600, "early_start_s": 0, "profiles": str(REPO / "profiles"), "log_level": "INFO",
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        "http": {"enabled": console, "port": http_port},
    }
    (work / "node.yaml").write_text(yaml.safe_dump(cfg))
    store = Store(work / "var" / "node.db")
    token = new_token()
    store.add_token(create_user(store, "bench", Role.ADMIN, "bench-password-1"), "bench", token_hash(token))
    store.close()
    log = open(work / "node.log", "ab")
    proc = subprocess.Popen([str(DICOM_NODE), "serve", "--config", str(work / "node.yaml")], stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(work), start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while "dicom-node: console" not in (work / "node.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("dicom-node serve did not start:\n" + (work / "node.log").read_text()[-3000:])
        time.sleep(0.1)
    return proc, port, f"http://127.0.0.1:{http_port}", token


#: what the load clients ask for in turn (those another build does not have answer 404, still work)
CONSOLE_PATHS = ("/api/v1/health", "/", "/metrics", "/api/v1/destinations", "/destinations", "/api/v1/audit",
                 "/api/v1/jobs", "/jobs", "/api/v1/series", "/series")


class ConsoleLoad:
    """``clients`` threads requesting :data:`CONSOLE_PATHS` in a loop until stopped."""

    def __init__(self, url: str, token: str, clients: int, think_s: float = 0.0) -> None:
        import threading

        self.url, self.token, self.think_s = url, token, think_s
        self.stop_flag = threading.Event()
        self.latencies: list[float] = []
        self.errors = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        import requests

        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {self.token}"
        n = i
        while not self.stop_flag.is_set():
            path = CONSOLE_PATHS[n % len(CONSOLE_PATHS)]
            n += 1
            t = time.perf_counter()
            try:
                r = s.get(self.url + path, timeout=30)
                ok = r.status_code in (200, 404)
            except OSError:
                ok = False
            self.latencies.append(time.perf_counter() - t)
            self.errors += 0 if ok else 1
            if self.think_s:
                self.stop_flag.wait(self.think_s)

    def __enter__(self) -> "ConsoleLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=60)


def cpu_split(node: subprocess.Popen, console_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the node process, its console process and this benchmark
    process (the console load's client threads): where the CPU went while the loaded arm sent."""
    import psutil

    def used(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    return {"node": used(node.pid), "console": used(console_pid), "load clients": used(os.getpid())}


def settle(proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """Wait until the node and its children are idle (under 10 % of a CPU over 1 s): the worker pool's
    forkserver preloads the pipeline modules in the background after the node listens, for several
    seconds on a busy machine; the arm whose node was ready soonest (console off) sent during it."""
    import psutil

    deadline = time.monotonic() + timeout_s
    root = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(1.0)
        busy = 0.0
        for p in procs:
            try:
                busy += p.cpu_percent(None)
            except psutil.Error:
                pass
        if busy < 10.0:
            return


def console_load(files: list[Path], repeat: int, clients: int, base: Path, mb: float, think_s: float = 0.0) -> None:
    arms = ["off", "idle", "loaded"]
    times: dict[str, list[float]] = {a: [] for a in arms}
    served: list[tuple[int, float, list[float], int]] = []
    for r in range(repeat):
        order = arms[r % 3:] + arms[:r % 3]
        for arm in order:
            work = base / f"console-{r}-{arm}"
            work.mkdir()
            proc, port, url, token = start_console_node(work, console=arm != "off")
            settle(proc)  # the node's start-up work (the forkserver's preload) is over in every arm
            try:
                if arm == "loaded":
                    with ConsoleLoad(url, token, clients, think_s) as load:
                        time.sleep(1.0)  # the load is on before the send starts
                        before = len(load.latencies)
                        import requests

                        console_pid = int(requests.get(url + "/api/v1/health", timeout=30,
                                                       headers={"Authorization": f"Bearer {token}"}).json()["console_pid"])
                        cpu0 = cpu_split(proc, console_pid)
                        dt = storescu(port, "DICOMNODE", files)
                        cpu1 = cpu_split(proc, console_pid)
                        during = load.latencies[before:]
                    served.append((len(during), dt, sorted(during), load.errors))
                    used = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
                    print("  CPU during the send (s): " + ", ".join(f"{k} {v:.2f}" for k, v in used.items()), flush=True)
                else:
                    dt = storescu(port, "DICOMNODE", files)
                times[arm].append(dt)
                print(f"repeat {r + 1} {arm:<7} {dt:6.2f} s  {mb / dt:6.1f} MB/s", flush=True)
            finally:
                stop(proc)
    print()
    print(f"{'console':<10}{'best s':>8}{'median s':>10}{'MB/s (best)':>13}{'vs off':>8}")
    off = min(times["off"])
    for arm in arms:
        best, med = min(times[arm]), sorted(times[arm])[len(times[arm]) // 2]
        print(f"{arm:<10}{best:>8.2f}{med:>10.2f}{mb / best:>13.1f}{best / off:>7.2f}x")
    for n, dt, lat, errors in served:
        p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
        p95 = lat[int(len(lat) * 0.95)] * 1000 if lat else float("nan")
        print(f"console under load: {n} requests during a {dt:.2f} s send ({n / dt:.0f}/s, {clients} clients),"
              f" p50 {p50:.0f} ms, p95 {p95:.0f} ms, {errors} error(s)")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def node_stages(db: Path) -> dict[str, float]:
    c = sqlite3.connect(str(db))
    c.row_factory = sqlite3.Row
    out: dict[str, float] = {}
    s = c.execute("SELECT * FROM series ORDER BY first_received_at DESC LIMIT 1").fetchone()
    j = c.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
    d = c.execute("SELECT * FROM dispatches WHERE kind = 'dicom' ORDER BY id DESC LIMIT 1").fetchone()
    if s:
        out["last_received"] = s["last_received_at"]
        out["instances"] = s["instance_count"]
    if j:
        out["job_created"] = j["created_at"]
        out["job_started"] = j["started_at"] or 0
        out["job_finished"] = j["finished_at"] or 0
    if d:
        out["dispatch_created"] = d["created_at"]
        out["seg_sent"] = d["sent_at"] or 0
    c.close()
    return out


def completed_at(log: Path) -> float | None:
    """When the node logged the series complete (end of the quiet period), from its log."""
    import re

    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO node\.completion: series .* complete:", line)
        if m:
            return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=Path, default=Path(tempfile.gettempdir()) / "dicom-node-bench-series-512x512x300")
    ap.add_argument("--repeat", type=int, default=1, help="storescu runs per target (best is reported)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folders")
    ap.add_argument("--seg-timeout", type=float, default=900.0, help="seconds to wait for the SEG in Orthanc")
    ap.add_argument("--targets", default="node,storescp,orthanc", help="comma-separated subset to run")
    ap.add_argument("--early-start", type=float, default=None,
                    help="the node's early_start_s (default: the node's default; 0 = off)")
    ap.add_argument("--console-load", action="store_true",
                    help="instead: the node's receive with its console off, idle and under load")
    ap.add_argument("--console-clients", type=int, default=4, help="request loops of --console-load")
    ap.add_argument("--console-think", type=float, default=0.0,
                    help="seconds each --console-load loop waits between requests (0: back to back)")
    args = ap.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install dcmtk)")
            return 2
    if not NIFTI.is_file() and not args.series.is_dir():
        print(f"{NIFTI} not found (set NODE_TEST_DATA)")
        return 2

    files = make_series(args.series)
    total = sum(f.stat().st_size for f in files)
    mb = total / 1e6
    print(f"series: {len(files)} instances, {mb:.1f} MB (Explicit VR LE, {SIZE[0]}x{SIZE[1]})")
    print(f"machine: {os.cpu_count()} CPU(s); all peers on loopback, storage on {tempfile.gettempdir()}")

    base = Path(tempfile.mkdtemp(prefix="dicom-node-bench-run-"))
    if args.console_load:
        try:
            console_load(files, max(1, args.repeat), args.console_clients, base, mb, args.console_think)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return 0
    results: dict[str, float] = {}
    seg_latency = None
    stages: dict[str, float] = {}
    try:
        targets = set(args.targets.split(","))
        # (b) storescp
        best = float("inf")
        for r in range(args.repeat if "storescp" in targets else 0):
            out = base / f"storescp-{r}"
            out.mkdir()
            port = free_port()
            scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(port)
                best = min(best, storescu(port, "STORESCP", files))
            finally:
                stop(scp)
            assert len(list(out.iterdir())) == len(files), "storescp did not store every instance"
        results["storescp"] = best

        # (c) Orthanc
        best = float("inf")
        for r in range(args.repeat if "orthanc" in targets else 0):
            with Orthanc(base / f"orthanc-{r}") as pacs:
                best = min(best, storescu(pacs.dicom_port, pacs.aet, files))
                n = pacs.statistics()["CountInstances"]
                assert n == len(files), f"Orthanc stored {n} instances"
        results["orthanc"] = best

        # (a) the node, then the SEG latency to an Orthanc PACS (last repeat)
        best = float("inf")
        for r in range(args.repeat if "node" in targets else 0):
            work = base / f"node-{r}"
            work.mkdir()
            with Orthanc(base / f"pacs-{r}") as pacs:
                proc, port, db = start_node(work, pacs, args.early_start)
                try:
                    dt = storescu(port, "DICOMNODE", files)
                    t_sent = time.time()
                    best = min(best, dt)
                    if r == 0:  # the SEG latency once (the pipeline takes minutes on a small machine)
                        found = pacs.wait_for(lambda: pacs.seg_series(), timeout_s=args.seg_timeout, interval_s=0.1)
                        t_seg = time.time()
                        if found:
                            seg_latency = t_seg - t_sent
                            deadline = time.monotonic() + 10  # the dispatcher records 'sent' just after
                            while not node_stages(db).get("seg_sent") and time.monotonic() < deadline:
                                time.sleep(0.1)
                            deadline = time.monotonic() + 60  # the meshes may still be in progress
                            while not node_stages(db).get("job_finished") and time.monotonic() < deadline:
                                time.sleep(0.2)
                        stages = node_stages(db)
                        stages["t_sent"] = t_sent
                        stages["series_complete"] = completed_at(work / "node.log") or 0
                    else:
                        time.sleep(1)
                        stages["instances"] = node_stages(db).get("instances", 0)
                finally:
                    stop(proc)
                if stages.get("instances") != len(files):
                    print(f"WARNING: node indexed {stages.get('instances')} of {len(files)} instances")
        results["node"] = best
    finally:
        if args.keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"{'receiver':<28}{'seconds':>9}{'MB/s':>9}{'inst/s':>9}")
    labels = {"node": "(a) dicom-node (spool+index)", "storescp": "(b) DCMTK storescp", "orthanc": "(c) Orthanc"}
    for key in ("node", "storescp", "orthanc"):
        dt = results.get(key, float("inf"))
        print(f"{labels[key]:<28}{dt:>9.2f}{mb / dt:>9.1f}{len(files) / dt:>9.1f}")
    r_scp = results.get("storescp", float("nan")) / results.get("node", float("nan"))
    r_orth = results.get("orthanc", float("nan")) / results.get("node", float("nan"))
    print(f"node / storescp: {r_scp:.2f}x (target >= 1.5x)")
    print(f"node / Orthanc:  {r_orth:.2f}x (target >= 5x)")
    if seg_latency is None:
        print("SEG latency: no SEG reached Orthanc")
    else:
        print(f"SEG latency (last instance sent -> SEG in Orthanc, bones): {seg_latency:.1f} s "
              f"(target <= quiet period {QUIET_S:.0f} s + 15 s = {QUIET_S + 15:.0f} s)")
        t0 = stages.get("t_sent", 0)
        parts = [("last instance received", "last_received"),
                 ("job created (routed; early start if before completion)", "job_created"),
                 ("job started", "job_started"),
                 ("series complete (quiet period over)", "series_complete"),
                 ("SEG written, its C-STORE queued", "dispatch_created"),
                 ("job finished (meshes written too)", "job_finished"),
                 ("SEG stored in Orthanc (dispatch sent)", "seg_sent")]
        for label, key in sorted(parts, key=lambda p: stages.get(p[1]) or 0):
            if stages.get(key):
                print(f"  {label:<55} {stages[key] - t0:+7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
