"""``dicom-node worker --scheduler tcp://host:8786 [--gpus N]``: a Dask worker for
``executor: {kind: dask}`` with the node's task code preloaded (:mod:`node.dask_worker`), the
``GPU`` resource when the host has GPUs, and a nanny that restarts it when it dies.
``dicom-node scheduler [--port 8786]``: the cluster's Dask scheduler.

Each runs Dask's own command (``dask worker``, ``dask scheduler``) with those options and
Dask's diagnostic timers slowed (:data:`node.dask_worker.QUIET_DASK_CONFIG`, unless the
environment already sets them); the command line and environment are printed first, so they
can be used as they are (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from node.errors import InputError


def worker_command(scheduler: str, *, gpus: int = 0, nthreads: int | None = None, name: str | None = None,
                   extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``dask worker`` command line and the environment it needs, for the options of ``dicom-node worker``.

    One thread per GPU for the model jobs, plus ``nthreads`` (default: one per CPU core, less one per
    GPU, at least one) for the HU jobs.  ``distributed.worker.daemon`` is off: the tries run in
    processes of their own, which a daemonic worker process may not start.
    """
    if gpus < 0:
        raise InputError(f"--gpus must be >= 0 (got {gpus})")
    cpu = nthreads if nthreads is not None else max(1, (os.cpu_count() or 1) - gpus)
    cmd = _dask("worker", "distributed.cli.dask_worker") + [
        scheduler, "--nthreads", str(cpu + gpus), "--nworkers", "1", "--preload", "node.dask_worker",
    ]
    if gpus:
        cmd += ["--resources", f"GPU={gpus}"]
    if name:
        cmd += ["--name", name]
    cmd += list(extra or ())
    env = {**_quiet_env(), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    return cmd, env


def scheduler_command(*, host: str, port: int, dashboard_address: str,
                      extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``dask scheduler`` command line and the environment of ``dicom-node scheduler``."""
    cmd = _dask("scheduler", "distributed.cli.dask_scheduler") + [
        "--host", host, "--port", str(port), "--dashboard-address", dashboard_address, *(extra or ())]
    return cmd, _quiet_env()


def _dask(command: str, module: str) -> list[str]:
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or shutil.which("dask")
    return [dask, command] if dask else [sys.executable, "-m", module]


def _quiet_env() -> dict[str, str]:
    """Dask's diagnostic timers slowed, except those the operator's environment sets."""
    from node.dask_worker import quiet_dask_env

    return {k: v for k, v in quiet_dask_env().items() if k not in os.environ}


def _announce(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Print the command line with its environment (usable as it is), and set that environment here."""
    print(f"dicom-node {what}: " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd), flush=True)
    os.environ.update(env)


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Print the command line, then replace this process by it (signals and exit code are its own)."""
    _announce(cmd, env, what)
    os.execv(cmd[0], cmd)


def _cmd_scheduler(args: argparse.Namespace) -> int:
    extra = list(args.dask_args or ())
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd, env = scheduler_command(host=args.host, port=args.port, dashboard_address=args.dashboard_address, extra=extra)
    _run(cmd, env, "scheduler")
    return 0  # not reached: execv returned only by raising


def _cmd_worker(args: argparse.Namespace) -> int:
    if "://" not in args.scheduler:
        raise InputError(f"--scheduler must be an address like tcp://host:8786 (got {args.scheduler!r})")
    extra = list(args.dask_args or ())
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd, env = worker_command(args.scheduler, gpus=args.gpus, nthreads=args.nthreads, name=args.name, extra=extra)
    if args.gpu_ids:
        env["DICOM_NODE_GPUS"] = args.gpu_ids
    if args.model_device:
        env["DICOM_NODE_MODEL_DEVICE"] = args.model_device
    if args.once:
        _run(cmd, env, "worker")  # the worker replaces this process
    _announce(cmd, env, "worker")
    return _supervise(cmd, args.restart_delay_s)


def _supervise(cmd: list[str], delay_s: float) -> int:
    """Run the worker and start it again whenever it ends, until SIGTERM/SIGINT.

    A Dask worker ends itself when it loses its scheduler (a restart of the scheduler, a network
    cut); started again it joins the scheduler as soon as that is back.
    """
    import signal
    import subprocess
    import time

    stop = {"sig": 0}
    proc: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        stop["sig"] = signum
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    while not stop["sig"]:
        proc = subprocess.Popen(cmd)
        code = proc.wait()
        if stop["sig"]:
            break
        print(f"dicom-node worker: the Dask worker ended (exit code {code}); starting it again in {delay_s:g} s",
              file=sys.stderr, flush=True)
        time.sleep(delay_s)
    return 0 if stop["sig"] else code


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="run a Dask worker for executor kind dask (docs/scaling.md)")
    p.add_argument("--scheduler", required=True, metavar="ADDRESS", help="the Dask scheduler, tcp://host:8786")
    p.add_argument("--gpus", type=int, default=0, help="GPUs of this host for model jobs (one job per GPU)")
    p.add_argument("--gpu-ids", default=None, metavar="IDS", help="their CUDA ids, e.g. 0,2 (default 0..N-1)")
    p.add_argument("--nthreads", type=int, default=None, help="HU jobs at a time (default: CPU cores less GPUs)")
    p.add_argument("--name", default=None, help="the worker's name in the cluster")
    p.add_argument("--model-device", choices=("cuda", "cpu"), default=None,
                   help="models.device for model jobs here (default cuda; cpu: stand in for a GPU worker)")
    p.add_argument("--once", action="store_true",
                   help="run the worker once (default: start it again when it ends, e.g. after a scheduler restart)")
    p.add_argument("--restart-delay-s", type=float, default=2.0, help="pause before starting it again")
    p.add_argument("dask_args", nargs=argparse.REMAINDER, help="after --: more `dask worker` options")
    p.set_defaults(func=_cmd_worker)

    p = subparsers.add_parser("scheduler", help="run the Dask scheduler for executor kind dask (docs/scaling.md)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--port", type=int, default=8786, help="the port the node and the workers connect to")
    p.add_argument("--dashboard-address", default=":8787", help="Dask's dashboard (firewall it to the operators)")
    p.add_argument("dask_args", nargs=argparse.REMAINDER, help="after --: more `dask scheduler` options")
    p.set_defaults(func=_cmd_scheduler)
