"""The receiver against hostile and broken peers, over real connections (issue 17).

Raw sockets for malformed PDUs, pynetdicom as a misbehaving SCU, DCMTK as a well-behaved one.
Every test also checks that the node still answers a well-behaved peer.
"""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]  # made at import

from node.config import NodeConfig
from node.scp.receiver import Receiver
from node.store import Store

needs_dcmtk = pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK (echoscu/storescu) not installed")

#: a second loopback address: the well-behaved peer, so per-address limits on the hostile one do not hit it
GOOD_PEER = "127.0.0.2"


def make_receiver(tmp_path: Path, **cfg: Any) -> tuple[Receiver, Store]:
    cfg.setdefault("timeouts", {"acse_s": 3, "dimse_s": 10, "network_s": 3})
    config = NodeConfig(port=0, bind_address="127.0.0.1", storage=tmp_path / "var", **cfg)
    store = Store(config.database_path)
    rx = Receiver(config, store)
    rx.start()
    return rx, store


@pytest.fixture
def node(tmp_path: Path):
    rx, store = make_receiver(tmp_path, max_associations=2,
                              limits={"max_pending_connections": 8, "max_connections_per_peer": 10})
    yield rx, store
    rx.stop()
    store.close()


def scu(*contexts: Any) -> AE:
    ae = AE(ae_title="GOODSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for cx in contexts or (Verification,):
        ae.add_requested_context(cx)
    return ae


def good_echo(port: int) -> int | None:
    """C-ECHO from GOOD_PEER; the status, or None when no association."""
    assoc = scu().associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(GOOD_PEER, 0))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the node closed ``s`` within ``seconds``; and what it sent before."""
    s.settimeout(seconds)
    got = b""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            chunk = s.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except (TimeoutError, socket.timeout):
        return False, got
    except ConnectionResetError:
        return True, got
    return False, got


def associate_rq_bytes() -> bytes:
    """A real A-ASSOCIATE-RQ PDU, as pynetdicom sends it (caught by a fake acceptor)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    out: list[bytes] = []

    def catch() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        head = conn.recv(6, socket.MSG_WAITALL)
        length = struct.unpack(">L", head[2:6])[0]
        out.append(head + conn.recv(length, socket.MSG_WAITALL))
        conn.close()

    t = threading.Thread(target=catch)
    t.start()
    ae = scu()
    ae.acse_timeout = 2
    ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    t.join(5)
    srv.close()
    return out[0]


# ---------------------------------------------------------------------------
# availability (items 1-3)


def test_partial_pdus_are_timed_out_and_hold_no_association_slot(node, caplog):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    rq = associate_rq_bytes()
    stalled = []
    for i in range(10):
        s = connect(rx.port)
        s.sendall(rq[:3] if i % 2 else rq[: len(rq) // 2])  # a 3-byte header, or half a request
        stalled.append(s)
    time.sleep(0.3)
    # more than max_associations (2) stalled connections: a real peer still associates at once
    t0 = time.monotonic()
    assert good_echo(rx.port) == 0x0000
    assert good_echo(rx.port) == 0x0000
    assert time.monotonic() - t0 < 2
    # ... and the stalled ones are closed by the ACSE deadline (3 s)
    for s in stalled:
        ok, _ = closed_within(s, 5)
        assert ok
        s.close()
    assert "timed out inside a PDU (before associating)" in caplog.text or "waiting to associate" in caplog.text


def test_one_byte_every_second_is_cut_at_the_acse_deadline(node, caplog):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    rq = associate_rq_bytes()
    s = connect(rx.port)
    t0 = time.monotonic()
    closed = False
    for b in rq:
        try:
            s.send(bytes([b]))
        except OSError:
            closed = True
            break
        ok, _ = closed_within(s, 1.0)
        if ok:
            closed = True
            break
    assert closed
    assert time.monotonic() - t0 < 3 + 2
    assert "timed out inside a PDU (before associating)" in caplog.text
    assert good_echo(rx.port) == 0x0000


def test_huge_pdu_length_claim_is_aborted_at_once(node, caplog):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    s = connect(rx.port)
    s.sendall(b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 1000)  # an A-ASSOCIATE-RQ claiming 4 GiB
    ok, got = closed_within(s, 1.0)
    assert ok
    assert got[:1] == b"\x07" and got[-1:] == b"\x06"  # A-ABORT, invalid PDU parameter value
    assert "claims 4294967295 bytes (limit 65530)" in caplog.text
    assert good_echo(rx.port) == 0x0000


@pytest.mark.parametrize("first", [b"\x09\x00\x00\x00\x00\x04abcd", b"\x04\x00\x00\x00\x00\x04abcd",
                                   b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_unknown_or_out_of_order_first_pdu_is_aborted_and_closed(node, caplog, first):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    s = connect(rx.port)
    s.sendall(first)
    ok, got = closed_within(s, 1.0)
    assert ok
    assert got[:1] == b"\x07" and got[-1:] == b"\x01"  # A-ABORT, unrecognised PDU
    assert "not an A-ASSOCIATE-RQ" in caplog.text
    assert good_echo(rx.port) == 0x0000


def test_per_peer_connection_limit(node, caplog):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    conns = [connect(rx.port) for _ in range(10)]
    time.sleep(0.3)
    extra = connect(rx.port)
    ok, _ = closed_within(extra, 1.0)
    assert ok
    assert "10 connection(s) from that address already open (limit 10)" in caplog.text
    assert good_echo(rx.port) == 0x0000
    for c in conns + [extra]:
        c.close()


def _raw_socket(assoc: Any) -> socket.socket:
    return assoc.dul.socket.socket  # the requestor's socket, to write what pynetdicom would not


def test_oversized_data_pdu_after_association_aborts(node, caplog):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    assoc = scu(CTImageStorage).associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 4096 * 1024  # advertised, and enforced:
    _raw_socket(assoc).sendall(b"\x04\x00" + struct.pack(">L", 4096 * 1024 + 1) + b"\x00" * 100)
    deadline = time.monotonic() + 3
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert "claims 4194305 bytes (limit 4194304) (while associated)" in caplog.text
    assert good_echo(rx.port) == 0x0000


def test_stall_inside_a_data_pdu_is_cut_at_the_network_deadline(node, caplog):
    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    assoc = scu(CTImageStorage).associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert assoc.is_established
    t0 = time.monotonic()
    _raw_socket(assoc).sendall(b"\x04\x00\x00\x00\x01\x00" + b"\x00" * 10)  # 256 bytes promised, 10 sent
    while assoc.is_established and time.monotonic() < t0 + 8:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert time.monotonic() - t0 < 3 + 2
    assert "timed out inside a PDU (while associated)" in caplog.text
    assert good_echo(rx.port) == 0x0000


@needs_dcmtk
def test_dcmtk_echo_while_hostile_connections_are_open(node):
    rx, _ = node
    hostile = [connect(rx.port) for _ in range(8)]
    for h in hostile:
        h.sendall(b"\x01\x00")
    # DCMTK from the same address: the pending ones are dropped to make room, never the real peer
    out = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port)], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    for h in hostile:
        h.close()
