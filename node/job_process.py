"""The child-process side of the worker pool: runs one job's pipeline (a process of its own, or a
slot's long-lived process for model jobs), reports back over a pipe, and ends itself when the
node process is gone.  The pool that starts these processes is :mod:`node.pool`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import psutil

from node import logsafe
from node.config import ModelsConfig
from node.contracts import FailureKind, JobResult, JobSpec, ProcessInfo
from node.jobs import early_seg_path

__all__ = ["JobDone", "JobFailed", "SegReady", "Message", "process_started", "watch_node", "lower_priority"]

log = logging.getLogger("node.job_process")


@dataclass(frozen=True)
class JobDone:
    """The job's run finished: its result folder is published."""

    result: JobResult


@dataclass(frozen=True)
class JobFailed:
    """The job's run failed; ``kind`` says whether a retry can help."""

    kind: FailureKind
    message: str


@dataclass(frozen=True)
class SegReady:
    """The SEG is published (``results/<job id>-seg.dcm``) while the meshes are still being made."""

    seg_early: Path
    seg_series_uid: str


#: what a job or slot process sends on its pipe
Message = JobDone | JobFailed | SegReady

#: what this (job or slot) process is: slot name, long-lived or not, jobs run so far
_PROC: dict[str, Any] = {"slot": None, "persistent": False, "jobs": 0, "job_id": None, "notify": None,
                         "node": None}  # node: (pid, start time) of the node that started this process


def process_started(pid: int) -> float:
    """When process *pid* started, in seconds since boot: with the pid, what tells a process
    apart from a later one that got the same pid.

    Not ``psutil.Process.create_time()``: on Linux that adds ``/proc/stat``'s ``btime``, which
    the kernel recomputes from the wall clock on every read, so an NTP adjustment moves it by
    a second (psutil issues 2526 and 2541) and a job took its live node for gone and killed
    itself.  The start in clock ticks since boot (``/proc/<pid>/stat``) never moves.

    Raises:
        psutil.NoSuchProcess: there is no such process.
    """
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").is_file():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        except OSError:
            raise psutil.NoSuchProcess(pid) from None
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime) of proc_pid_stat(5)
    return float(psutil.Process(pid).create_time())  # elsewhere: the wall-clock start


def _node_alive(node_pid: int, node_started: float) -> bool:
    """Whether the node process (pid *and* start time, so a recycled pid is not mistaken
    for it) is still running."""
    try:
        return process_started(node_pid) == node_started
    except psutil.Error:
        return False


def _end_process_group() -> None:
    """SIGKILL this process's group (the job or slot process and the decoder pools it
    started); ``os._exit`` if that returns."""
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def watch_node(node_pid: int, node_started: float, interval_s: float = 0.5) -> None:
    """Kill this job's process group as soon as the node process is gone (a daemon thread).

    The parent of a job process is the forkserver, which outlives a node killed
    with SIGKILL while any job process is alive (each holds its liveness pipe), so
    ``PR_SET_PDEATHSIG`` cannot be used; the job watches the node itself.  Between two
    looks the job may reach a publish step: :func:`_stop_if_node_gone` checks again there.
    """
    _PROC["node"] = (node_pid, node_started)

    def loop() -> None:
        while _node_alive(node_pid, node_started):
            time.sleep(interval_s)
        _end_process_group()

    threading.Thread(target=loop, name="node-watch", daemon=True).start()


def _stop_if_node_gone(what: str) -> None:
    """Called right before a job publishes ``what``: when its node is gone, end the process
    group instead, so nothing of a job whose node died appears in ``results/``.

    The store still says ``running``; the restarted node re-queues the job and runs it
    again, and the try that was cut short leaves only its ``.tmp-*`` folder, which the
    next try removes.  Without this, a job finishing within the watch interval after a
    SIGKILL of the node published a result the node never recorded.
    """
    node = _PROC.get("node")
    if node is not None and not _node_alive(*node):
        log.warning("the node (pid %d) is gone: %s is not published; the restarted node runs the job again",
                    node[0], what)
        _end_process_group()


def _configure_models(models: ModelsConfig) -> None:
    """Apply node.yaml's ``models`` section in the job process (AI backends read it)."""
    from node.pipeline.ai import common as ai_common

    ai_common.configure(models_root=models.root, device=models.device, threads=models.threads)
    if models.totalseg_weights:
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(models.totalseg_weights)
    if models.totalseg_home:
        os.environ["TOTALSEG_HOME_DIR"] = str(models.totalseg_home)


def _apply_env(env: dict[str, str] | None) -> None:
    """Set the slot's environment (``CUDA_VISIBLE_DEVICES``) before anything imports torch."""
    for key, value in (env or {}).items():
        os.environ[key] = str(value)


def _backend_info(model_type: str, run: dict[str, Any]) -> dict[str, Any]:
    """``report["backend"]``: which backend ran, in which process, and what it used (its run_info())."""
    return {
        "name": model_type,
        "process": {
            "pid": os.getpid(),
            "slot": _PROC["slot"],
            "persistent": _PROC["persistent"],
            "jobs_in_process": _PROC["jobs"],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
        **run,
    }


def _try_tag() -> str:
    """``<host>-<pid>``: names this try's temporary files apart from any other's on shared storage."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def _run_spec(spec: JobSpec) -> JobResult:
    """Run the pipeline for one job (in the job process, or in a long-lived slot process)."""
    from node.durable import atomic_write, fsync_dir, makedirs_durable, set_modes
    from node.errors import InputError
    from node.pipeline.run import run_pipeline
    from node.profiles import load_profile

    paths = [Path(p) for p in spec.paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} spool file(s) of the series are missing (retention cleanup?)",
                         path=missing[0])
    profile = load_profile(spec.profile, spec.profiles_dir)
    _configure_models(spec.models)
    set_modes(spec.file_mode, spec.dir_mode)
    final = Path(spec.output_dir)
    makedirs_durable(final.parent)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed earlier try
        shutil.rmtree(stale, ignore_errors=True)
    # host and pid: on shared storage two hosts may run a try of the same job (a Dask re-run)
    tmp = final.parent / f".{final.name}.tmp-{_try_tag()}"
    early = early_seg_path(final)

    def on_seg(path: Path, uid: str) -> None:
        """The SEG is complete while meshes are still being made: hand it on now."""
        notify: Callable[[Message], None] | None = _PROC.get("notify")
        if notify is None:
            return
        _stop_if_node_gone("the early SEG")
        try:
            link = final.parent / f".{early.name}.tmp-{_try_tag()}"
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)  # same folder tree: no copy
            except OSError:
                shutil.copyfile(path, link)
            os.replace(link, early)
            fsync_dir(final.parent)
            notify(SegReady(early, uid))
        except Exception as exc:  # noqa: BLE001 - then it goes with the rest of the results
            log.warning("cannot hand the SEG on before the meshes (%s); it is sent when the job is done", exc)

    try:
        res = run_pipeline(
            [str(p) for p in paths],
            profile,
            tmp,
            backend=spec.backend,
            series_uid=spec.series_uid,
            seg_series_uid=spec.seg_series_uid,
            decode_workers=spec.decode_workers,
            on_seg=on_seg,
            seg_first=True,  # the SEG goes to the PACS: it comes before the meshes for the share
            outputs=spec.outputs,
        )
        backend_info = _backend_info(str(res.report.get("profile", {}).get("model_type") or spec.backend),
                                     res.backend_run)
        res.report["backend"] = backend_info
        atomic_write(tmp / "report.json", (json.dumps(res.report, indent=2) + "\n").encode("utf-8"))
    except BaseException:
        # a failed try leaves nothing behind (a killed one cannot clean up: the next try does)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # publish the folder whole: results/<id>/ only ever holds a finished run
    _stop_if_node_gone(f"the result folder {final}")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return JobResult(
        output_dir=final,
        seg=final / res.seg_path.name if res.seg_path else None,
        meshes=tuple(final / p.name for p in res.mesh_paths),
        report=final / "report.json",
        seg_series_uid=res.report.get("outputs", {}).get("seg_series_instance_uid"),
        timings_s=res.report.get("timings_s", {}),
        backend=backend_info,
        seg_early=early if early.is_file() else None,
        # a result that fails a sanity check (node.pipeline.stages.quality) is delivered, with warnings
        warnings=tuple((res.report.get("quality") or {}).get("warnings") or ()),
        qc=tuple(final / str(q) for q in (res.report.get("outputs") or {}).get("qc") or ()),
    )


def _execute(spec: JobSpec) -> JobDone | JobFailed:
    """Run one job; what it sends back to the pool."""
    from node.errors import BackendUnavailable, InputError

    try:
        return JobDone(_run_spec(spec))
    except InputError as exc:
        return JobFailed(FailureKind.INPUT, str(exc))
    except BackendUnavailable as exc:
        return JobFailed(FailureKind.BACKEND, str(exc))
    except BaseException as exc:  # noqa: BLE001 - everything else may be transient
        tb = traceback.format_exc(limit=4).strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        return JobFailed(FailureKind.TRANSIENT, f"{type(exc).__name__}: {exc} ({where})")


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = _PROC["job_id"]
        return True


def lower_priority(nice: int) -> None:
    """Run below the node: ``nice`` more, and the lowest best-effort I/O priority (inherited by the
    decoders and decimators this process starts)."""
    if nice <= 0:
        return
    try:
        os.nice(nice)
        psutil.Process().ionice(psutil.IOPRIO_CLASS_BE, 7)
    except (OSError, AttributeError, ValueError):  # not Linux, or not allowed: run at the node's priority
        logging.getLogger(__name__).debug("cannot lower the job process's priority", exc_info=True)


def _setup_process(info: ProcessInfo, slot_label: str) -> None:
    """Common start of a job/slot process: own session, slot env, node watch, logging."""
    try:
        os.setsid()  # own process group: the supervisor kills the whole group on timeout
    except OSError:
        pass
    _apply_env(dict(info.env))
    lower_priority(info.nice)
    watch_node(info.node_pid, info.node_started)
    fmt = f"%(asctime)s %(levelname)s %(name)s [{slot_label}job %(job)s]: %(message)s"
    logging.basicConfig(level=info.log_level, format=fmt)
    logsafe.install(log_phi=info.log_phi, fmt=fmt)  # one line per record, no PHI unless log_phi
    for h in logging.getLogger().handlers:
        h.addFilter(_JobIdFilter())
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def _job_process(conn: Connection, info: ProcessInfo, spec: JobSpec) -> None:
    """Entry point of a one-job process (module level: started by forkserver)."""
    _PROC.update(slot=info.slot, persistent=False, jobs=1, job_id=spec.job_id, notify=conn.send)
    _setup_process(info, "")
    msg = _execute(spec)
    try:
        conn.send(msg)
    finally:
        conn.close()


def _slot_process(conn: Connection, info: ProcessInfo) -> None:
    """Entry point of a long-lived slot process: runs the job specs it receives, one at a time.

    Model backends keep their per-process caches (nnU-Net predictors) between jobs here.
    ``None`` (or a closed pipe) ends it.  After a transient error the process ends too, so the
    next job gets a fresh one (a broken CUDA context or a leaking library does not live on).
    """
    _PROC.update(slot=info.slot, persistent=True, jobs=0, job_id=None, notify=conn.send)
    _setup_process(info, f"slot {info.slot} ")
    while True:
        try:
            spec: JobSpec | None = conn.recv()
        except (EOFError, OSError):
            break
        if spec is None:
            break
        _PROC["jobs"] += 1
        _PROC["job_id"] = spec.job_id
        msg = _execute(spec)
        _PROC["job_id"] = None
        try:
            conn.send(msg)
        except (OSError, ValueError):
            break
        if isinstance(msg, JobFailed) and msg.kind == FailureKind.TRANSIENT:
            break
    conn.close()
