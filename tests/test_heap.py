"""glibc's mmap threshold fixed for the pipeline (node.pipeline.heap): freed large arrays
are returned to the OS instead of staying in the heap arenas."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# An 8 MB array freed and allocated again: with glibc's dynamic threshold the first free
# raises the threshold to 8 MB and the second array comes from the [heap] (brk) arena;
# with a fixed 4 MB threshold both are mappings of their own.
PROBE = r"""
import sys
import numpy as np
if sys.argv[1] == "fixed":
    from node.pipeline.heap import fix_mmap_threshold
    assert fix_mmap_threshold() and fix_mmap_threshold()  # once, then a no-op
a = np.ones(8 << 20, dtype=np.uint8)
del a
b = np.ones(8 << 20, dtype=np.uint8)
addr = b.__array_interface__["data"][0]
heap = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split()[0].split("-")) if heap else (0, 0)
print("heap" if lo <= addr < hi else "mapped")
"""


def _where(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_fixed_threshold_maps_large_arrays_of_their_own():
    assert _where("default") == "heap"  # what the pipeline avoids (the probe sees the difference)
    assert _where("fixed") == "mapped"


def test_run_pipeline_fixes_the_threshold_for_the_hu_backend(monkeypatch, tmp_path):
    from node.errors import SeriesError
    from node.pipeline import run as run_mod

    calls = []
    monkeypatch.setattr(run_mod, "fix_mmap_threshold", lambda *a: calls.append(a) or True)
    with pytest.raises(SeriesError, match="no DICOM files"):
        run_mod.run_pipeline([tmp_path / "missing"], "bones", tmp_path / "out")
    assert calls == [()]  # the HU backend's process
    calls.clear()
    with pytest.raises(SeriesError, match="no DICOM files"):
        run_mod.run_pipeline([tmp_path / "missing"], "bones", tmp_path / "out", backend="totalsegmentator")
    assert calls == []  # an AI backend's process keeps glibc's defaults
