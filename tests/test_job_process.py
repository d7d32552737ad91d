"""How a job process tells whether its node is alive (:func:`node.job_process._node_alive`): the
node's pid and start time, where the start time must not move when the wall clock does."""

from __future__ import annotations

import os
import subprocess
import sys

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
