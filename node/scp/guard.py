"""Connection guard: no peer can stall the receiver below the association level.

pynetdicom's acceptor reads the socket in its DUL thread with a blocking ``recv`` and no deadline
(the accepted socket inherits no timeout), takes the PDU length from the header as given, and counts
every open connection, associated or not, against ``maximum_associations``.  A peer that sends part
of a PDU, a header claiming 4 GiB or one byte every few seconds therefore holds a thread and a slot
for ever.  pynetdicom has no hook for this, so this module wraps the one place where bytes come in
(:meth:`AssociationSocket.recv`, called by the DUL for a PDU's 6-byte header and then its body) and
the server's accept (socketserver's ``verify_request`` and ``get_request`` hooks, and the
``server_class``/``request_handler`` parameters of ``AE.make_server``):

* deadlines: the A-ASSOCIATE-RQ must have arrived within ``acse_s`` of the connection (TLS handshake
  included); afterwards every PDU must arrive whole within ``network_s`` of its first byte; a peer
  that does not read our answers for ``network_s`` is dropped (send timeout);
* PDU checks: the first PDU must be an A-ASSOCIATE-RQ of at most ``max_request_pdu`` bytes, later
  P-DATA PDUs at most the maximum we advertise, other PDUs as small as the standard makes them; an
  unknown PDU type, or a too long one, is answered with an A-ABORT and the connection closed;
* connection limits: at most ``max_per_peer`` connections from one address; connections that have
  not associated yet are limited to ``max_pending`` (the oldest is dropped to make room for a new
  one), so they never take the association slots counted by the policy.

Everything refused here is logged at WARNING with the peer address.

Waiting instead of polling: pynetdicom runs two threads per association that each wake every
millisecond to look for work (the network thread polls the socket and its send queue, the
association thread its message queue): with 16 associations that is 32,000 wake-ups a second, each
taking the GIL from the thread that is storing an instance.  Here the network thread waits in
``select`` on the socket and a wake-up socket that the send queue signals, and the association
thread waits on its message queue; both still look at their timers at least every
:data:`IDLE_WAIT_S` (bench/README.md, soak).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.logsafe import safe

__all__ = ["ConnectionLimits", "GuardedServer", "GuardedRequestHandler", "GuardedAssociationSocket"]

log = logging.getLogger("node.scp.guard")

#: PDU types an acceptor may receive (A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT)
_PDU_ASSOCIATE_RQ = 0x01
_PDU_DATA = 0x04
_ACCEPTOR_PDUS = {0x01, 0x04, 0x05, 0x06, 0x07}
#: A-RELEASE-RQ/RP and A-ABORT PDUs have a 4-byte body; allow some slack
_SMALL_PDU = 64
#: A-ABORT source 2 (service provider), reasons 1 (unrecognised PDU) and 6 (invalid PDU parameter value)
_ABORT_UNRECOGNISED = 0x01
_ABORT_INVALID_PARAMETER = 0x06
#: Linux only; the setting does not stick, so it is set again after every read
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
#: longest an association's threads wait for data or work before they look at their timers again
IDLE_WAIT_S = 0.02


class _WakingQueue(queue.Queue):
    """The network thread's queue of primitives to send: a put also wakes that thread's wait in
    :attr:`GuardedAssociationSocket.ready`."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines and size caps of the guard (from ``node.yaml``: ``timeouts``, ``limits``)."""

    acse_s: float
    """The whole A-ASSOCIATE-RQ (and the TLS handshake) must arrive within this after connecting."""
    network_s: float
    """Every later PDU must arrive whole within this after its first byte; also the send timeout."""
    max_request_pdu: int
    """Largest A-ASSOCIATE-RQ PDU (bytes, header included)."""
    max_data_pdu: int
    """Largest P-DATA-TF PDU: the maximum PDU length we advertise plus the 6-byte header."""
    max_pending: int
    """Most connections that have not associated yet (the oldest is dropped to admit a new one)."""
    max_per_peer: int
    """Most connections from one address at a time."""


class _Violation(Exception):
    def __init__(self, reason: str, abort_reason: int | None) -> None:
        super().__init__(reason)
        self.abort_reason = abort_reason


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper with deadlines and PDU checks on :meth:`recv` (see module doc).

    Made from the plain one by :meth:`adopt` (pynetdicom constructs it inside its request handler).
    """

    _limits: ConnectionLimits
    _server: GuardedServer
    _connected_at: float
    _associated: bool
    _rq_seen: bool
    _want_header: bool
    _deadline: float
    _dropped: bool
    _peer: str
    _wake_r: socket.socket | None
    _wake_w: socket.socket | None
    _outgoing: queue.Queue[Any] | None

    @classmethod
    def adopt(cls, sock: AssociationSocket, server: GuardedServer, peer: str) -> GuardedAssociationSocket:
        # pynetdicom's RequestHandler builds a plain AssociationSocket (its constructor also queues
        # the "connection open" event, so a second instance cannot be made); only recv/close differ
        sock.__class__ = cls
        guarded: GuardedAssociationSocket = sock  # type: ignore[assignment]  # the class was just swapped
        guarded._limits = server.limits
        guarded._server = server
        guarded._connected_at = time.monotonic()
        guarded._associated = False
        guarded._rq_seen = False
        guarded._want_header = True
        guarded._deadline = 0.0
        guarded._dropped = False
        guarded._peer = peer
        guarded._wake_r = guarded._wake_w = guarded._outgoing = None
        if guarded.socket is not None:
            guarded.socket.settimeout(server.limits.network_s)  # sends: a peer that never reads is dropped
            guarded.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return guarded

    def wait_instead_of_polling(self, assoc: Any) -> None:
        """Make ``assoc``'s two threads wait for work rather than poll every millisecond (module doc).

        Called before the association's threads start (nothing is queued yet)."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._outgoing = assoc.dul.to_provider_queue = _WakingQueue(self._wake)
        # the network thread's pause between loops: after a wake-up for an answer to send, its
        # 1 ms default delayed every answer by that much (its idle wait is the select below)
        assoc.dul._run_loop_delay = 0.0001
        dimse = assoc.dimse
        get_msg = dimse.get_msg

        def wait_for_msg(block: bool = False) -> tuple[Any, Any]:
            if block:
                return get_msg(block=True)
            try:
                return dimse.msg_queue.get(timeout=IDLE_WAIT_S)
            except queue.Empty:
                return None, None

        dimse.get_msg = wait_for_msg

    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed
                pass

    @property
    def ready(self) -> bool:
        """Whether data can be read; waits up to :data:`IDLE_WAIT_S` for it unless something is
        queued to be sent (a put on that queue ends the wait at once)."""
        raw, wake = self.socket, self._wake_r
        if wake is None or raw is None or self._is_connected is False:
            return bool(super().ready)
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return True
        if self._outgoing is not None and not self._outgoing.empty():
            return bool(super().ready)
        try:
            readable, _, _ = select.select([raw, wake], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's check reports it its way
            return bool(super().ready)
        if wake in readable:
            try:
                while wake.recv(4096):
                    pass
            except OSError:  # drained (BlockingIOError) or closed
                pass
        return raw in readable

    @property
    def pending(self) -> bool:
        """Connected but not (yet) associated."""
        if not self._associated and self.assoc.is_established:
            self._associated = True
        return not self._associated and not self._dropped and self.socket is not None

    def drop(self, reason: str, abort_reason: int | None = None) -> None:
        """Close the connection (after an A-ABORT when ``abort_reason`` is given); the DUL then
        sees the connection closed and ends the association."""
        if self._dropped:
            return
        self._dropped = True
        log.warning("connection from %s dropped: %s", self._peer, safe(reason))
        raw = self.socket
        if raw is None:
            return
        if abort_reason is not None:
            try:
                raw.settimeout(1.0)
                raw.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, abort_reason]))
            except OSError:
                pass
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read(self, nr_bytes: int) -> bytearray:
        raw = self.socket
        buf = bytearray()
        while raw is not None and len(buf) < nr_bytes:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise _Violation("timed out inside a PDU", None)
            raw.settimeout(remaining)
            try:
                chunk = raw.recv(min(nr_bytes - len(buf), 1 << 20))
            except (TimeoutError, socket.timeout):
                raise _Violation("timed out inside a PDU", None) from None
            except (ssl.SSLError, OSError):
                return buf  # connection broken: the DUL sees a short read
            if not chunk:
                return buf
            buf += chunk
            if _QUICKACK is not None:
                # acknowledge at once: a peer with Nagle's algorithm on (pynetdicom, for one) holds
                # the last small segment of a message until our (delayed, ~40 ms) ACK comes
                try:
                    raw.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    pass
        if raw is not None:
            raw.settimeout(self._limits.network_s)
        return buf

    def recv(self, nr_bytes: int) -> bytearray:
        """Read for the DUL: a 6-byte PDU header, then exactly its body (checked, with deadlines)."""
        if self._dropped or self.socket is None:
            return bytearray()
        lim = self._limits
        try:
            if self._want_header:
                # "first" is what this socket has read, not the association's state: the
                # association thread marks itself established only after the A-ASSOCIATE-AC is
                # queued, and a quick peer's first P-DATA can arrive before it does
                first_pdu = not self._rq_seen
                if not first_pdu and self.assoc.is_established:
                    self._associated = True
                now = time.monotonic()
                self._deadline = self._connected_at + lim.acse_s if first_pdu else now + lim.network_s
                header = self._read(nr_bytes)
                if len(header) < 6:
                    return header
                pdu_type, _, length = struct.unpack(">BBL", bytes(header[:6]))
                if first_pdu and pdu_type != _PDU_ASSOCIATE_RQ:
                    raise _Violation(f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                                     _ABORT_UNRECOGNISED)
                self._rq_seen = True
                if pdu_type not in _ACCEPTOR_PDUS:
                    raise _Violation(f"unknown PDU type 0x{pdu_type:02X}", _ABORT_UNRECOGNISED)
                cap = (lim.max_request_pdu if pdu_type == _PDU_ASSOCIATE_RQ
                       else lim.max_data_pdu if pdu_type == _PDU_DATA else _SMALL_PDU)
                if 6 + length > cap:
                    raise _Violation(f"PDU type 0x{pdu_type:02X} claims {length} bytes (limit {cap - 6})",
                                     _ABORT_INVALID_PARAMETER)
                self._want_header = False
                return header
            body = self._read(nr_bytes)
            self._want_header = True
            return body
        except _Violation as exc:
            phase = "before associating" if not self._associated else "while associated"
            self.drop(f"{exc} ({phase})", exc.abort_reason)
            return bytearray()

    def close(self) -> None:
        self._server.forget(self)
        super().close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()


@dataclass(eq=False)
class _Conn:
    """One accepted connection, registered by the accept loop (so limits count it at once)."""

    peer: str
    request: Any
    connected_at: float
    sock: GuardedAssociationSocket | None = None
    closed: bool = False

    @property
    def live(self) -> bool:
        if self.closed:
            return False
        s = self.sock
        if s is None:
            return True
        # an association thread can end without closing its socket wrapper: count those as gone
        return s.socket is not None and not s._dropped and (s.assoc.ident is None or s.assoc.is_alive())

    @property
    def pending(self) -> bool:
        return self.sock is None or self.sock.pending

    def drop(self, reason: str) -> None:
        if self.sock is not None:
            self.sock.drop(reason)
            return
        log.warning("connection from %s dropped: %s", self.peer, safe(reason))
        self.closed = True
        try:
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, run in the connection's own thread: finishes the TLS handshake
    (with the ACSE deadline) and guards the association's socket."""

    server: GuardedServer

    def handle(self) -> None:
        peer = str(self.client_address[0])
        raw = self.request
        if isinstance(raw, ssl.SSLSocket):
            raw.settimeout(self.server.limits.acse_s)
            try:
                raw.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", peer, safe(str(exc)))
                self.server.forget_request(raw)
                self.server.shutdown_request(raw)
                return
        super().handle()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        plain = assoc.dul.socket
        assert plain is not None  # set by the handler just before
        sock = GuardedAssociationSocket.adopt(plain, self.server, str(self.client_address[0]))
        sock.wait_instead_of_polling(assoc)
        self.server.attach(self.request, sock)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """The association server with the guard's connection limits (made by ``AE.make_server``)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def attach(self, request: Any, sock: GuardedAssociationSocket) -> None:
        with self._lock:
            for c in self._conns:
                if c.request is request:
                    c.sock = sock
                    return

    def forget(self, sock: GuardedAssociationSocket) -> None:
        with self._lock:
            for c in self._conns:
                if c.sock is sock:
                    c.closed = True

    def forget_request(self, request: Any) -> None:
        with self._lock:
            for c in self._conns:
                if c.request is request:
                    c.closed = True

    def get_request(self) -> tuple[Any, Any]:
        """Accept; a TLS connection is wrapped without handshaking (the handler does it, so a peer
        that never finishes the handshake holds only its own thread, not the accept loop)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client.settimeout(self.limits.acse_s)
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        with self._lock:
            self._conns = [c for c in self._conns if c.live]
            from_peer = sum(1 for c in self._conns if c.peer == peer)
            if from_peer >= self.limits.max_per_peer:
                log.warning("connection from %s refused: %d connection(s) from that address already open "
                            "(limit %d)", peer, from_peer, self.limits.max_per_peer)
                return False
            pending = sorted((c for c in self._conns if c.pending), key=lambda c: c.connected_at)
            victims = pending[: max(0, len(pending) - self.limits.max_pending + 1)]
            self._conns.append(_Conn(peer, request, time.monotonic()))
        for v in victims:
            v.drop(f"{len(pending)} connection(s) waiting to associate (limit {self.limits.max_pending}): "
                   "the oldest makes room for a new one")
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; one log line with the peer is enough
        log.exception("error handling the connection from %s", client_address[0] if client_address else "?")
