"""glibc heap policy for the process that runs the HU backend (``run_pipeline`` applies it; an AI
backend's process keeps glibc's defaults, which its library is tuned with): a fixed mmap
threshold (:func:`fix_mmap_threshold`) and a window that keeps freed memory for reuse below a
budget (:class:`RetainFreed`).  Measured effects: ``bench/README.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from types import TracebackType
from typing import BinaryIO

log = logging.getLogger(__name__)

# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# glibc's defaults, restored when the last retention window closes
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536

#: allocations of at least this many bytes get their own mapping, returned on free
MMAP_THRESHOLD = 4 << 20
#: how often the guard thread reads the process RSS while a window is open
POLL_S = 0.005
#: above the budget, hand freed memory back at most this often (a trim walks the free
#: blocks; while the live data alone is above the budget there is little to hand back)
TRIM_INTERVAL_S = 0.02
#: retention resumes once the RSS is back below this fraction of the budget
RESUME_FRACTION = 0.9
#: the HU pipeline's working set per voxel of its grid, above what the process holds
#: before segmenting (bones profile on the bench series: bench/README.md)
BYTES_PER_VOXEL = 16

_lock = threading.Lock()
_threshold_fixed = False
_libc_handle: ctypes.CDLL | None = None
_libc_tried = False


def _libc() -> ctypes.CDLL | None:
    """glibc with ``mallopt`` and ``malloc_trim`` typed, or ``None`` where there is none."""
    global _libc_handle, _libc_tried
    if not _libc_tried:
        _libc_tried = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            libc.malloc_trim.restype = ctypes.c_int
            _libc_handle = libc
        except (OSError, AttributeError):
            log.debug("no glibc mallopt/malloc_trim: heap settings left as they are")
    return _libc_handle


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (once).

    glibc serves an allocation below the threshold from its heap arenas and maps one above it
    on its own.  By default the threshold rises to the size of each mapped block freed (up to
    32 MB), so the pipeline's many freed arrays of a few MB end up in the arenas, which keep
    and fragment them; a fixed threshold maps them and returns them when freed.  Setting it
    also turns off glibc's dynamic adjustment.  Returns ``True`` when the
    setting is in effect (now or from an earlier call), ``False`` where the C library is
    not glibc or refuses it; the pipeline works either way, with a higher peak RSS.
    """
    global _threshold_fixed
    with _lock:
        if _threshold_fixed:
            return True
        libc = _libc()
        if libc is None:
            return False
        if libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) != 1:
            log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
            return False
        _threshold_fixed = True
        return True


def _statm_rss(fh: BinaryIO) -> int:
    """The resident set size in bytes from an open ``/proc/self/statm`` (read again from its start)."""
    fh.seek(0)
    return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_rss() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return _statm_rss(fh)
    except (OSError, ValueError, IndexError):
        return 0


def working_set_budget(voxels: int, bytes_per_voxel: int = BYTES_PER_VOXEL) -> int:
    """A :class:`RetainFreed` budget for segmenting ``voxels`` voxels: the RSS now plus
    ``bytes_per_voxel`` per voxel (about what the HU pipeline itself needs at its peak, so
    that memory kept for reuse does not raise the peak)."""
    return process_rss() + int(voxels) * int(bytes_per_voxel)


class _Guard:
    """The process-wide state behind :class:`RetainFreed` (one guard thread for all windows)."""

    def __init__(self) -> None:
        self.windows: list[RetainFreed] = []
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.retaining = False  #: the retention settings are in effect

    def budget(self) -> int:
        return min(w.budget for w in self.windows)

    def run(self) -> None:
        libc = _libc()
        assert libc is not None
        last = -TRIM_INTERVAL_S  # when the guard last trimmed
        with open("/proc/self/statm", "rb") as fh:
            while True:
                with _lock:
                    if not self.windows:
                        self.thread = None
                        return
                    self.wake.clear()  # set by a window that closed while another opened
                    budget = self.budget()
                    rss = _statm_rss(fh)
                    now = time.monotonic()
                    if rss > budget:
                        if self.retaining:
                            # over the budget: large blocks get mappings of their own again,
                            # returned as soon as they are freed (what the heap kept goes below)
                            _restore(libc)
                            self.retaining = False
                            for w in self.windows:
                                w.suspended += 1
                        if now - last >= TRIM_INTERVAL_S:
                            libc.malloc_trim(0)
                            last = now
                            released = max(0, rss - _statm_rss(fh))
                            for w in self.windows:
                                w.trims += 1
                                w.trimmed_bytes += released
                    elif not self.retaining and rss < budget * RESUME_FRACTION:
                        self.retaining = _retain(libc)
                self.wake.wait(POLL_S)


_guard = _Guard()


class RetainFreed:
    """Keep freed memory in this process for reuse while its RSS is below ``budget`` bytes.

    With the fixed threshold every large array is a mapping of its own, and the next one is
    fresh memory that the kernel must fault in and zero page by page (worse on a VM whose host
    takes freed guest pages back).  While a window is open every allocation comes from the heap
    (no mappings of their own, no automatic trimming, one arena for the threads made from then
    on), so freed memory is reused without faults.

    A context manager (glibc only; elsewhere it does nothing and :attr:`applied` stays
    ``False``).  Windows may nest or overlap (in threads): the heap settings hold while
    any is open, and the smallest open budget applies.  When the RSS passes the budget,
    the guard thread hands freed memory back (``malloc_trim``, at most every
    :data:`TRIM_INTERVAL_S`) and suspends the retention (large blocks are mappings of their
    own again, returned when freed) until the RSS is back below :data:`RESUME_FRACTION` of
    the budget.  ``trims``, ``trimmed_bytes`` and ``suspended`` count what it did while
    this window was open.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self.active = False  #: open now
        self.applied = False  #: the settings took effect when it opened
        self.suspended = 0  #: times retention stopped because the RSS passed the budget
        self.trims = 0
        self.trimmed_bytes = 0

    def __enter__(self) -> "RetainFreed":
        libc = _libc()
        if libc is None:
            return self
        with _lock:
            if not _guard.windows:
                if not _retain(libc):
                    log.debug("mallopt refused the retention settings")
                    return self
                _guard.retaining = True
            _guard.windows.append(self)
            self.active = self.applied = True
            if _guard.thread is None:
                _guard.wake.clear()
                _guard.thread = threading.Thread(target=_guard.run, name="heap-guard", daemon=True)
                _guard.thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        libc = _libc()
        assert libc is not None
        with _lock:
            _guard.windows.remove(self)
            self.active = False
            last = not _guard.windows
            if last:
                _guard.wake.set()  # the guard thread sees no window and ends
                _restore(libc)
                _guard.retaining = False
        if last:
            libc.malloc_trim(0)  # everything freed in the window goes back now


def _retain(libc: ctypes.CDLL) -> bool:
    """Every block from the heap, freed memory kept there; ``False`` (and glibc's defaults
    back) where ``mallopt`` refuses."""
    ok = (
        libc.mallopt(_M_MMAP_MAX, 0) == 1  # no mapping of its own for any block
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # free memory stays
    )
    # one arena: blocks freed by one thread are reused by the others (the pipeline hands
    # arrays between threads).  A hint for the threads made from now on, and it stays:
    # glibc fixes its arena limit once per process
    libc.mallopt(_M_ARENA_MAX, 1)
    if not ok:
        _restore(libc)
    return ok


def _restore(libc: ctypes.CDLL) -> None:
    """glibc's defaults for mappings and trimming (the fixed mmap threshold stays, and so
    does the arena limit, which glibc does not let go back to automatic)."""
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
