"""The spool (node/spool.py): layout, durable write, quarantine and its listing, rescan, retention."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from node.config import NodeConfig
from node.service import NodeService
from node.spool import REQUIRED_UIDS, Spool, missing_uids, read_quarantine, spool_path
from node.store import InstanceRecord, Store

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2"


def instance_bytes(sop: str, *, series: str = SERIES, calling: str = "CT01", **attrs: object) -> bytes:
    """A small Part 10 CT instance (no pixel data: headers are what the spool reads)."""
    from io import BytesIO

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.SeriesDescription = "Body 1.0"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = calling
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(tmp_path / "var" / "spool", tmp_path / "var" / "quarantine")
    sp.create()
    return sp


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "var" / "node.db")
    yield s
    s.close()


def test_layout_and_durable_write(spool: Spool):
    p = spool.path_for(f" {STUDY} ", SERIES, "1.2.3/../4\x00")
    assert p.parent == spool.spool_dir / STUDY / SERIES and p.name.startswith("1.2.3_.._4_~")
    assert p.name.endswith(".dcm") and "/" not in p.name[:-4]
    # a replaced character never makes two values share a name (issue 17 item 6)
    assert len({spool.path_for(STUDY, SERIES, u) for u in ("1.2.3/4", "1.2.3\\4", "1.2.3_4", "1.2.3 4")}) == 4
    assert spool.path_for(STUDY, SERIES, "1.2.3.4").name == "1.2.3.4.dcm"  # a DICOM UID is its own name
    odd = spool_path(spool.spool_dir, "", "..", ".")
    assert odd.parent.parent.parent == spool.spool_dir and odd.parent.name.startswith("_~")
    assert odd.name.startswith("_~") and odd.parent.parent.name.startswith("_~")
    spool.write(p, b"abc")
    assert p.read_bytes() == b"abc" and not list(p.parent.glob("*.tmp"))


def test_quarantine_reason_file_and_listing(spool: Spool):
    q = spool.quarantine(b"bytes as sent", "missing or empty SOPClassUID\nsecond line", calling="CT01",
                         called="DICOMNODE", peer="10.0.0.7", sop="1.2.3", sop_class="", ts="1.2.840.10008.1.2.1")
    assert q is not None and q.parent == spool.quarantine_dir and q.read_bytes() == b"bytes as sent"
    assert q.name.endswith("_1.2.3.dcm")
    lines = q.with_name(q.name[: -len(".dcm")] + ".reason.txt").read_text().splitlines()
    assert lines[:-1] == ["reason: missing or empty SOPClassUID second line", "calling: CT01", "called: DICOMNODE",
                          "peer: 10.0.0.7", "sop: 1.2.3", "sop_class: ", "ts: 1.2.840.10008.1.2.1"]
    assert lines[-1].startswith("received_at: ") and lines[-1].endswith("Z")
    (entry,) = spool.quarantined()
    assert entry == read_quarantine(spool.quarantine_dir)[0]
    assert (entry.path, entry.size, entry.calling, entry.called, entry.peer, entry.sop) == (
        q, len(b"bytes as sent"), "CT01", "DICOMNODE", "10.0.0.7", "1.2.3")
    assert entry.reason == "missing or empty SOPClassUID second line" and entry.info["ts"] == "1.2.840.10008.1.2.1"
    q.unlink()  # an operator removed the bytes: still listed, size unknown
    assert spool.quarantined()[0].size is None
    assert read_quarantine(spool.quarantine_dir.parent / "nothing-here") == []


def test_quarantine_on_a_refusing_disk_returns_none(tmp_path: Path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    sp = Spool(tmp_path / "spool", blocked)
    with caplog.at_level(logging.ERROR, logger="node.spool"):
        assert sp.quarantine(b"x", "why", sop="1.2") is None
    assert "cannot quarantine 1.2 (why)" in caplog.text


def test_missing_uids():
    ds = Dataset()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = ""
    assert missing_uids(ds) == list(REQUIRED_UIDS[1:])


def test_rescan_indexes_unknown_files_and_quarantines_unreadable_ones(spool: Spool, store: Store):
    known = spool.path_for(STUDY, SERIES, "1.1")
    spool.write(known, instance_bytes("1.1"))
    store.record_instance(InstanceRecord(sop_instance_uid="1.1", sop_class_uid=CTImageStorage, series_uid=SERIES,
                                         study_uid=STUDY, path=str(known), transfer_syntax=ExplicitVRLittleEndian,
                                         size=1, calling_ae="CT01"))
    lost = spool.path_for(STUDY, SERIES, "1.2")
    spool.write(lost, instance_bytes("1.2", calling="SCANNER", ImageType=["ORIGINAL", "PRIMARY"]))
    os.utime(lost, (1_700_000_000, 1_700_000_000))
    garbage = spool.path_for(STUDY, SERIES, "1.3")
    garbage.write_bytes(b"not DICOM at all")
    no_uids = spool.path_for(STUDY, SERIES, "1.4")
    no_uids.write_bytes(instance_bytes("1.4", SeriesInstanceUID=""))
    leftover = known.with_name(".1.5.dcm.tmp")
    leftover.write_bytes(b"partial")
    other = known.with_name("notes.txt")
    other.write_text("kept")

    assert spool.rescan(store, called_ae="DICOMNODE") == 1
    inst = store.get_instance("1.2")
    assert inst is not None and inst.path == str(lost) and inst.calling_ae == "SCANNER"
    assert inst.called_ae == "DICOMNODE" and inst.transfer_syntax == ExplicitVRLittleEndian
    assert inst.received_at == 1_700_000_000 and inst.size == lost.stat().st_size
    assert inst.tags["Modality"] == "CT" and inst.tags["ImageType"] == ["ORIGINAL", "PRIMARY"]
    assert (indexed := store.get_instance("1.1")) is not None and indexed.size == 1  # already indexed: left alone
    assert not garbage.exists() and not no_uids.exists() and not leftover.exists() and other.exists()
    reasons = sorted(e.reason for e in spool.quarantined())
    assert len(reasons) == 2 and all(r.startswith("spool rescan: cannot index ") for r in reasons)
    assert any("missing or empty SeriesInstanceUID" in r for r in reasons)
    assert {e.sop for e in spool.quarantined()} == {"1.3", "1.4"}
    assert spool.rescan(store, called_ae="DICOMNODE") == 0
    assert Spool(spool.spool_dir / "absent", spool.quarantine_dir).rescan(store, called_ae="X") == 0


def _index(spool: Spool, store: Store, series: str, sops: list[str]) -> list[Path]:
    paths = []
    for sop in sops:
        p = spool.path_for(STUDY, series, sop)
        spool.write(p, instance_bytes(sop, series=series))
        store.record_instance(InstanceRecord(sop_instance_uid=sop, sop_class_uid=CTImageStorage, series_uid=series,
                                             study_uid=STUDY, path=str(p), transfer_syntax=ExplicitVRLittleEndian,
                                             size=p.stat().st_size))
        paths.append(p)
    return paths


def test_retention_deletes_files_of_series_done_long_enough(spool: Spool, store: Store, tmp_path: Path, caplog):
    done = _index(spool, store, "2.1", ["2.1.1", "2.1.2"])
    unrouted = _index(spool, store, "2.2", ["2.2.1"])
    failed = _index(spool, store, "2.3", ["2.3.1"])
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(instance_bytes("2.4.1", series="2.4"))
    store.record_instance(InstanceRecord(sop_instance_uid="2.4.1", sop_class_uid=CTImageStorage, series_uid="2.4",
                                         study_uid=STUDY, path=str(outside), transfer_syntax=ExplicitVRLittleEndian,
                                         size=1))
    for uid, state in (("2.1", "done"), ("2.2", "unrouted"), ("2.3", "failed"), ("2.4", "done")):
        store.set_series_state(uid, state)
    later = time.time() + 2 * 86400

    assert spool.clean(store, 0, now=later) == 0  # 0: keep forever
    assert spool.clean(store, 3, now=later) == 0  # done 2 days ago: kept for now
    with caplog.at_level(logging.INFO, logger="node.spool"):
        assert spool.clean(store, 1, now=later) == 2
    assert "spool retention: deleted 2 file(s) of series done more than 1 day(s) ago" in caplog.text
    assert not any(p.exists() for p in done) and not done[0].parent.exists()  # empty series folder removed
    assert spool.path_for(STUDY, "x", "y").parent.parent.exists()  # the study folder still holds series
    assert all(p.exists() for p in unrouted + failed) and outside.exists()  # never outside the spool
    assert len(store.series_instances("2.1")) == 2  # rows stay (history)
    assert spool.clean(store, 1, now=later) == 0


def test_service_retention_uses_the_spool(tmp_path: Path):
    cfg = NodeConfig(storage=tmp_path / "var", spool_retention_days=0.5)
    svc = NodeService(cfg)
    svc.store = store = Store(cfg.database_path)
    try:
        sp = Spool(cfg.spool_dir, cfg.quarantine_dir)
        (p,) = _index(sp, store, "3.1", ["3.1.1"])
        store.set_series_state("3.1", "done")
        store.conn.execute("UPDATE series SET state_changed_at = ?", (time.time() - 86400,))
        svc.clean_spool()
        assert not p.exists()
    finally:
        store.close()


def test_cli_lists_the_quarantine(tmp_path: Path):
    sp = Spool(tmp_path / "var" / "spool", tmp_path / "var" / "quarantine")
    q = sp.quarantine(b"x" * 10, "cannot parse data set", calling="CT01", peer="10.0.0.7", sop="1.2.3")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    res = subprocess.run([sys.executable, "-m", "node.cli", "jobs", "quarantine", "--db",
                          str(tmp_path / "var" / "node.db")], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert "cannot parse data set" in res.stdout and "CT01" in res.stdout and f"file={q}" in res.stdout
    assert "sop=1.2.3" in res.stdout and f"1 quarantined instance(s) in {sp.quarantine_dir}" in res.stdout


def test_rescan_of_a_shared_spool_leaves_other_writers_temp_files(spool: Spool, store: Store):
    """Several hosts write into one spool: a temp file is removed only when its writer is gone."""
    import socket
    import subprocess
    import sys

    from node.durable import STALE_TMP_S, atomic_open

    folder = spool.path_for(STUDY, SERIES, "1.1").parent
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine_dead = folder / f".1.1.dcm.{host}-{int(dead.stdout)}.abc123.tmp"
    mine_live = folder / f".1.2.dcm.{host}-{os.getpid()}.abc123.tmp"
    other_fresh = folder / ".1.3.dcm.otherhost-4242.abc123.tmp"
    other_stale = folder / ".1.4.dcm.otherhost-4242.def456.tmp"
    for p in (mine_dead, mine_live, other_fresh, other_stale):
        p.write_bytes(b"partial")
    old = time.time() - STALE_TMP_S - 60
    os.utime(other_stale, (old, old))
    spool.rescan(store, called_ae="DICOMNODE")
    assert not mine_dead.exists() and not other_stale.exists()
    assert mine_live.exists() and other_fresh.exists()
    # and the temp files this node writes carry its host and pid
    with atomic_open(folder / "x.dcm") as fh:
        (tmp,) = folder.glob(".x.dcm.*.tmp")
        assert f".{host}-{os.getpid()}." in tmp.name
        fh.write(b"x")


def test_receiver_on_shared_storage_spools_there_and_watches_its_free_space(tmp_path: Path):
    """With ``shared_storage`` the spool (and the free-space reserve that guards it) is the shared folder."""
    import subprocess as sp

    from receiver_helpers import make_receiver

    rx, store = make_receiver(tmp_path, shared_storage=tmp_path / "shared", ae_title="DICOMNODE")
    try:
        assert rx.disk.path == tmp_path / "shared"
        data = Path(os.environ.get("NODE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
        files = sorted((data / "ct-abdomen-siemens-j2k" / "dicom").glob("*.dcm"))
        if not files:
            pytest.skip(f"test data not found at {data}")
        out = sp.run(["storescu", "-xv", "-aec", "DICOMNODE", "127.0.0.1", str(rx.port), str(files[0])],
                     capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        from pydicom import dcmread

        inst = store.get_instance(str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID))
        assert inst is not None and Path(inst.path).is_relative_to(tmp_path / "shared" / "spool")
        assert Path(inst.path).is_file() and not (tmp_path / "var" / "spool").exists()
    finally:
        rx.stop()
        store.close()
