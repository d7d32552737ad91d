"""DICOM receiver: C-ECHO and C-STORE SCP writing a durable spool.

Every instance is written byte-for-byte as received (preamble + file meta +
the data set exactly as it came off the wire, no re-encoding) to::

    <storage>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

through a temporary file, ``fsync``, ``rename`` and ``fsync`` of the folder,
*before* success (0x0000) is returned, and is then indexed in the
:class:`~node.store.Store`.  If indexing fails the file is still in the spool,
and :meth:`Receiver.rescan_spool` (run by :meth:`Receiver.start`) indexes every
spool file the database does not know.

Refusals (nothing received is silently dropped: the bytes go to
``<storage>/quarantine/<stamp>_<id>.dcm`` with a ``.reason.txt`` next to them):

=======  =================================================================
status   when
=======  =================================================================
0xA900   "data set does not match SOP class": StudyInstanceUID,
         SeriesInstanceUID, SOPInstanceUID or SOPClassUID missing or
         empty; SOP Instance/Class UID in the data set differing from the
         command's Affected SOP Instance/Class UID; an image without pixel
         data (a data set cut short by corruption)
0xC000   "cannot understand": the data set cannot be parsed
0xA700   "out of resources": the spool could not be written (not quarantined:
         the disk is the problem; the sender will retry)
=======  =================================================================

A duplicate SOP Instance UID is stored once (the first copy is kept), counted
(``instances.received_count``) and answered with success.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # sop_class makes its names at import

from node.durable import atomic_write
from node.scp.policy import AssociationPolicy
from node.store import InstanceRecord, Store, tags_from_dataset

__all__ = [
    "Receiver",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "STATUS_SUCCESS",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "spool_path",
    "QuarantineEntry",
    "read_quarantine",
]

log = logging.getLogger("node.scp.receiver")

STATUS_SUCCESS = 0x0000
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_OUT_OF_RESOURCES = 0xA700

#: JPEG Lossless, Non-Hierarchical (Process 14) -- not a pydicom constant name in every version
_JPEG_LOSSLESS_P14 = "1.2.840.10008.1.2.4.57"

#: accepted for every storage SOP class (uncompressed first: preferred when a peer offers several)
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # .4.50
    JPEGExtended12Bit,  # .4.51
    _JPEG_LOSSLESS_P14,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEGLSNearLossless,  # .4.81
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    RLELossless,  # .5
)

_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def _safe_name(uid: str) -> str:
    """A UID made safe as a path component (UIDs are digits and dots; anything else becomes '_')."""
    name = _SAFE.sub("_", uid.strip())[:128]
    return name if name not in ("", ".", "..") else "_"


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives in the spool."""
    return spool_dir / _safe_name(study_uid) / _safe_name(series_uid) / f"{_safe_name(sop_uid)}.dcm"


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp + fsync + rename + fsync dir)."""
    atomic_write(path, data)


def _str_uid(ds: Any, keyword: str) -> str:
    try:
        v = ds.get(keyword)
    except Exception:  # noqa: BLE001
        return ""
    return str(v).strip().rstrip("\x00") if v is not None else ""


class Receiver:
    """The node's Storage SCP.

    Args:
        config: a :class:`node.config.NodeConfig` (ae_title, bind_address,
            port, storage, allowed_calling_aes, max_associations, timeouts).
            ``port: 0`` picks a free port (see :attr:`port` after ``start``).
        store: the job store instances are indexed in.

    ``start()`` rescans the spool, then serves in background threads (one per
    association); ``stop()`` shuts the server down.  Also a context manager.
    """

    def __init__(self, config: Any, store: Store) -> None:
        self.config = config
        self.store = store
        self.spool_dir = Path(config.spool_dir)
        self.quarantine_dir = Path(config.quarantine_dir)
        self.policy = AssociationPolicy(config.ae_title, config.allowed_calling_aes, config.max_associations)
        self._server: Any = None
        self._stats_lock = threading.Lock()
        #: counters since start: stored, duplicates, refused, index_errors
        self.stats = {"stored": 0, "duplicates": 0, "refused": 0, "index_errors": 0}

    # -- lifecycle -------------------------------------------------------
    def build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # Accept PDUs of any size: with pynetdicom's 16 KB default a 512x512 CT image
        # arrives in ~32 P-DATA PDUs, each parsed in Python; measured here with storescu
        # over loopback, 300 instances: ~40-53 MB/s -> ~56-59 MB/s.
        ae.maximum_pdu_size = 0
        t = self.config.timeouts
        ae.acse_timeout = t.acse_s
        ae.dimse_timeout = t.dimse_s
        ae.network_timeout = t.network_s
        self.policy.apply(ae)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # always set in this list of pynetdicom's
                ae.add_supported_context(cx.abstract_syntax, list(SUPPORTED_TRANSFER_SYNTAXES))
        return ae

    def start(self, *, rescan: bool = True) -> None:
        if self._server is not None:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        if rescan:
            self.rescan_spool()
        ae = self.build_ae()
        handlers = list(self.policy.handlers()) + [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.start_server(
            (self.config.bind_address, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "receiver %s listening on %s:%s (spool %s)", self.config.ae_title, self.config.bind_address, self.port,
            self.spool_dir,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "Receiver":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with ``port: 0``)."""
        if self._server is None:
            return int(self.config.port)
        return int(self._server.server_address[1])

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # -- handlers --------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        req = event.request
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title or "").strip()
        called = str(self.config.ae_title)
        peer = f"{assoc.requestor.address}"
        cmd_class = str(req.AffectedSOPClassUID or "").strip()
        cmd_inst = str(req.AffectedSOPInstanceUID or "").strip()
        ts = str(event.context.transfer_syntax)
        received_at = time.time()

        raw = req.DataSet.getvalue()
        meta = event.file_meta
        meta.SourceApplicationEntityTitle = calling or "UNKNOWN"
        buf = DicomBytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)
        data = buf.getvalue() + raw
        who = f"from {calling!r} at {peer}:{assoc.requestor.port}"

        def refuse(status: int, reason: str) -> int:
            self._count("refused")
            qpath = self._quarantine(data, reason, calling=calling, called=called, peer=peer, sop=cmd_inst,
                                     sop_class=cmd_class, ts=ts)
            log.warning("C-STORE refused (0x%04X) %s: SOP instance %r: %s; kept as %s", status, who, cmd_inst,
                        reason, qpath)
            return status

        # parse (fully: every element converted) -- a corrupt data set is refused
        try:
            ds = dcmread(BytesIO(data))
            for _ in ds.iterall():
                pass
        except Exception as exc:  # noqa: BLE001 - any parse error means "cannot understand"
            return refuse(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set ({ts}): {type(exc).__name__}: {exc}")

        missing = [kw for kw in _REQUIRED_UIDS if not _str_uid(ds, kw)]
        if missing:
            return refuse(STATUS_DATASET_MISMATCH, f"missing or empty {', '.join(missing)}")
        if "Rows" in ds and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            return refuse(STATUS_DATASET_MISMATCH, "image (Rows present) without pixel data: truncated or corrupt")
        sop_uid = _str_uid(ds, "SOPInstanceUID")
        if sop_uid != cmd_inst:
            return refuse(
                STATUS_DATASET_MISMATCH,
                f"SOPInstanceUID in the data set ({sop_uid}) differs from the command's AffectedSOPInstanceUID "
                f"({cmd_inst})",
            )
        sop_class = _str_uid(ds, "SOPClassUID")
        if sop_class != cmd_class:
            return refuse(
                STATUS_DATASET_MISMATCH,
                f"SOPClassUID in the data set ({sop_class}) differs from the command's AffectedSOPClassUID "
                f"({cmd_class})",
            )
        study_uid = _str_uid(ds, "StudyInstanceUID")
        series_uid = _str_uid(ds, "SeriesInstanceUID")

        path = spool_path(self.spool_dir, study_uid, series_uid, sop_uid)
        duplicate_file = path.exists()
        if not duplicate_file:
            try:
                durable_write(path, data)
            except OSError as exc:
                log.error("C-STORE %s: cannot write %s: %s", who, path, exc)
                return STATUS_OUT_OF_RESOURCES

        # the file is durable: from here on the answer is success
        try:
            rec = InstanceRecord(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                series_uid=series_uid,
                study_uid=study_uid,
                path=str(path),
                transfer_syntax=ts,
                size=len(data),
                sha256=None if duplicate_file else hashlib.sha256(data).hexdigest(),
                calling_ae=calling,
                called_ae=called,
                peer_address=peer,
                received_at=received_at,
                tags=tags_from_dataset(ds),
            )
            outcome = self.store.record_instance(rec)
        except Exception:  # the rescan at next start indexes the file
            self._count("index_errors")
            log.exception("C-STORE %s: stored %s but could not index it (will be indexed on rescan)", who, path)
            return STATUS_SUCCESS
        if outcome == "duplicate":
            self._count("duplicates")
            log.info("C-STORE %s: duplicate SOP instance %s (kept the first copy)", who, sop_uid)
        else:
            self._count("stored")
            log.debug("C-STORE %s: stored %s", who, path)
        return STATUS_SUCCESS

    # -- quarantine / rescan ---------------------------------------------
    def _quarantine(self, data: bytes, reason: str, **info: Any) -> Path | None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        sop = info.get("sop") or ""
        stem = f"{stamp}_{uuid.uuid4().hex[:8]}" + (f"_{_safe_name(sop)}" if sop else "")
        path = self.quarantine_dir / f"{stem}.dcm"
        # one "key: value" per line (read back by read_quarantine): no line breaks inside values
        lines = [f"reason: {_one_line(reason)}"] + [f"{k}: {_one_line(str(v))}" for k, v in info.items()]
        lines.append(f"received_at: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        try:
            durable_write(path, data)
            durable_write(path.with_name(f"{stem}.reason.txt"), ("\n".join(lines) + "\n").encode("utf-8"))
        except OSError as exc:
            log.error("cannot quarantine %s (%s): %s", sop, reason, exc)
            return None
        return path

    def rescan_spool(self) -> int:
        """Index spool files the store does not know (e.g. after a crash between write and index).

        Leftover ``*.tmp`` files (writes that never completed, so never
        acknowledged) are removed; unreadable files are moved to quarantine.
        The receive time of a rescued file is its modification time.
        Returns how many files were indexed.
        """
        if not self.spool_dir.exists():
            return 0
        known = self.store.indexed_paths()
        indexed = 0
        for p in sorted(self.spool_dir.rglob("*")):
            if not p.is_file():
                continue
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            if p.suffix != ".dcm" or str(p) in known:
                continue
            try:
                ds = dcmread(p, stop_before_pixels=True)
                meta = ds.file_meta
                missing = [kw for kw in _REQUIRED_UIDS if not _str_uid(ds, kw)]
                if missing:
                    raise ValueError(f"missing or empty {', '.join(missing)}")
                rec = InstanceRecord(
                    sop_instance_uid=_str_uid(ds, "SOPInstanceUID"),
                    sop_class_uid=_str_uid(ds, "SOPClassUID"),
                    series_uid=_str_uid(ds, "SeriesInstanceUID"),
                    study_uid=_str_uid(ds, "StudyInstanceUID"),
                    path=str(p),
                    transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
                    size=p.stat().st_size,
                    calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or None,
                    called_ae=self.config.ae_title,
                    received_at=p.stat().st_mtime,
                    tags=tags_from_dataset(ds),
                )
            except Exception as exc:  # noqa: BLE001
                reason = f"spool rescan: cannot index {p}: {type(exc).__name__}: {exc}"
                q = self._quarantine(p.read_bytes(), reason, sop=p.stem)
                if q is not None:
                    p.unlink(missing_ok=True)
                log.warning("%s; moved to %s", reason, q)
                continue
            self.store.record_instance(rec)
            indexed += 1
        if indexed:
            log.info("spool rescan indexed %d instance(s) missing from the store", indexed)
        return indexed


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).replace("\r", " ")


@dataclass(frozen=True)
class QuarantineEntry:
    """One refused instance kept in the quarantine folder (see :meth:`Receiver._quarantine`)."""

    path: Path
    """The bytes as received (``.dcm``); may be missing if an operator removed it."""
    size: int | None
    received_at: str
    reason: str
    calling: str | None
    called: str | None
    peer: str | None
    sop: str | None
    info: dict[str, str]
    """Every field of the ``.reason.txt`` file."""


def read_quarantine(quarantine_dir: str | Path) -> list[QuarantineEntry]:
    """The refused instances in ``quarantine_dir``, oldest first (from their ``.reason.txt`` files).

    Unreadable or foreign files are listed with what could be read; the folder's
    absence means nothing was ever refused.
    """
    folder = Path(quarantine_dir)
    if not folder.is_dir():
        return []
    out = []
    for reason_file in sorted(folder.glob("*.reason.txt")):
        info: dict[str, str] = {}
        try:
            for line in reason_file.read_text(encoding="utf-8", errors="replace").splitlines():
                key, sep, value = line.partition(": ")
                if sep:
                    info[key.strip()] = value.strip()
        except OSError as exc:
            info["reason"] = f"(cannot read {reason_file.name}: {exc})"
        data = reason_file.with_name(reason_file.name[: -len(".reason.txt")] + ".dcm")
        out.append(QuarantineEntry(
            path=data,
            size=data.stat().st_size if data.is_file() else None,
            received_at=info.get("received_at", "-"),
            reason=info.get("reason", "(no reason recorded)"),
            calling=info.get("calling") or None,
            called=info.get("called") or None,
            peer=info.get("peer") or None,
            sop=info.get("sop") or None,
            info=info,
        ))
    out.sort(key=lambda e: (e.received_at, e.path.name))
    return out
