"""The receiver against hostile and broken peers, over real connections (issue 17).

Raw sockets for malformed PDUs, pynetdicom as a misbehaving SCU, DCMTK as a well-behaved one.
Every test also checks that the node still answers a well-behaved peer.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]  # made at import
from receiver_helpers import make_receiver as start_receiver

from node.config import NodeConfig
from node.scp.receiver import Receiver
from node.store import Store

needs_dcmtk = pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK (echoscu/storescu) not installed")

#: a second loopback address: the well-behaved peer, so per-address limits on the hostile one do not hit it
GOOD_PEER = "127.0.0.2"


def make_receiver(tmp_path: Path, **cfg: Any) -> tuple[Receiver, Store]:
    """A receiver with short timeouts unless ``cfg`` sets them: hostile peers are cut within seconds."""
    cfg.setdefault("timeouts", {"acse_s": 3, "dimse_s": 10, "network_s": 3})
    return start_receiver(tmp_path, **cfg)


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


def test_a_quick_peers_first_p_data_is_not_taken_for_a_first_pdu(node, caplog):
    """The association thread marks itself established only after the A-ASSOCIATE-AC went out
    (pynetdicom triggers EVT_ACCEPTED in between); a peer that sends its first P-DATA at once
    must not be dropped as "first PDU is not an A-ASSOCIATE-RQ" (found under load: 6 senders at
    once, one aborted).  A slow EVT_ACCEPTED handler holds that window open."""
    from pynetdicom import evt

    rx, _ = node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    assert rx._server is not None

    def slow_accept(event: Any) -> None:
        time.sleep(0.5)

    rx._server.bind(evt.EVT_ACCEPTED, slow_accept)
    try:
        assert good_echo(rx.port) == 0x0000
    finally:
        rx._server.unbind(evt.EVT_ACCEPTED, slow_accept)
    assert "not an A-ASSOCIATE-RQ" not in caplog.text


def test_per_peer_connection_limit(tmp_path, caplog):
    rx, store = make_receiver(tmp_path, limits={"max_pending_connections": 20, "max_connections_per_peer": 5})
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    try:
        conns = [connect(rx.port) for _ in range(5)]
        extra = connect(rx.port)
        ok, _ = closed_within(extra, 1.0)
        assert ok
        assert "5 connection(s) from that address already open (limit 5)" in caplog.text
        assert good_echo(rx.port) == 0x0000  # another address is not affected
        for c in conns + [extra]:
            c.close()
    finally:
        rx.stop()
        store.close()


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


# ---------------------------------------------------------------------------
# integrity (items 4-8): what we acknowledge is what we keep, readable

STUDY = "1.2.826.0.1.3680043.8.498.17.1"
SERIES = "1.2.826.0.1.3680043.8.498.17.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def ct_dataset(sop_uid: str, *, name: str = "TEST^PATIENT", fill: int = 7) -> Any:
    import numpy as np
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = "ID17"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.full((16, 16), fill, dtype=np.int16).tobytes()
    return ds


def encode(ds: Any, ts: str = EXPLICIT) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = ts == IMPLICIT
    write_dataset(buf, ds)
    return buf.getvalue()


def part10(path: Path, sop_uid: str, ts: str, data_set: bytes) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CTImageStorage)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(ts)
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=False)
    path.write_bytes(buf.getvalue() + data_set)
    return path


@pytest.fixture
def raw_send(monkeypatch):
    """pynetdicom's send_c_store(path) sends the file's bytes as they are (UIDs from the file meta)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_files(port: int, files: list[Path], ts: str = EXPLICIT) -> list[int]:
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def reasons(rx: Receiver) -> list[str]:
    return [e.reason for e in rx.spool.quarantined()]


def offset_of(data: bytes, tag: tuple[int, int]) -> int:
    return data.index(struct.pack("<HH", *tag))


def test_truncated_and_overlong_data_sets_are_refused_with_what_is_wrong(node, tmp_path, raw_send):
    rx, store = node
    uid = "1.2.826.0.1.3680043.8.498.17.2"
    whole = encode(ct_dataset(uid))
    sop_at = offset_of(whole, (0x0008, 0x0018))
    cases = {
        "cut inside a UID": (whole[: sop_at + 8 + 5], 0xC000, "claims"),
        "cut before the image module": (whole[: offset_of(whole, (0x0028, 0x0002))], 0xA900,
                                        "without its Image Pixel module"),
        "cut inside PixelData": (whole[:-100], 0xC000, "(7FE0,0010) PixelData at offset"),
        "64 KB of trailing garbage": (whole + bytes(range(256)) * 256, 0xC000, "offset"),
        "random bytes": (bytes((i * 7919 + 13) % 251 for i in range(5000)), 0xC000, "has no valid VR"),
        "an empty data set": (b"", 0xC000, "empty data set (0 bytes)"),
    }
    files = [part10(tmp_path / f"{i}.dcm", uid, EXPLICIT, data) for i, (data, _, _) in enumerate(cases.values())]
    statuses = send_files(rx.port, files)
    assert statuses == [status for _, status, _ in cases.values()]
    assert store.count_instances() == 0 and not list(rx.spool.spool_dir.rglob("*.dcm"))
    got = reasons(rx)
    assert len(got) == len(cases)
    for (what, (_, _, needle)) in cases.items():
        assert any(needle in r for r in got), (what, got)
    assert not any("missing or empty" in r for r in got), got  # item 8: the reason names the real problem
    # the whole one is stored, and DCMTK reads what we stored
    assert send_files(rx.port, [part10(tmp_path / "ok.dcm", uid, EXPLICIT, whole)]) == [0]
    (stored,) = rx.spool.spool_dir.rglob("*.dcm")
    # item 11: patient data is not readable by every local user
    import stat

    for f in [stored, *rx.spool.quarantine_dir.iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    for d in (stored.parent, stored.parent.parent, rx.spool.spool_dir, rx.spool.quarantine_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    if shutil.which("dcmdump"):
        out = subprocess.run(["dcmdump", "-q", str(stored)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "E:" not in out.stderr, out.stderr
    assert good_echo(rx.port) == 0x0000


def test_explicit_vr_on_an_implicit_context_is_refused(node, tmp_path, raw_send):
    rx, store = node
    uid = "1.2.826.0.1.3680043.8.498.17.3"
    f = part10(tmp_path / "x.dcm", uid, IMPLICIT, encode(ct_dataset(uid), EXPLICIT))
    assert send_files(rx.port, [f], ts=IMPLICIT) == [0xC000]
    (reason,) = reasons(rx)
    assert "encoded in explicit VR, but the presentation context negotiated implicit VR" in reason
    assert store.count_instances() == 0
    # the same data set encoded as negotiated is stored, and readable
    ok = part10(tmp_path / "i.dcm", uid, IMPLICIT, encode(ct_dataset(uid), IMPLICIT))
    assert send_files(rx.port, [ok], ts=IMPLICIT) == [0]
    assert store.count_instances() == 1


def test_uids_that_are_not_dicom_uids_are_refused(node, tmp_path, raw_send):
    rx, store = node
    # both would have been spooled as "1.2.3.4_.dcm" by a file name that replaces characters
    files = [part10(tmp_path / f"{c}.dcm", f"1.2.826.0.1.3680043.8.498.17.4{c}", EXPLICIT,
                    encode(ct_dataset(f"1.2.826.0.1.3680043.8.498.17.4{c}"))) for c in ("/", "*")]
    assert send_files(rx.port, files) == [0xA900, 0xA900]
    assert all("is not a DICOM UID" in r for r in reasons(rx))
    assert store.count_instances() == 0


@pytest.mark.parametrize("policy", ["keep_first", "keep_last", "quarantine"])
def test_resent_instance_with_other_content(tmp_path, raw_send, caplog, policy):
    rx, store = make_receiver(tmp_path, duplicates=policy)
    caplog.set_level(logging.INFO, logger="node.scp.receiver")
    try:
        uid = "1.2.826.0.1.3680043.8.498.17.5"
        first = part10(tmp_path / "a.dcm", uid, EXPLICIT, encode(ct_dataset(uid)))
        same = part10(tmp_path / "b.dcm", uid, EXPLICIT, encode(ct_dataset(uid)))
        other = part10(tmp_path / "c.dcm", uid, EXPLICIT, encode(ct_dataset(uid, name="OTHER^NAME", fill=9)))
        assert send_files(rx.port, [first, same]) == [0, 0]
        assert "re-sent with different content" not in caplog.text  # an identical copy is no conflict
        assert send_files(rx.port, [other]) == [0]
        warn = [r for r in caplog.records if "re-sent with different content" in r.getMessage()]
        assert len(warn) == 1 and warn[0].levelno == logging.WARNING
        assert "PatientName, PixelData differ" in warn[0].getMessage() and "OTHER" not in warn[0].getMessage()
        assert f"policy {policy}" in warn[0].getMessage()
        series = store.get_series(SERIES)
        assert series is not None and series.conflicts == 1 and rx.stats["conflicts"] == 1
        (stored,) = rx.spool.spool_dir.rglob("*.dcm")
        from pydicom import dcmread

        kept = str(dcmread(stored).PatientName)
        assert kept == ("OTHER^NAME" if policy == "keep_last" else "TEST^PATIENT")
        quarantined = reasons(rx)
        assert (len(quarantined) == 1 and "different content" in quarantined[0]) if policy == "quarantine" \
            else not quarantined
        assert store.count_instances() == 1
        assert good_echo(rx.port) == 0x0000
    finally:
        rx.stop()
        store.close()


def test_rescan_quarantine_reasons_say_what_was_wrong(tmp_path):
    """Item 8: files in the spool that cannot be indexed get a reason naming the real problem."""
    config = NodeConfig(port=0, bind_address="127.0.0.1", storage=tmp_path / "var")
    folder = config.spool_dir / STUDY / SERIES
    folder.mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.8.498.17.6"
    whole = encode(ct_dataset(uid))
    part10(folder / "cut.dcm", uid, EXPLICIT, whole[:-100])
    (folder / "random.dcm").write_bytes(bytes((i * 7919 + 13) % 251 for i in range(5000)))
    part10(folder / "empty.dcm", uid, EXPLICIT, b"")
    store = Store(config.database_path)
    rx = Receiver(config, store)
    rx.start()
    try:
        got = sorted(reasons(rx))
        assert len(got) == 3 and store.count_instances() == 0
        assert any("(7FE0,0010) PixelData at offset" in r and "truncated" in r for r in got), got
        assert any("not a DICOM file" in r for r in got), got
        assert any("empty data set" in r for r in got), got
        assert not any("missing or empty" in r for r in got), got
        assert good_echo(rx.port) == 0x0000
    finally:
        rx.stop()
        store.close()


# ---------------------------------------------------------------------------
# logs (item 12): one line per record, capped, no PHI by default


@pytest.fixture
def safe_log():
    """The root logger writing through node.logsafe's formatter into a buffer (as `serve` does)."""
    import io
    import warnings

    from node import logsafe

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = logging.getLogger()
    old_level = root.level
    with warnings.catch_warnings():
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logsafe.install([handler], log_phi=False)
        try:
            yield buf
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            logsafe.set_log_phi(False)


def test_hostile_values_cannot_forge_or_flood_log_lines_and_phi_stays_out(node, tmp_path, raw_send, safe_log):
    rx, store = node
    uid = "1.2.826.0.1.3680043.8.498.17.7"
    ds = ct_dataset(uid, name="A" * 9000 + "\r\n2026-01-01 00:00:00,000 INFO node: FORGED")
    ds.PatientID = "PID4711\r\nFORGED2"
    ds.StudyDate = "19700101x"  # an invalid DA: pydicom warns, quoting it
    f = part10(tmp_path / "p.dcm", uid, EXPLICIT, encode(ds))
    send_files(rx.port, [f])
    # a calling AE title with CR/LF, in a raw A-ASSOCIATE-RQ (calling AE: bytes 26..42)
    rq = bytearray(associate_rq_bytes())
    rq[10:26] = b"WRONGAE\r\nFORGED3"
    rq[26:42] = b"EVIL\r\nFORGED4   "
    s = connect(rx.port)
    s.sendall(bytes(rq))
    closed_within(s, 2)
    s.close()
    assert good_echo(rx.port) == 0x0000
    text = safe_log.getvalue()
    lines = text.splitlines()
    assert lines, "nothing logged"
    stamp = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} [A-Z]+ ")
    assert all(stamp.match(ln) for ln in lines), [ln[:120] for ln in lines if not stamp.match(ln)]
    assert "FORGED" not in "".join(ln[:40] for ln in lines)
    assert "A" * 600 not in text  # the 9000-character name is not logged whole
    assert max(len(ln) for ln in lines) < 10000
    assert "PID4711" not in text and "19700101x" not in text  # log_phi: false
    assert any("pydicom" in ln and f"[SOP instance {uid}]" in ln for ln in lines), text  # names the instance
    # pynetdicom refuses to decode those AE titles and logs the value, with a traceback: one line each
    assert "Unable to decode the received PDU data" in text


def test_share_paths_are_hidden_from_the_log_unless_log_phi(tmp_path):
    from node import logsafe
    from node.dispatcher import Dispatcher

    config = NodeConfig(storage=tmp_path / "var", share={"root": tmp_path / "share"})
    store = Store(config.database_path)
    try:
        d = Dispatcher(config, store)
        text = f"dropped 3 file(s) in {tmp_path / 'share'}/PID4711/20240101_ACC/1_CT_bones/ (manifest.json)"
        assert "PID4711" not in d._hide_share_paths(text) and "<phi>" in d._hide_share_paths(text)
        logsafe.set_log_phi(True)
        assert d._hide_share_paths(text) == text
    finally:
        logsafe.set_log_phi(False)
        store.close()


# ---------------------------------------------------------------------------
# faults (item 14): the disk fills up during a send


@pytest.fixture
def small_volume(tmp_path: Path):
    """A 6 MiB tmpfs mounted for the test (root only)."""
    vol = tmp_path / "vol"
    vol.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(vol)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield vol
    finally:
        subprocess.run(["umount", "-l", str(vol)], capture_output=True)


def big_ct(tmp_path: Path, n: int) -> list[Path]:
    import numpy as np

    files = []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.8.498.17.14.{i + 1}"
        ds = ct_dataset(uid)
        ds.Rows = ds.Columns = 362  # ~256 KiB of pixels
        ds.PixelData = np.full((362, 362), i, dtype=np.int16).tobytes()
        files.append(part10(tmp_path / f"big{i}.dcm", uid, EXPLICIT, encode(ds)))
    return files


def test_disk_full_refuses_instances_and_associations_and_holds_the_series(small_volume, tmp_path, raw_send,
                                                                          caplog):
    from node.completion import sweep

    caplog.set_level(logging.INFO)
    rx, store = make_receiver(small_volume, disk={"warn_free_mib": 4, "reserve_free_mib": 2,
                                                  "check_interval_s": 0.01})
    try:
        files = big_ct(tmp_path, 24)
        statuses = send_files(rx.port, files)
        stored = statuses.count(0)
        assert 0 < stored < len(files) and statuses == [0] * stored + [0xA700] * (len(files) - stored), statuses
        assert "only" in caplog.text and "MiB free (warning below 4 MiB" in caplog.text  # warned before
        assert "below the reserve of 2 MiB" in caplog.text
        refused = store.refused_instances(SERIES)
        assert len(refused) == len(files) - stored
        # a new association is refused: out of resources (transient, temporary congestion)
        assoc = scu().associate("127.0.0.1", rx.port, ae_title="DICOMNODE", bind_address=(GOOD_PEER, 0))
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None and (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x01)
        # the partial series is not completed while it waits for the refused instances ...
        assert sweep(store, 0.0, refused_wait_s=3600) == []
        # ... space comes back (the operator cleans up), the sender sends the refused ones again
        for p in rx.spool.spool_dir.rglob("*.dcm"):
            p.unlink()  # stands in for retention / another volume's cleanup
        store.conn.execute("DELETE FROM instances")
        store.conn.execute("UPDATE series SET instance_count = 0")
        time.sleep(0.05)
        assert good_echo(rx.port) == 0x0000  # available again
        assert send_files(rx.port, files[stored:]) == [0] * (len(files) - stored)
        assert store.refused_instances(SERIES) == []
        assert sweep(store, 0.0, refused_wait_s=3600) == [SERIES]
        series = store.get_series(SERIES)
        assert series is not None and not series.incomplete
    finally:
        rx.stop()
        store.close()


def test_series_with_refused_instances_is_routed_incomplete_after_the_wait(tmp_path):
    from node.completion import sweep
    from node.store import InstanceRecord

    store = Store(tmp_path / "node.db")
    try:
        now = time.time()
        store.record_instance(InstanceRecord(sop_instance_uid="1.2.3.1", sop_class_uid=CTImageStorage,
                                             series_uid="1.2.3", study_uid="1.2", path="/x/1.dcm",
                                             transfer_syntax=EXPLICIT, size=1, received_at=now - 100))
        store.record_refusal("1.2.3.2", "1.2.3", "1.2", "disk full", now=now - 100)
        store.record_refusal("9.9.9.1", "9.9.9", "9.9", "disk full", now=now - 100)  # a series with none received
        assert sweep(store, 10.0, now=now, refused_wait_s=1000) == []
        assert sweep(store, 10.0, now=now, refused_wait_s=50) == ["1.2.3"]  # the one with nothing stays
        s = store.get_series("1.2.3")
        assert s is not None and s.incomplete
        out = subprocess.run([sys.executable, "-m", "node.cli", "jobs", "series", "--db", str(store.path)],
                             capture_output=True, text=True, timeout=60)
        assert "INCOMPLETE" in out.stdout and "1 instance(s) refused for want of space" in out.stdout, out.stdout
    finally:
        store.close()
