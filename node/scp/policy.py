"""Association policy: who may open an association with the node.

Checked in an ``EVT_REQUESTED`` handler, before pynetdicom negotiates, so every refusal is
logged with the peer address and both AE titles and answered with the standard
A-ASSOCIATE-RJ codes (see :class:`AssociationPolicy`).
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from pynetdicom import evt

from node.metrics import ASSOCIATIONS

__all__ = ["AssociationPolicy", "Refusal", "REJECT_CALLED_AE", "REJECT_CALLING_AE", "REJECT_LIMIT",
           "REJECT_CONGESTION"]

log = logging.getLogger("node.scp.policy")

#: (result, source, reason) of an A-ASSOCIATE-RJ
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LIMIT = (0x02, 0x03, 0x02)
REJECT_CONGESTION = (0x02, 0x03, 0x01)
#: the reason label of dicomnode_associations_total
_REASONS = {REJECT_CALLED_AE: "called_ae", REJECT_CALLING_AE: "calling_ae", REJECT_LIMIT: "limit",
            REJECT_CONGESTION: "out_of_resources"}


@dataclass(frozen=True)
class Refusal:
    """Why an association request is refused (``codes`` = result, source, reason)."""

    codes: tuple[int, int, int]
    reason: str


@functools.lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset(str(ai[4][0]) for ai in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


def _host_matches(host: str, address: str) -> bool:
    if host == address:
        return True
    return address in _addresses(host)


class AssociationPolicy:
    """Accept/refuse association requests.

    =============================  ======  ======  ======
    refusal                        result  source  reason
    =============================  ======  ======  ======
    called AE is not ours          0x01    0x01    0x07  rejected-permanent, service-user, called AE not recognised
    calling AE not on allow-list   0x01    0x01    0x03  rejected-permanent, service-user, calling AE not recognised
    too many associations          0x02    0x03    0x02  rejected-transient, service-provider (presentation), local limit exceeded
    out of resources (disk)        0x02    0x03    0x01  rejected-transient, service-provider (presentation), temporary congestion
    =============================  ======  ======  ======

    An empty allow-list allows every calling AE.  An allow-list entry with a ``host`` only
    matches when the peer address equals that host (an IP address, or a name resolving to it).
    The limit counts associations this policy admitted and whose thread still runs, so
    connections that never sent an association request hold no slot (node/scp/guard.py limits
    those); pynetdicom's own ``maximum_associations``, which counts every open connection, is
    only a backstop set above both (``backstop``).

    Args:
        ae_title: our AE title; the called AE must equal it (trailing spaces ignored).
        allowed_calling_aes: entries with ``.ae_title`` and optional ``.host``
            (e.g. :class:`node.config.AllowedAE`) or ``(ae_title, host)``
            tuples; empty allows everyone.
        max_associations: most concurrent inbound associations.
        out_of_resources: says why nothing can be received now (e.g. the disk below its
            reserve, :meth:`node.disk.DiskWatch.out_of_space`), or None.
    """

    def __init__(self, ae_title: str, allowed_calling_aes: Iterable[Any] = (), max_associations: int = 10,
                 out_of_resources: Callable[[], str | None] | None = None) -> None:
        self.ae_title = ae_title.strip()
        allowed: list[tuple[str, str | None]] = []
        for entry in allowed_calling_aes:
            if isinstance(entry, (tuple, list)):
                allowed.append((str(entry[0]).strip(), entry[1] if len(entry) > 1 else None))
            else:
                allowed.append((str(entry.ae_title).strip(), getattr(entry, "host", None)))
        self.allowed = allowed
        self.max_associations = max_associations
        self._lock = threading.Lock()
        self._admitted: list[Any] = []
        self.out_of_resources = out_of_resources

    def check(self, called_ae: str, calling_ae: str, address: str, active: int) -> Refusal | None:
        """Decide on one request; ``active`` counts inbound associations including this one."""
        called, calling = called_ae.strip(), calling_ae.strip()
        if called != self.ae_title:
            return Refusal(REJECT_CALLED_AE, f"called AE {called!r} is not this node ({self.ae_title!r})")
        if self.allowed:
            entries = [host for ae, host in self.allowed if ae == calling]
            if not entries:
                return Refusal(REJECT_CALLING_AE, f"calling AE {calling!r} is not on the allow-list")
            if not any(h is None or _host_matches(h, address) for h in entries):
                hosts = ", ".join(sorted(str(h) for h in entries))
                return Refusal(
                    REJECT_CALLING_AE, f"calling AE {calling!r} is only allowed from {hosts}, not from {address}"
                )
        if active > self.max_associations:
            return Refusal(REJECT_LIMIT, f"too many associations ({active - 1} open, limit {self.max_associations})")
        full = self.out_of_resources() if self.out_of_resources is not None else None
        if full:
            return Refusal(REJECT_CONGESTION, f"out of resources: {full}")
        return None

    def active(self) -> int:
        """Inbound associations admitted and still open (the console's health page)."""
        with self._lock:
            return sum(1 for a in self._admitted if a.is_alive() and not (a.is_released or a.is_aborted))

    # -- pynetdicom glue ---------------------------------------------------
    def apply(self, ae: Any, backstop: int | None = None) -> None:
        """Configure a pynetdicom ``AE`` (limit backstop; AE title checks are ours)."""
        ae.maximum_associations = max(self.max_associations, backstop or 0)
        ae.require_called_aet = False
        ae.require_calling_aet = []

    def handlers(self) -> Sequence[tuple[Any, Any]]:
        """Event handlers to pass to ``AE.start_server(evt_handlers=...)``."""
        return [(evt.EVT_REQUESTED, self._on_requested)]

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        prim = assoc.requestor.primitive
        called = _ae_str(prim.called_ae_title)
        calling = _ae_str(prim.calling_ae_title)
        address = assoc.requestor.address
        port = assoc.requestor.port
        with self._lock:
            self._admitted = [a for a in self._admitted if a.is_alive() and not (a.is_released or a.is_aborted)]
            active = len(self._admitted) + 1
            refusal = self.check(called, calling, address, active)
            if refusal is None:
                self._admitted.append(assoc)
        ASSOCIATIONS.labels(outcome="accepted" if refusal is None else "rejected",
                            reason="" if refusal is None else _REASONS.get(refusal.codes, "other")).inc()
        if refusal is None:
            log.debug("association requested by %s at %s:%s (called %s): accepted", calling, address, port, called)
            return
        log.warning(
            "association refused: %s; peer %s:%s, calling AE %r, called AE %r (A-ASSOCIATE-RJ %s)",
            refusal.reason,
            address,
            port,
            calling,
            called,
            "/".join(f"0x{c:02X}" for c in refusal.codes),
        )
        assoc.acse.send_reject(*refusal.codes)
        # as pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ
        # has gone out and the peer closed, otherwise the socket is shut first and
        # the peer only sees an abort
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


def _ae_str(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()
