"""How long the receiver takes per C-STORE, by part, for the operator's log and the soak benchmark.

Each C-STORE is timed from the moment its last PDU was decoded (the message complete, in the
association's network thread) to the moment its response PDU was written to the socket, split into
``queued`` (waiting for the association's thread to pick the message up), ``check`` (encoding
check, parse, UID and image checks), ``spool`` (the durable file write: fsync of file and folder),
``index`` (the store insert) and ``reply`` (the response until it is on the wire).  Times go into
fixed log-spaced histograms (constant memory, percentiles to about 5 %): one per log window and
one since start.  A C-STORE slower than :data:`SLOW_S` is logged at WARNING with its parts.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

__all__ = ["PARTS", "SLOW_S", "Histogram", "StoreTimes"]

#: the parts of a C-STORE, in order, then the whole
PARTS: tuple[str, ...] = ("queued", "check", "spool", "index", "reply", "total")
#: a C-STORE taking longer than this (seconds) is logged on its own
SLOW_S = 1.0

_BASE = 1e-5  # 10 us: the lowest bucket's upper bound
_STEP = 1.05
_BUCKETS = 400  # 10 us * 1.05**400 ~ 3 days


def _bucket(seconds: float) -> int:
    if seconds <= _BASE:
        return 0
    return min(_BUCKETS - 1, int(math.ceil(math.log(seconds / _BASE, _STEP))))


@dataclass
class Histogram:
    """Counts of durations in log-spaced buckets (each 5 % wider than the last)."""

    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    n: int = 0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[_bucket(seconds)] += 1
        self.n += 1
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the ``q`` quantile (0 when empty; the maximum for 1)."""
        if self.n == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(self.max, _BASE * _STEP**i)
        return self.max


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class StoreTimes:
    """The receiver's C-STORE times: a window (reset by :meth:`take_window`) and since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window = {p: Histogram() for p in PARTS}
        self._all = {p: Histogram() for p in PARTS}

    def add(self, **parts: float) -> None:
        """Record one C-STORE's parts (seconds; names from :data:`PARTS`, any may be left out)."""
        with self._lock:
            for name, value in parts.items():
                self._window[name].add(value)
                self._all[name].add(value)

    def take_window(self) -> dict[str, Histogram]:
        """The window's histograms; a new window starts."""
        with self._lock:
            window, self._window = self._window, {p: Histogram() for p in PARTS}
        return window

    def since_start(self) -> dict[str, Histogram]:
        with self._lock:
            return {p: Histogram(list(h.counts), h.n, h.max) for p, h in self._all.items()}

    @staticmethod
    def summary(hists: dict[str, Histogram]) -> str:
        """One line: how many C-STOREs, then p50/p99/max (ms) of each part."""
        total = hists["total"]
        parts = "; ".join(f"{p} {_ms(h.quantile(0.5))}/{_ms(h.quantile(0.99))}/{_ms(h.max)}"
                          for p, h in hists.items() if h.n)
        return f"{total.n} C-STORE(s), p50/p99/max ms: {parts}"
