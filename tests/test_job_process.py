"""How a job process tells whether its node is alive (:func:`node.job_process._node_alive`): the
node's pid and start time, where the start time must not move when the wall clock does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from node import job_process


def test_the_start_time_is_the_same_seen_from_another_process():
    me = job_process.process_started(os.getpid())
    seen = subprocess.run([sys.executable, "-c", "import sys; from node.job_process import process_started; "
                           f"print(repr(process_started({os.getpid()})))"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert float(seen) == me
    assert job_process._node_alive(os.getpid(), me)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
def test_a_wall_clock_step_does_not_make_a_live_node_look_gone(monkeypatch):
    """psutil's create_time() is the start since boot plus /proc/stat's btime, which the kernel
    recomputes from the wall clock on every read: an NTP step moves it.  A job that compared
    create_time() values killed itself under a live node (a CI run lost a job that way)."""
    import psutil._pslinux as pslinux

    started = job_process.process_started(os.getpid())
    real_boot_time = pslinux.boot_time
    monkeypatch.setattr(pslinux, "boot_time", lambda: real_boot_time() + 1.0)  # the clock stepped 1 s
    assert psutil.Process(os.getpid()).create_time() != pytest.approx(started + real_boot_time(), abs=0.5)
    assert job_process._node_alive(os.getpid(), started)


def test_a_gone_or_recycled_pid_is_not_the_node():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = job_process.process_started(proc.pid)
    assert job_process._node_alive(proc.pid, started)
    assert not job_process._node_alive(proc.pid, started - 0.01)  # same pid, another start: not the node
    proc.kill()
    proc.wait()
    assert not job_process._node_alive(proc.pid, started)
    with pytest.raises(psutil.NoSuchProcess):
        job_process.process_started(proc.pid)


# -- the pool is woken by a try's news (node.executor._LocalTry's watch) ------------------------


def _send_when_told(conn, gate) -> None:
    from node.job_process import SegReady

    gate.wait(60)
    conn.send(SegReady(Path("/results/7-seg.dcm"), "1.2.3"))


def test_a_local_try_wakes_the_pool_when_it_has_news():
    """The pool looks at its tries every 0.2 s; a try's message (the SEG, the outcome) and its end
    wake it at once instead, so the SEG goes on and the slot takes its next job sooner."""
    import multiprocessing
    import threading

    from node.config import NodeConfig
    from node.contracts import Resource, SlotInfo
    from node.executor import LocalExecutor, _LocalTry

    ctx = multiprocessing.get_context("fork")  # the target is this module's; nothing else runs here
    parent, child = ctx.Pipe(duplex=False)
    gate = ctx.Event()
    proc = ctx.Process(target=_send_when_told, args=(child, gate))
    proc.start()
    child.close()
    executor = LocalExecutor(NodeConfig())
    woken = threading.Event()
    executor.set_waker(woken.set)
    slot = executor.slots()[0]
    info = SlotInfo(name=slot.name, kind=Resource.CPU, gpu=None, pid=int(proc.pid or 0), process="job", device="cpu",
                    cuda_visible_devices=None)
    handle = _LocalTry(executor, slot, proc, parent, False, info)
    try:
        assert not woken.is_set()  # no news yet
        gate.set()
        assert woken.wait(30), "the try's message did not wake the pool"
        woken.clear()
        assert handle.poll() == [job_process.SegReady(Path("/results/7-seg.dcm"), "1.2.3")]
        assert woken.wait(30), "the try's end did not wake the pool"
        proc.join(30)
        assert handle.poll() == [] and not handle.alive()
    finally:
        handle.finish()
        if proc.is_alive():
            proc.kill()


def test_a_dask_seg_event_wakes_the_pool():
    from node.config import NodeConfig
    from node.dask_executor import DaskExecutor

    pytest.importorskip("distributed")
    executor = DaskExecutor(NodeConfig(executor={"kind": "dask", "scheduler": "tcp://127.0.0.1:1"}))
    woken: list[bool] = []
    executor.set_waker(lambda: woken.append(True))
    executor._on_seg_event((0.0, {"key": "k", "seg_early": "/r/1-seg.dcm", "seg_series_uid": "1.2.3"}))
    assert woken == [True]
    assert [s.seg_series_uid for s in executor.seg_events("k")] == ["1.2.3"]
    executor._on_seg_event((0.0, {"key": "k"}))  # malformed: ignored, nothing to take
    assert woken == [True]
