"""Process heap settings for the pipeline's large, short-lived arrays (glibc only).

glibc serves an allocation from its heap arenas below the *mmap threshold* and maps it
on its own above it.  By default that threshold is dynamic: each time a mapped block is
freed, the threshold rises to its size (up to 32 MB).  The pipeline allocates and frees
many arrays of a few to 32 MB (slices, slabs, mesh blocks, per-tissue boxes) in several
threads, so after the first few they all come from the arenas, which keep the freed
memory and fragment: on the 512x512x400 bench series the peak RSS was 2.35-2.54 GB with
the dynamic threshold and 2.21-2.23 GB with a fixed 4 MB one, at the same speed (a
fixed 128 kB one was as small but made the SEG writer ~1.5x slower).  ``run_pipeline``
sets it for the HU backend, whose job process it is; the AI backends' processes keep
glibc's defaults, which their libraries (torch) are tuned and measured with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

#: ``M_MMAP_THRESHOLD`` of glibc's ``mallopt``
_M_MMAP_THRESHOLD = -3
#: allocations of at least this many bytes get their own mapping, returned on free
MMAP_THRESHOLD = 4 << 20

_done = False
_lock = threading.Lock()


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (once).

    Setting it also turns off glibc's dynamic adjustment.  Returns ``True`` when the
    setting is in effect (now or from an earlier call), ``False`` where the C library is
    not glibc or refuses it; the pipeline works either way, with a higher peak RSS.
    """
    global _done
    with _lock:
        if _done:
            return True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            log.debug("no glibc mallopt: heap settings left as they are")
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        if mallopt(_M_MMAP_THRESHOLD, int(threshold)) != 1:
            log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
            return False
        _done = True
        return True
