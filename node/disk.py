"""Free space on the storage volume: warn the operator early, stop receiving before it runs out.

:class:`DiskWatch` measures the free space of ``storage`` (at most every ``check_interval_s``) and
logs a warning when it falls below ``disk.warn_free_mib`` (again every hour while it stays there),
an error below ``disk.reserve_free_mib``: there the receiver refuses new associations and
instances (out of resources), keeping the rest for the results of what it already has.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from node.config import DiskConfig

__all__ = ["DiskWatch"]

log = logging.getLogger("node.disk")

_MIB = 1024 * 1024
_REPEAT_S = 3600.0


class DiskWatch:
    """The free space of one volume, measured lazily and thread-safely."""

    def __init__(self, path: str | Path, disk: DiskConfig) -> None:
        self.path = Path(path)
        self.disk = disk
        self._lock = threading.Lock()
        self._free: int | None = None
        self._measured = 0.0
        self._level = "ok"
        self._logged = 0.0

    def free_bytes(self, *, now: float | None = None) -> int | None:
        """Free bytes (None when the volume cannot be measured), measured again when stale."""
        t = now if now is not None else time.monotonic()
        with self._lock:
            if self._free is None or t - self._measured >= self.disk.check_interval_s:
                try:
                    self._free = shutil.disk_usage(self.path).free
                except OSError as exc:
                    log.warning("cannot measure the free space of %s: %s", self.path, exc)
                    self._free = None
                self._measured = t
                self._report(t)
            return self._free

    def _report(self, t: float) -> None:
        free = self._free
        if free is None:
            return
        level = ("reserve" if free < self.disk.reserve_free_mib * _MIB
                 else "low" if free < self.disk.warn_free_mib * _MIB else "ok")
        if level != self._level or (level != "ok" and t - self._logged >= _REPEAT_S):
            mib = free / _MIB
            if level == "reserve":
                log.error("%s: %.0f MiB free, below the reserve of %d MiB: refusing new associations and "
                          "instances until space is freed", self.path, mib, self.disk.reserve_free_mib)
            elif level == "low":
                log.warning("%s: only %.0f MiB free (warning below %d MiB; instances are refused below %d MiB)",
                            self.path, mib, self.disk.warn_free_mib, self.disk.reserve_free_mib)
            else:
                log.info("%s: %.0f MiB free again", self.path, mib)
            self._level, self._logged = level, t

    def out_of_space(self) -> str | None:
        """Why nothing more may be received (free space below the reserve), or None."""
        free = self.free_bytes()
        if free is not None and free < self.disk.reserve_free_mib * _MIB:
            return (f"{free / _MIB:.0f} MiB free on {self.path}, below the reserve of "
                    f"{self.disk.reserve_free_mib} MiB")
        return None
