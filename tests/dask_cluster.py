"""Test helper: a real Dask distributed cluster on this machine: ``dicom-node scheduler`` (which runs
``dask scheduler``) and workers started with ``dicom-node worker`` (which restarts its Dask worker when it ends, as systemd would).

    with DaskCluster(tmp_path / "dask") as cluster:
        cluster.add_worker("gpu", gpus=1, model_device="cpu")   # stands in for a GPU worker
        cluster.add_worker("cpu")                               # (both: add_gpu_and_cpu_workers())
        cluster.wait_workers(2); cluster.address                # tcp://127.0.0.1:<port>
        cluster.kill_scheduler(); cluster.start_scheduler()     # SIGKILL, then the same port again

Not a test file: imported by the tests and bench/cluster.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["DaskCluster", "try_pid", "running_job"]

BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running_job(list_jobs: Callable[..., list[Any]], uid: str, timeout_s: float = 120) -> Any:
    """The running job of series ``uid``, once there is one (``list_jobs``: a store's ``list_jobs`` or
    a test node's ``jobs``)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        running = [j for j in list_jobs(series_uid=uid) if j.state == "running"]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError(f"no running job for {uid}: {[(j.id, j.state, j.error) for j in list_jobs()]}")


def try_pid(results: Path, job_id: int, timeout_s: float = 120) -> int:
    """The pid of the process running job ``job_id``'s try (from its ``.<id>.tmp-<host>-<pid>``
    folder in the results folder); the process tree is try <- forkserver <- Dask worker."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        tmp = list(results.glob(f".{job_id}.tmp-*"))
        if tmp:
            return int(tmp[0].name.rsplit("-", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}'s try did not start")


class DaskCluster:
    def __init__(self, workdir: Path, *, start: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._client: Any = None
        if start:
            self.start_scheduler()

    def _popen(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        e = dict(os.environ, **(env or {}))
        e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])] +
                                          ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=e, start_new_session=True,
                                    cwd=str(self.workdir))
        finally:
            log.close()

    def start_scheduler(self, timeout_s: float = 60) -> None:
        self.scheduler = self._popen("scheduler", [str(BIN / "dicom-node"), "scheduler", "--host", "127.0.0.1",
                                                   "--port", str(self.port), "--dashboard-address", ":0"])
        end = time.monotonic() + timeout_s
        while "Scheduler at:" not in self.log("scheduler"):
            if self.scheduler.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"dask scheduler did not start:\n{self.log('scheduler')[-3000:]}")
            time.sleep(0.2)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(10)
        self.close_client()

    def add_worker(self, name: str, *, gpus: int = 0, nthreads: int = 1, model_device: str | None = None) -> None:
        cmd = [str(BIN / "dicom-node"), "worker", "--scheduler", self.address, "--name", name,
               "--nthreads", str(nthreads), "--gpus", str(gpus), "--restart-delay-s", "0.5"]
        if model_device:
            cmd += ["--model-device", model_device]
        cmd += ["--", "--dashboard-address", ":0", "--death-timeout", "60"]
        self.workers[name] = self._popen(f"worker-{name}", cmd)

    def add_gpu_and_cpu_workers(self) -> dict[str, dict[str, Any]]:
        """The tests' cluster: worker ``gpu`` with one GPU resource (its model jobs run on the CPU)
        and worker ``cpu`` without; returns :meth:`wait_workers`'s record once both have joined."""
        self.add_worker("gpu", gpus=1, nthreads=1, model_device="cpu")
        self.add_worker("cpu", nthreads=1)
        return self.wait_workers(2)

    def client(self) -> Any:
        from distributed import Client

        if self._client is None:
            self._client = Client(self.address, timeout=30, set_as_default=False)
        return self._client

    def close_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close(timeout=5)
            except Exception:  # noqa: BLE001 - its scheduler is gone
                pass
            self._client = None

    def worker_info(self) -> dict[str, dict[str, Any]]:
        """name -> the scheduler's record of that worker (address, resources, nthreads)."""
        info = self.client().scheduler_info(n_workers=-1)["workers"]
        return {w["name"]: dict(w, address=addr) for addr, w in info.items()}

    def wait_workers(self, n: int, timeout_s: float = 120) -> dict[str, dict[str, Any]]:
        end = time.monotonic() + timeout_s
        while True:
            try:
                info = self.worker_info()
                if len(info) >= n:
                    return info
            except Exception:  # noqa: BLE001 - the scheduler is still coming up
                self.close_client()
            if time.monotonic() > end:
                logs = "\n".join(f"--- {k}\n{self.log('worker-' + k)[-2000:]}" for k in self.workers)
                raise RuntimeError(f"{n} Dask worker(s) did not join:\n{logs}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.close_client()
        for p in list(self.workers.values()) + ([self.scheduler] if self.scheduler else []):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(15)
                except (OSError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    p.wait(5)
        self.workers.clear()

    def __enter__(self) -> DaskCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
