"""Series completion: the sweep that marks a series ``complete`` once it has been quiet for
``quiet_period_s``, timed from the persisted receive times, never an in-memory timer, so a
restart neither loses nor restarts a quiet period (series states: docs/architecture.md).
"""

from __future__ import annotations

import logging
import time

from node.metrics import SERIES_COMPLETED
from node.store import Store

__all__ = ["sweep"]

log = logging.getLogger("node.completion")


def sweep(store: Store, quiet_period_s: float, *, now: float | None = None,
          refused_wait_s: float | None = None) -> list[str]:
    """Mark every quiet ``receiving`` series ``complete``; returns the UIDs completed by this call.

    A series with instances the receiver refused for want of resources (disk full) is held until
    they are received after all, or until ``refused_wait_s`` after the last refusal (None: for
    ever); then it is completed without them and marked incomplete.
    """
    t = now if now is not None else time.time()
    done: list[str] = []
    for s in store.quiet_series(quiet_period_s, now=t):
        refused = store.refused_instances(s.series_uid)
        if refused:
            last = max(at for _, at, _ in refused)
            if refused_wait_s is None or t - last < refused_wait_s:
                log.debug("series %s held: %d instance(s) refused for want of space not sent again yet",
                          s.series_uid, len(refused))
                continue
        if store.complete_series(s.series_uid, quiet_period_s=quiet_period_s, now=t):
            SERIES_COMPLETED.inc()
            if refused:
                store.mark_incomplete(s.series_uid)
                log.warning(
                    "series %s complete but INCOMPLETE: %d instance(s) refused for want of space were not sent "
                    "again within %.0f s; processed with the %d received", s.series_uid, len(refused),
                    refused_wait_s or 0, s.instance_count,
                )
            log.info(
                "series %s complete: %d instance(s), generation %d, quiet for %.1f s",
                s.series_uid, s.instance_count, s.generation, quiet_period_s,
            )
            done.append(s.series_uid)
    return done
