"""Receiver, association policy and sender against real DCMTK peers and pynetdicom."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_preamble
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]  # sop_class makes its names at import
from receiver_helpers import make_receiver

from node.scp.receiver import Receiver
from node.scp.sender import DestinationUnavailable, echo, send_datasets

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
AS_PUBLISHED = DATA / "ct-abdomen-siemens-j2k" / "dicom-as-published"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"

needs_dcmtk = pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK (echoscu/storescu/storescp) not installed")
needs_data = pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset_bytes(data: bytes) -> bytes:
    """The encoded data set of a Part 10 file: everything after the file meta group."""
    fp = BytesIO(data)
    read_preamble(fp, False)
    start = fp.tell()  # after DICM
    # group length (0002,0000) UL: tag(4) VR(2) len(2) value(4)
    assert data[start : start + 4] == b"\x02\x00\x00\x00"
    group_len = int.from_bytes(data[start + 8 : start + 12], "little")
    return data[start + 12 + group_len :]


@pytest.fixture
def receiver(tmp_path):
    rx, store = make_receiver(tmp_path, timeouts={"acse_s": 5, "dimse_s": 10, "network_s": 10})
    yield rx, store
    rx.stop()
    store.close()


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def pynet_ae(*syntaxes: str) -> AE:
    ae = AE(ae_title="PYTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, list(syntaxes) or [J2K_LOSSLESS])
    return ae


def part10(path: Path, sop_class: str, sop_instance: str, ts: str, data_set: bytes) -> Path:
    """Write a Part 10 file around an encoded data set, with the given file meta UIDs."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    path.write_bytes(buf.getvalue() + data_set)
    return path


@pytest.fixture
def raw_send(monkeypatch):
    """pynetdicom's send_c_store(path) sends the file's bytes as is, UIDs from the file meta."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# ---------------------------------------------------------------------------
# association policy


@needs_dcmtk
def test_echo_and_called_ae_rejection(receiver):
    rx, _ = receiver
    ok = run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port)])
    assert ok.returncode == 0, ok.stderr
    bad = run(["echoscu", "-aec", "WRONG", "127.0.0.1", str(rx.port)])
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0
    assert "Rejected Permanent" in out and "Service User" in out and "Called AE Title Not Recognized" in out, out


@needs_dcmtk
def test_calling_ae_allow_list(tmp_path):
    rx, store = make_receiver(
        tmp_path,
        allowed_calling_aes=[{"ae_title": "CT01"}, {"ae_title": "BOUND", "host": "10.255.255.1"}],
    )
    try:
        base = ["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port)]
        assert run(base + ["-aet", "CT01"]).returncode == 0
        for aet in ("UNKNOWN", "BOUND"):  # not listed / listed for another host
            r = run(base + ["-aet", aet])
            out = r.stdout + r.stderr
            assert r.returncode != 0
            assert "Rejected Permanent" in out and "Calling AE Title Not Recognized" in out, out
    finally:
        rx.stop()
        store.close()


@needs_dcmtk
def test_max_associations(tmp_path):
    rx, store = make_receiver(tmp_path, max_associations=2)
    ae = pynet_ae()
    held = [ae.associate("127.0.0.1", rx.port, ae_title="DICOMNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        r = run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port)])
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out
    finally:
        for a in held:
            a.release()
    time.sleep(0.3)
    assert run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port)]).returncode == 0
    rx.stop()
    store.close()


# ---------------------------------------------------------------------------
# C-STORE


@needs_dcmtk
@needs_data
def test_storescu_j2k_series_stored_byte_identical(receiver):
    rx, store = receiver
    r = run(["storescu", "-xv", "+sd", "-aec", "DICOMNODE", "-aet", "MODALITY", "127.0.0.1", str(rx.port), str(J2K)], 60)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(rx.spool.spool_dir.rglob("*.dcm"))
    assert len(files) == 20
    by_sop = {f.stem: f for f in files}
    for src in sorted(J2K.glob("*.dcm")):
        src_bytes = src.read_bytes()
        sop = str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
        got = by_sop[sop].read_bytes()
        assert dataset_bytes(got) == dataset_bytes(src_bytes), f"{src.name}: data set bytes differ"
        ds = dcmread(by_sop[sop])
        assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
        assert by_sop[sop].parent.name == ds.SeriesInstanceUID
        assert by_sop[sop].parent.parent.name == ds.StudyInstanceUID
        inst = store.get_instance(sop)
        assert inst.path == str(by_sop[sop]) and inst.transfer_syntax == J2K_LOSSLESS
        assert inst.calling_ae == "MODALITY" and inst.called_ae == "DICOMNODE" and inst.peer_address == "127.0.0.1"
        assert inst.received_count == 1 and inst.size == len(got)
        assert inst.tags["Modality"] == "CT" and inst.tags["SeriesDescription"] == "CT Body 3.0"
    series = store.list_series()
    assert len(series) == 1 and series[0].instance_count == 20 and series[0].state == "receiving"
    assert not list(rx.spool.spool_dir.rglob("*.tmp"))

    # duplicates: stored once, counted, success
    dup = sorted(J2K.glob("*.dcm"))[:2]
    r = run(["storescu", "-xv", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port), *map(str, dup)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(rx.spool.spool_dir.rglob("*.dcm"))) == 20
    counts = sorted(i.received_count for i in store.series_instances(series[0].series_uid))
    assert counts == [1] * 18 + [2, 2]
    assert store.get_series(series[0].series_uid).instance_count == 20
    assert rx.stats["duplicates"] == 2


@needs_data
def test_as_published_empty_uids_refused_and_quarantined(receiver, raw_send):
    rx, store = receiver
    files = sorted(AS_PUBLISHED.iterdir())
    assert len(files) == 20
    ae = pynet_ae()
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        # storescu cannot: the data set's SOP class is empty; pynetdicom in chunked mode
        # takes the SOP class/instance UIDs from the file meta and sends the bytes raw
        statuses = [assoc.send_c_store(f).Status for f in files]
    finally:
        assoc.release()
    assert statuses == [0xA900] * 20
    assert not list(rx.spool.spool_dir.rglob("*.dcm")) and store.count_instances() == 0
    q = sorted(rx.spool.quarantine_dir.glob("*.dcm"))
    reasons = sorted(rx.spool.quarantine_dir.glob("*.reason.txt"))
    assert len(q) == len(reasons) == 20
    text = reasons[0].read_text()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PYTEST"):
        assert kw in text, text
    # the quarantined bytes are what was sent
    originals = {dataset_bytes(f.read_bytes()) for f in files}
    assert {dataset_bytes(p.read_bytes()) for p in q} == originals


@needs_data
def test_corrupt_instance_refused_others_stored(receiver, tmp_path, raw_send):
    rx, store = receiver
    good = sorted(J2K.glob("*.dcm"))[:3]
    raw = good[1].read_bytes()
    bad = tmp_path / "corrupt.dcm"
    bad.write_bytes(raw[:1500] + b"GARBAGE!" * 16 + raw[1628:])  # garbage in the middle of the data set
    ae = pynet_ae()
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(p).Status for p in (good[0], bad, good[2])]
        assert assoc.send_c_echo().Status == 0x0000  # association still fine
    finally:
        assoc.release()
    assert statuses == [0x0000, 0xC000, 0x0000]
    assert store.count_instances() == 2 and len(list(rx.spool.spool_dir.rglob("*.dcm"))) == 2
    (reason,) = rx.spool.quarantine_dir.glob("*.reason.txt")
    assert "cannot parse" in reason.read_text()
    (qfile,) = rx.spool.quarantine_dir.glob("*.dcm")
    assert dataset_bytes(qfile.read_bytes()) == dataset_bytes(bad.read_bytes())
    # the operator sees it: reason, sender and file, from the reason file next to the bytes
    (entry,) = rx.spool.quarantined()
    assert entry.path == qfile and entry.size == qfile.stat().st_size
    assert "cannot parse" in entry.reason and entry.calling == "PYTEST" and entry.peer == "127.0.0.1"
    res = subprocess.run([sys.executable, "-m", "node.cli", "jobs", "quarantine", "--db", str(store.path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "cannot parse" in res.stdout and "PYTEST" in res.stdout and str(qfile) in res.stdout
    assert "1 quarantined instance(s)" in res.stdout


@needs_data
def test_sop_instance_mismatch_refused(receiver, raw_send, tmp_path):
    rx, store = receiver
    raw = sorted(J2K.glob("*.dcm"))[0].read_bytes()
    # the data set under a different AffectedSOPInstanceUID (taken from the file meta)
    f = part10(tmp_path / "mismatch.dcm", CTImageStorage, "1.2.3.4.5", J2K_LOSSLESS, dataset_bytes(raw))
    ae = pynet_ae()
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    try:
        assert assoc.send_c_store(f).Status == 0xA900
    finally:
        assoc.release()
    assert store.count_instances() == 0
    (reason,) = rx.spool.quarantine_dir.glob("*.reason.txt")
    assert "differs from the command's AffectedSOPInstanceUID" in reason.read_text()


@needs_data
def test_rescan_indexes_unindexed_spool_files(tmp_path):
    rx, store = make_receiver(tmp_path)
    src = sorted(J2K.glob("*.dcm"))[:2]
    ae = pynet_ae()
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert [assoc.send_c_store(p).Status for p in src] == [0, 0]
    assoc.release()
    rx.stop()
    # simulate a crash after the write but before indexing: forget one instance
    uid = str(dcmread(src[0], stop_before_pixels=True).SOPInstanceUID)
    store.conn.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
    (rx.spool.spool_dir / "leftover.dcm.tmp").write_bytes(b"partial")
    rx2 = Receiver(rx.config, store)
    rx2.start()
    try:
        inst = store.get_instance(uid)
        assert inst is not None and inst.calling_ae == "PYTEST" and inst.transfer_syntax == J2K_LOSSLESS
        assert not (rx.spool.spool_dir / "leftover.dcm.tmp").exists()
    finally:
        rx2.stop()
        store.close()


# ---------------------------------------------------------------------------
# sender


@pytest.fixture
def storescp(tmp_path):
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "PACS", "-od", str(out), "--fork", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield out, port
    proc.terminate()
    proc.wait(timeout=10)


@needs_dcmtk
@needs_data
def test_sender_to_storescp(storescp):
    out, port = storescp
    dest = ("PACS", "127.0.0.1", port)
    assert echo(dest, calling_ae="DICOMNODE", timeouts=10) == 0x0000
    src = sorted(J2K.glob("*.dcm"))[:5]
    ds = dcmread(sorted(J2K.glob("*.dcm"))[5])  # a Dataset item as well as paths
    result = send_datasets([*src, ds], dest, calling_ae="DICOMNODE", timeouts=10)
    assert result.ok, result.summary()
    assert [i.status for i in result.instances] == [0] * 6
    deadline = time.time() + 10
    while len(list(out.iterdir())) < 6 and time.time() < deadline:
        time.sleep(0.1)
    arrived = list(out.iterdir())
    assert len(arrived) == 6
    received = {dataset_bytes(p.read_bytes()) for p in arrived}
    for p in src:  # sent as is: same syntax, same bytes
        assert dataset_bytes(p.read_bytes()) in received
    assert all(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == J2K_LOSSLESS for p in arrived)


@needs_dcmtk
@needs_data
def test_sender_falls_back_to_uncompressed(tmp_path):
    out = tmp_path / "plain"
    out.mkdir()
    port = free_port()
    # default storescp: uncompressed transfer syntaxes only
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        src = sorted(J2K.glob("*.dcm"))[0]
        result = send_datasets([src], ("PACS", "127.0.0.1", port), timeouts=10)
        assert result.ok, result.summary()
        time.sleep(0.3)
        (got,) = out.iterdir()
        ds = dcmread(got)
        assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        assert (ds.pixel_array == dcmread(src).pixel_array).all()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sender_peer_down_is_transient():
    port = free_port()  # nothing listens there
    with pytest.raises(DestinationUnavailable, match=r"peer down") as ei:
        echo(("PACS", "127.0.0.1", port), timeouts=3)
    assert ei.value.transient
    if J2K.is_dir():
        with pytest.raises(DestinationUnavailable):
            send_datasets(sorted(J2K.glob("*.dcm"))[:1], ("PACS", "127.0.0.1", port), timeouts=3)


@needs_data
def test_sender_rejected_is_transient_error(receiver):
    rx, _ = receiver
    with pytest.raises(DestinationUnavailable, match=r"rejected.*reason 0x07"):
        send_datasets(sorted(J2K.glob("*.dcm"))[:1], ("WRONG", "127.0.0.1", rx.port), timeouts=5)
    # and to our own receiver it works end to end
    result = send_datasets(sorted(J2K.glob("*.dcm"))[:2], ("DICOMNODE", "127.0.0.1", rx.port), timeouts=5)
    assert result.ok and len(list(rx.spool.spool_dir.rglob("*.dcm"))) == 2


# ---------------------------------------------------------------------------
# threads of an association (bench/README.md, soak)


def test_sender_reactor_leaves_responses_to_the_waiting_call(receiver):
    """pynetdicom's requestor reactor polls the DIMSE queue too and, under load, took C-STORE
    responses meant for the waiting send_c_store (which then aborted after its DIMSE timeout):
    on an association the node opens only the waiting call takes them."""
    from pynetdicom.dimse_primitives import C_STORE

    from node.scp.sender import _associate

    rx, _ = receiver
    answer = C_STORE()
    answer.MessageIDBeingRespondedTo, answer.Status = 1, 0x0000

    plain = pynet_ae().associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert plain.is_established
    try:  # the race as pynetdicom has it: its reactor takes an answer nobody paused it for
        plain.dimse.msg_queue.put((1, answer))  # as the network thread does when an answer arrives
        deadline = time.monotonic() + 5
        while not plain.dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert plain.dimse.msg_queue.empty(), "pynetdicom's reactor no longer takes answers: keep_responses may go"
    finally:
        plain.release()

    ours = _associate(pynet_ae(), ("DICOMNODE", "127.0.0.1", rx.port), "PYTEST")
    try:
        ours.dimse.msg_queue.put((1, answer))
        time.sleep(0.3)  # the reactor looks at the queue every millisecond
        cx, msg = ours.dimse.get_msg(block=True)
        assert (cx, msg) == (1, answer)
    finally:
        ours.release()


def test_idle_association_threads_wait_instead_of_polling(receiver):
    """The receiver's two threads per association sit in a wait (select on the socket, the
    message queue), not in pynetdicom's 1 ms polling sleeps; and still answer at once."""
    import sys

    rx, _ = receiver
    assoc = pynet_ae().associate("127.0.0.1", rx.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        deadline = time.monotonic() + 5
        while not rx._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        (server_side,) = rx._server.active_associations

        def where(ident: int) -> list[str]:
            f, names = sys._current_frames().get(ident), []
            while f is not None:
                names.append(f.f_code.co_name)
                f = f.f_back
            return names

        network = reactor = 0
        for _ in range(20):
            network += "ready" in where(server_side.dul.ident) and "sleep" not in where(server_side.dul.ident)[:1]
            reactor += "wait_for_msg" in where(server_side.ident)
            time.sleep(0.013)
        assert network >= 10 and reactor >= 10, (network, reactor)
        assert assoc.send_c_echo().Status == 0x0000  # a request wakes them
    finally:
        assoc.release()


@needs_data
@pytest.mark.parametrize("source", ["ct-j2k", "mr-synthetic"])
def test_concurrent_associations_each_answered_after_its_instance_is_indexed(receiver, tmp_path, source):
    """8 associations at once (the index inserts of their C-STOREs grouped into shared transactions,
    Store.record_instance_grouped): every success comes after the instance's row is committed,
    a SOP instance sent on two associations is stored once and counted twice, nothing is lost.
    A real J2K CT series, and a synthetic MR series (explicit VR) made from the MR volume."""
    import threading

    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]  # sop_class makes its names at import

    from node.scp.sender import _associate
    from node.tools.synth_series import write_series

    rx, store = receiver
    if source == "ct-j2k":
        files = sorted(J2K.glob("*.dcm"))[:6]
        ae = pynet_ae()
    else:
        files = sorted(write_series(DATA / "mr-small" / "mr.nii.gz", tmp_path / "mr", size=(64, 64, 6),
                                    modality="MR", series_description="synthetic MR"))
        ae = AE(ae_title="PYTEST")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    series = [generate_uid() for _ in range(4)]  # two associations per series, as a PACS may send
    sops = [[generate_uid() for _ in files] for _ in series]
    not_indexed: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def send(k: int) -> None:
        s = k // 2
        assoc = _associate(ae, ("DICOMNODE", "127.0.0.1", rx.port), "PYTEST")
        try:
            for i, f in enumerate(files):
                if k % 2 and i % 2:  # the second association of a series sends only every other instance
                    continue
                ds = dcmread(f)
                ds.SeriesInstanceUID, ds.SOPInstanceUID = series[s], sops[s][i]
                ds.file_meta.MediaStorageSOPInstanceUID = sops[s][i]
                status = assoc.send_c_store(ds).Status
                # read at once from another connection: a success means the row is committed
                row = store.get_instance(sops[s][i])
                with lock:
                    statuses.append(status)
                    if row is None:
                        not_indexed.append(sops[s][i])
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(k,)) for k in range(2 * len(series))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sent = len(series) * (len(files) + len(files) // 2)
    assert statuses == [0x0000] * sent and not_indexed == []
    assert store.count_instances() == len(series) * len(files)
    for uid in series:
        assert store.get_series(uid).instance_count == len(files)
        assert sorted(i.received_count for i in store.series_instances(uid)) == [1, 1, 1, 2, 2, 2]
    assert rx.stats["stored"] == len(series) * len(files) and rx.stats["duplicates"] == sent - len(series) * len(files)
    group = store._index_group
    assert group is not None and group.items == sent  # every index insert went through the grouping
