"""Soak benchmark: many concurrent senders for minutes while jobs run, hostile connections mixed in.

    python bench/soak.py [--senders 16] [--minutes 5] [--size 192x192x40] [--workers N] [--hostile-every 3]
                         [--rate R | --dcmtk-senders] [--no-jobs]

1. A small CT series is made once from ``$NODE_TEST_DATA/ct-body-3mm-small/ct.nii.gz``
   (:func:`node.tools.synth_series.write_series`, cached in ``$TMPDIR``).
2. ``dicom-node serve`` runs with a rule sending every CT series to the ``bones`` profile (kept
   locally, no destinations), ``quiet_period_s`` 3, so the worker pool keeps the CPUs busy.
3. ``--senders`` processes each send that series again and again, under fresh Study/Series/SOP
   UIDs every time (one association per series), for ``--minutes``; each C-STORE's response time
   is measured in the sender, from sending the request (the instance already encoded to a file)
   to the answer.  Without ``--rate`` each sender sends the next instance as soon as the last one
   is answered (the node's throughput at saturation); with ``--rate R`` at most R instances a
   second each, as a scanner sends (the response time at a given load).
4. Every ``--hostile-every`` seconds a hostile connection (node/scp/guard.py's cases): a stalled
   partial PDU, a 4 GiB length claim, an unknown first PDU, one byte per second, a truncated data
   set over a real association.
5. Afterwards it waits (``--settle-minutes``) for every series to reach ``done``.

Prints: instances acknowledged (0x0000) vs stored (indexed, file present: 0 lost), p50/p99/max
C-STORE response time, hostile connections made and how each ended, whether every series reached
done, and the CPU load meanwhile.  Figures only; the issue's target is p99 < 100 ms with the
workers keeping the CPUs busy.  See bench/README.md for measured figures.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
NIFTI = DATA / "ct-body-3mm-small" / "ct.nii.gz"
DICOM_NODE = Path(sys.executable).with_name("dicom-node")
QUIET_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_series(folder: Path, size: tuple[int, int, int]) -> list[Path]:
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) == size[2]:
        return files
    from node.tools.synth_series import write_series

    shutil.rmtree(folder, ignore_errors=True)
    return sorted(write_series(NIFTI, folder, size=size, transfer_syntax="explicit",
                               series_description="CT Body soak", series_number=3))


def start_node(work: Path, workers: int | None, jobs: bool = True) -> tuple[subprocess.Popen[bytes], int, Path]:
    import yaml

    port = free_port()
    rules = work / "routing_rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        # --no-jobs: a rule no series matches (each is kept, unrouted): the receive path alone
        "name": "soak-bones", "match": {"Modality": "CT" if jobs else "NO-SUCH-MODALITY"}, "profile": "bones",
        "destinations": [],
        "share": False}]}))
    cfg: dict[str, Any] = {
        "ae_title": "DICOMNODE", "port": port, "bind_address": "127.0.0.1", "storage": str(work / "var"),
        "quiet_period_s": QUIET_S, "rules": str(rules), "profiles": str(REPO / "profiles"),
        "share": {"root": str(work / "share")}, "destinations": {}, "log_level": "INFO",
        "max_associations": 32, "timeouts": {"acse_s": 5, "dimse_s": 30, "network_s": 10},
        "limits": {"max_connections_per_peer": 64},
    }
    if workers:
        cfg["workers"] = workers
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


# -- senders (processes: the client side must not share one GIL) ---------------------------


def sender(idx: int, port: int, files: list[str], until: float, out: Any, rate: float = 0.0) -> None:
    """Send the series again and again until ``until``; ``rate`` > 0: at most that many instances a
    second, on a fixed schedule (a send that falls behind it goes at once: the time an instance
    waits for the previous one's answer is the sender's, not counted)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # made at import

    # what pynetdicom says in the sender (a response its reactor thread took: see keep_responses)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage()[:120])  # type: ignore[method-assign]  # a collector
    logging.getLogger("pynetdicom").addHandler(handler)
    guard = os.environ.get("SOAK_SENDER_RACE") != "1"  # 1: the plain pynetdicom SCU, to compare
    if guard:
        from node.scp.sender import keep_responses
    template = [dcmread(f) for f in files]
    # each instance is encoded to a file before its C-STORE is timed (then sent as its bytes are):
    # the figure is the time from sending the request to the answer, not the client's encoding
    _config.STORE_SEND_CHUNKED_DATASET = True
    scratch = Path(tempfile.mkdtemp(prefix=f"dicom-node-soak-sender{idx:02d}-"))
    current = scratch / "instance.dcm"
    ae = AE(ae_title=f"SOAK{idx:02d}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    times: list[float] = []
    acked: list[str] = []
    failed = 0
    series: list[str] = []
    aborts: list[str] = []
    due = time.perf_counter() + random.Random(idx).uniform(0, 1 / rate) if rate > 0 else 0.0  # senders apart
    while time.time() < until:
        study, ser = generate_uid(), generate_uid()
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if not assoc.is_established:
            failed += len(template)
            time.sleep(0.5)
            continue
        series.append(ser)
        if guard:
            keep_responses(assoc)
        for ds in template:
            if not assoc.is_established:  # aborted: the rest of this series is not sent
                failed += 1
                continue
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, ser
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(current, enforce_file_format=True)
            if rate > 0:
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                due = max(due, time.perf_counter()) + 1 / rate  # behind: the schedule goes on from now, no burst
            t = time.perf_counter()
            try:
                status = assoc.send_c_store(current)
            except Exception as exc:  # noqa: BLE001 - counted; the association is gone
                aborts.append(f"{type(exc).__name__}: {exc}"[:200])
                failed += 1
                continue
            times.append(time.perf_counter() - t)
            if status and int(status.Status) == 0:
                acked.append(str(ds.SOPInstanceUID))
            else:
                failed += 1
        if assoc.is_established:
            assoc.release()
        elif not aborts or aborts[-1] != "aborted":
            aborts.append("aborted")
    shutil.rmtree(scratch, ignore_errors=True)
    out.put((idx, times, acked, failed, series, aborts, warnings))


_DCMTK_LOG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %m%n
"""


def _fresh_uid(uid: str, rng: random.Random) -> str:
    """A new UID of the same length as ``uid`` (its last component's digits drawn again), so the
    encoded files can be patched in place without re-encoding."""
    head, _, tail = uid.rpartition(".")
    digits = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(len(tail) - 1))
    return f"{head}.{digits}"


def dcmtk_sender(idx: int, port: int, files: list[str], until: float, out: Any, rate: float = 0.0) -> None:
    """As :func:`sender`, with DCMTK's ``storescu`` (C: the client takes little CPU, as senders on other
    hosts would not take any of the node's): one ``storescu`` per series (one association), the
    series' files patched with fresh UIDs of the same length; each C-STORE's time from storescu's
    own log (``Sending Store Request`` to ``Received Store Response``, millisecond timestamps).
    No pacing (``rate`` is not supported here: storescu sends as fast as it is answered)."""
    import re

    from pydicom import dcmread

    rng = random.Random(1000 + idx)
    scratch = Path(tempfile.mkdtemp(prefix=f"dicom-node-soak-dcmtk{idx:02d}-"))
    log_cfg = scratch / "log.cfg"
    log_cfg.write_text(_DCMTK_LOG)
    first = dcmread(files[0], stop_before_pixels=True)
    study, ser = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    templates = [(Path(f).read_bytes(), str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)) for f in files]
    sent_re = re.compile(r"(\d+\.\d+) Sending Store Request")
    got_re = re.compile(r"(\d+\.\d+) Received Store Response \((\w+)")
    times: list[float] = []
    acked: list[str] = []
    failed = 0
    series: list[str] = []
    aborts: list[str] = []
    while time.time() < until:
        new_study, new_ser = _fresh_uid(study, rng), _fresh_uid(ser, rng)
        folder = scratch / "series"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        sops: list[str] = []
        paths: list[str] = []
        for k, (raw, sop) in enumerate(templates):
            new_sop = _fresh_uid(sop, rng)
            data = (raw.replace(study.encode(), new_study.encode()).replace(ser.encode(), new_ser.encode())
                    .replace(sop.encode(), new_sop.encode()))
            path = folder / f"{k:04d}.dcm"
            path.write_bytes(data)
            sops.append(new_sop)
            paths.append(str(path))
        series.append(new_ser)
        r = subprocess.run(["storescu", "-lc", str(log_cfg), "-aet", f"SOAK{idx:02d}", "-aec", "DICOMNODE",
                            "-to", "30", "-ta", "30", "-td", "30", "127.0.0.1", str(port), *paths],
                           capture_output=True, text=True, timeout=600)
        text = r.stdout + r.stderr
        sent_at = [float(m.group(1)) for m in sent_re.finditer(text)]
        answers = [(float(m.group(1)), m.group(2)) for m in got_re.finditer(text)]
        for k, (t_sent, (t_got, status)) in enumerate(zip(sent_at, answers)):
            times.append(t_got - t_sent)
            if status == "Success":
                acked.append(sops[k])
            else:
                failed += 1
        failed += len(paths) - len(answers)
        if r.returncode != 0:
            aborts.append(f"storescu exit {r.returncode}: " + (text.strip().splitlines() or [""])[-1][:150])
    shutil.rmtree(scratch, ignore_errors=True)
    out.put((idx, times, acked, failed, series, aborts, []))


# -- hostile connections ----------------------------------------------------------------------


def hostile(port: int, until: float, every: float, tally: dict[str, int]) -> None:
    rng = random.Random(17)
    cases = ["stall", "huge", "unknown", "slowloris", "truncated"]
    while time.time() < until:
        case = rng.choice(cases)
        try:
            ended = _hostile_one(port, case)
        except Exception as exc:  # noqa: BLE001 - a failed hostile try is counted, not fatal
            ended = f"error {type(exc).__name__}"
        key = f"{case}: {ended}"
        tally[key] = tally.get(key, 0) + 1
        time.sleep(every)


def _hostile_one(port: int, case: str) -> str:
    if case == "truncated":
        from pydicom.uid import UID, generate_uid
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # made at import

        ae = AE(ae_title="HOSTILE")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if not assoc.is_established:
            return "not associated"
        from pydicom.dataset import Dataset, FileMetaDataset

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
        ds.Modality, ds.Rows, ds.Columns = "CT", 512, 512  # no pixel data: cut before the image
        status = assoc.send_c_store(ds)
        assoc.release()
        return f"status 0x{int(status.Status):04X}" if status else "no status"
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    t = time.monotonic()
    try:
        if case == "stall":
            s.sendall(b"\x01\x00\x00")
        elif case == "huge":
            s.sendall(b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64)
        elif case == "unknown":
            s.sendall(b"\x09\x00\x00\x00\x00\x04abcd")
        elif case == "slowloris":
            for b in b"\x01\x00\x00\x00\x01\x00" + b"\x00" * 40:
                s.send(bytes([b]))
                time.sleep(1.0)
        while s.recv(4096):
            pass
        return f"closed after {time.monotonic() - t:.0f} s"
    except OSError:
        return f"closed after {time.monotonic() - t:.0f} s"
    finally:
        s.close()


# -- results -----------------------------------------------------------------------------------


def stored(db: Path, acked: list[str]) -> tuple[int, list[str]]:
    c = sqlite3.connect(str(db))
    have = {r[0]: r[1] for r in c.execute("SELECT sop_instance_uid, path FROM instances")}
    c.close()
    missing = [u for u in acked if u not in have or not Path(have[u]).is_file()]
    return len(acked) - len(missing), missing


def series_states(db: Path, uids: list[str]) -> dict[str, int]:
    c = sqlite3.connect(str(db))
    out: dict[str, int] = {}
    for uid in uids:
        row = c.execute("SELECT state FROM series WHERE series_uid = ?", (uid,)).fetchone()
        state = row[0] if row else "missing"
        out[state] = out.get(state, 0) + 1
    c.close()
    return out


def print_node_side(log: Path) -> None:
    """The node's own view: its C-STORE times by part (node/scp/timing.py), slow C-STOREs, and
    associations it ended for want of data (pynetdicom's network timeout)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = text.splitlines()
    since = [ln for ln in lines if "receiver, since start:" in ln]
    if since:
        print("node:", since[-1].split("receiver, since start: ", 1)[1])
    print(f"node: {sum('slow C-STORE handler' in ln for ln in lines)} slow C-STORE handler(s) (> 1 s), "
          f"{sum('slow C-STORE from' in ln for ln in lines)} C-STORE(s) > 1 s received-to-answered, "
          f"{sum('Network timeout reached' in ln for ln in lines)} network timeout(s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--senders", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--size", default="192x192x40", help="series size, columns x rows x slices")
    ap.add_argument("--workers", type=int, default=None, help="the node's CPU job slots (default: its own)")
    ap.add_argument("--hostile-every", type=float, default=3.0, help="seconds between hostile connections")
    ap.add_argument("--settle-minutes", type=float, default=10.0, help="wait this long for every series to be done")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="instances per second per sender (default 0: each sends as fast as it is answered)")
    ap.add_argument("--dcmtk-senders", action="store_true",
                    help="senders run DCMTK's storescu (C) instead of pynetdicom (no --rate)")
    ap.add_argument("--no-jobs", action="store_true",
                    help="route no series (no jobs run): the receive path alone, to compare with the default")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args(argv)
    if args.dcmtk_senders and args.rate:
        ap.error("--rate is for the pynetdicom senders (storescu sends as fast as it is answered)")
    if not NIFTI.is_file():
        print(f"{NIFTI} not found (set NODE_TEST_DATA)")
        return 2
    import psutil

    w, h, n = (int(v) for v in args.size.split("x"))
    files = make_series(Path(tempfile.gettempdir()) / f"dicom-node-soak-{w}x{h}x{n}", (w, h, n))
    work = Path(tempfile.mkdtemp(prefix="dicom-node-soak-"))
    proc, port, db = start_node(work, args.workers, jobs=not args.no_jobs)
    # the node runs the code its environment imports (an editable install's checkout unless
    # PYTHONPATH says otherwise): name it, so that a figure is never credited to the wrong code
    code = subprocess.run([sys.executable, "-c", "import node; print(node.__file__)"], capture_output=True,
                          text=True, cwd=str(work)).stdout.strip()
    print(f"machine: {os.cpu_count()} CPU(s); series {w}x{h}x{n}; {args.senders} senders for {args.minutes} min; "
          f"{f'{args.rate:g} instance(s)/s each' if args.rate > 0 else 'each as fast as it is answered'}"
          f"{' (DCMTK storescu)' if args.dcmtk_senders else ' (pynetdicom)'}; "
          f"a hostile connection every {args.hostile_every} s; node on port {port}, storage {work}; "
          f"node code {Path(code).parent.parent if code else '?'}; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        until = time.time() + args.minutes * 60
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        started = time.time()
        target = dcmtk_sender if args.dcmtk_senders else sender
        procs = [ctx.Process(target=target, args=(i, port, [str(f) for f in files], until, q, args.rate))
                 for i in range(args.senders)]
        for p in procs:
            p.start()
        tally: dict[str, int] = {}
        hostile_thread = threading.Thread(target=hostile, args=(port, until, args.hostile_every, tally), daemon=True)
        hostile_thread.start()
        cpu: list[float] = []
        psutil.cpu_percent(None)
        while time.time() < until:
            time.sleep(5)
            cpu.append(psutil.cpu_percent(None))
        results = [q.get(timeout=600) for _ in procs]
        sending_s = max(1e-9, time.time() - started)
        for p in procs:
            p.join(60)
        hostile_thread.join(120)
        times = sorted(t for r in results for t in r[1])
        acked = [u for r in results for u in r[2]]
        refused = sum(r[3] for r in results)
        series = [u for r in results for u in r[4]]
        aborts = [a for r in results for a in r[5]]
        warned = [w for r in results for w in r[6]]
        print(f"C-STORE: {len(times)} sent, {len(acked)} acknowledged 0x0000, {refused} not acknowledged; "
              f"{len(aborts)} association(s) aborted{': ' + aborts[0] if aborts else ''}")
        stolen = sum("Received unexpected C-STORE" in w for w in warned)
        print(f"senders: {len(warned)} pynetdicom warning(s), {stolen} C-STORE response(s) taken by the sender's "
              f"own reactor thread{' (keep_responses off)' if os.environ.get('SOAK_SENDER_RACE') == '1' else ''}")
        for text in sorted(set(warned) | set(aborts))[:8]:
            print(f"senders:   {text}")
        if times:
            p50 = statistics.median(times) * 1000
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
            print(f"C-STORE response time: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {times[-1] * 1000:.1f} ms "
                  f"(target p99 < 100 ms)")
            # senders that each wait for an answer before the next send (no --rate, or a rate the node
            # does not keep up with) are a closed loop: by Little's law their mean response time is
            # at least senders / throughput, whatever the node does per instance
            through = len(times) / sending_s
            print(f"throughput: {through:.1f} C-STOREs/s (" + (
                f"offered {args.rate * args.senders:g}/s)" if args.rate > 0 else
                f"closed loop: senders / throughput = {args.senders / through * 1000:.0f} ms)"))
        print(f"CPU while sending: mean {statistics.mean(cpu) if cpu else 0:.0f} %, "
              f"min {min(cpu) if cpu else 0:.0f} % (all cores)")
        for key in sorted(tally):
            print(f"hostile: {tally[key]:4d} x {key}")
        n_stored, missing = stored(db, acked)
        print(f"acknowledged {len(acked)}, stored {n_stored}, lost {len(missing)}")
        deadline = time.time() + (0 if args.no_jobs else args.settle_minutes * 60)
        states = series_states(db, series)
        while states.get("done", 0) < len(series) and time.time() < deadline and proc.poll() is None:
            time.sleep(5)
            states = series_states(db, series)
        print(f"series: {len(series)} sent, states {states}; " + (
            "no jobs (--no-jobs)" if args.no_jobs else f"every series done: {states.get('done', 0) == len(series)}"))
        print(f"node still running: {proc.poll() is None}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print_node_side(work / "node.log")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
