"""Series completion: a series is complete after a quiet period without new instances.

The clock is the *persisted* receive time of the last instance
(``series.last_received_at`` in the store), never an in-memory timer, so a
restart neither loses a series that went quiet while the node was down nor
restarts the quiet period of one still arriving.  The state change itself is
the store's conditional ``UPDATE`` (:meth:`node.store.Store.complete_series`):
an instance recorded between the query and the update keeps the series open.

Series states (see :mod:`node.store`)::

    receiving --(quiet for quiet_period_s)--> complete --(router)--> routed | unrouted
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
