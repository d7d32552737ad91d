"""Series completion: the sweep that marks a series ``complete`` once it has been quiet for
``quiet_period_s``, timed from the persisted receive times, never an in-memory timer, so a
restart neither loses nor restarts a quiet period (series states: docs/architecture.md).
"""

from __future__ import annotations

import logging

from node.store import Store

__all__ = ["sweep"]

log = logging.getLogger("node.completion")


def sweep(store: Store, quiet_period_s: float, *, now: float | None = None) -> list[str]:
    """Mark every quiet ``receiving`` series ``complete``; returns the UIDs completed by this call."""
    done: list[str] = []
    for s in store.quiet_series(quiet_period_s, now=now):
        if store.complete_series(s.series_uid, quiet_period_s=quiet_period_s, now=now):
            log.info(
                "series %s complete: %d instance(s), generation %d, quiet for %.1f s",
                s.series_uid, s.instance_count, s.generation, quiet_period_s,
            )
            done.append(s.series_uid)
    return done
