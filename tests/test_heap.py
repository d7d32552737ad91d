"""The pipeline's heap policy (node.pipeline.hu.heap), glibc only: the fixed mmap threshold
(freed arrays of a few MB go back to the OS instead of fragmenting the arenas) and the
RetainFreed window (freed arrays are reused without page faults while the process RSS is
below a budget, and handed back above it).  Each probe runs in a process of its own:
these are process-wide settings."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# the placement check both probes print: an array inside the [heap] (brk) arena, or a
# mapping of its own
WHERE = r"""
def where(arr):
    addr = arr.__array_interface__["data"][0]
    brk = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
    lo, hi = (int(x, 16) for x in brk[0].split()[0].split("-")) if brk else (0, 0)
    return "heap" if lo <= addr < hi else "mapped"
"""


def _probe(code: str, *args: str) -> list[str]:
    """Run ``code`` in a Python process of its own (the heap settings are process-wide);
    the words it printed."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return out.stdout.split()


# An 8 MB array freed and allocated again: with glibc's dynamic threshold the first free
# raises the threshold to 8 MB and the second array comes from the [heap] (brk) arena;
# with a fixed 4 MB threshold both are mappings of their own.
PROBE = WHERE + r"""
import sys
import numpy as np
if sys.argv[1] == "fixed":
    from node.pipeline.hu.heap import fix_mmap_threshold
    assert fix_mmap_threshold() and fix_mmap_threshold()  # once, then a no-op
a = np.ones(8 << 20, dtype=np.uint8)
del a
print(where(np.ones(8 << 20, dtype=np.uint8)))
"""


def _where(mode: str) -> str:
    return _probe(PROBE, mode)[0]


# A 64 MB array allocated and written, freed, then again: the minor page faults of the
# second one.  Fresh memory from the kernel faults at least once per 2 MB (huge pages) and
# once per 4 kB without; memory reused from the heap does not fault at all.
REUSE = r"""
import resource, sys
import numpy as np
from node.pipeline.hu import heap
heap.fix_mmap_threshold()

def second_faults():
    a = np.empty(64 << 20, dtype=np.uint8); a.fill(1); del a
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.empty(64 << 20, dtype=np.uint8); b.fill(2)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

if sys.argv[1] == "window":
    with heap.RetainFreed(1 << 40) as w:
        print(second_faults(), w.applied, w.trims)
else:
    print(second_faults(), False, 0)
"""


def _reuse(mode: str) -> tuple[int, str, int]:
    faults, applied, trims = _probe(REUSE, mode)
    return int(faults), applied, int(trims)


def test_retain_window_reuses_freed_arrays_without_page_faults():
    faults, applied, _ = _reuse("fixed")
    assert faults >= 32  # the fixed threshold alone: a fresh mapping, faulted in again
    faults, applied, trims = _reuse("window")
    assert applied == "True" and trims == 0  # far below its budget: nothing handed back
    assert faults <= 8


# Inside a window: 256 MB allocated, written and freed stay resident under a large budget;
# under a small one the guard thread suspends the retention as the array passes it, the
# array goes back when freed, and the retention resumes.  Closing the window hands
# everything back and restores glibc's mappings (an 8 MB array is a mapping of its own).
BUDGET = WHERE + r"""
import sys, time
import numpy as np
from node.pipeline.hu import heap
heap.fix_mmap_threshold()
MB = 1 << 20
base = heap.process_rss()
budget = base + (64 * MB if sys.argv[1] == "small" else (1 << 40))
with heap.RetainFreed(budget) as w:
    a = np.empty(256 * MB, dtype=np.uint8); a.fill(1); del a
    # the guard polls every few ms: give it time to hand the array back (or not)
    deadline = time.monotonic() + (5 if sys.argv[1] == "small" else 0.3)
    while time.monotonic() < deadline and heap.process_rss() - base > 100 * MB:
        time.sleep(0.02)
    inside = heap.process_rss() - base
    while time.monotonic() < deadline and not heap._guard.retaining:
        time.sleep(0.02)
    trims, suspended, resumed = w.trims, w.suspended, heap._guard.retaining
after = heap.process_rss() - base
print(inside // MB, trims, suspended, resumed, after // MB, where(np.ones(8 * MB, dtype=np.uint8)))
"""


def _budget(mode: str) -> list[str]:
    return _probe(BUDGET, mode)


def test_retain_window_keeps_freed_memory_below_its_budget():
    inside, trims, suspended, resumed, after, where = _budget("large")
    assert int(inside) >= 200 and int(trims) == 0 and int(suspended) == 0  # freed, but kept for reuse
    assert resumed == "True"  # retaining all along
    assert int(after) < 100  # the window closed: handed back
    assert where == "mapped"  # glibc's mappings are back (with the fixed 4 MB threshold)


def test_retain_window_hands_freed_memory_back_above_its_budget():
    inside, trims, suspended, resumed, after, where = _budget("small")
    assert int(suspended) == 1 and int(trims) >= 1  # retention stopped once, over the budget
    assert int(inside) < 100  # the freed array went back
    assert resumed == "True"  # and retention resumed below the budget
    assert where == "mapped"


def test_retain_windows_overlap_and_the_smallest_budget_applies():
    from node.pipeline.hu import heap

    code = r"""
from node.pipeline.hu import heap
with heap.RetainFreed(10 << 30) as a:
    with heap.RetainFreed(5 << 30) as b:
        assert heap._guard.budget() == 5 << 30 and a.active and b.active
    assert heap._guard.budget() == 10 << 30 and not b.active and b.applied
assert not heap._guard.windows and not a.active
print("ok")
"""
    assert _probe(code) == ["ok"]
    assert heap.working_set_budget(1000, 16) == pytest.approx(heap.process_rss() + 16000, abs=64 << 20)


def test_fixed_threshold_maps_large_arrays_of_their_own():
    assert _where("default") == "heap"  # what the pipeline avoids (the probe sees the difference)
    assert _where("fixed") == "mapped"


def test_run_pipeline_fixes_the_threshold_for_the_hu_backend(monkeypatch, tmp_path):
    from node.errors import SeriesError
    from node.pipeline import run as run_mod

    calls = []
    def counting_fix(*a):
        calls.append(a)
        return True

    monkeypatch.setattr(run_mod, "fix_mmap_threshold", counting_fix)
    with pytest.raises(SeriesError, match="no DICOM files"):
        run_mod.run_pipeline([tmp_path / "missing"], "bones", tmp_path / "out")
    assert calls == [()]  # the HU backend's process
    calls.clear()
    with pytest.raises(SeriesError, match="no DICOM files"):
        run_mod.run_pipeline([tmp_path / "missing"], "bones", tmp_path / "out", backend="totalsegmentator")
    assert calls == []  # an AI backend's process keeps glibc's defaults
