"""DICOM receiver: the C-ECHO and C-STORE SCP.

Checks each instance (refusals: 0xA900 missing UIDs, SOP UIDs differing from the command or an
image without pixel data; 0xC000 a data set that cannot be parsed; 0xA700 the spool cannot be
written), writes it byte for byte to the :class:`~node.spool.Spool` before answering success, and
indexes it in the :class:`~node.store.Store`; refused bytes go to the spool's quarantine.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
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

from node.config import NodeConfig
from node.disk import DiskWatch
from node.dataset_check import image_problem, structure_problem, uid_problem
from node.dicom_values import tags_from_dataset, uid_value
from node.logsafe import log_context
from node.metrics import BYTES_RECEIVED, INSTANCES_RECEIVED
from node.scp.guard import ConnectionLimits, GuardedServer
from node.scp.policy import AssociationPolicy
from node.scp.timing import SLOW_S, StoreTimes
from node.scp.tls import server_context
from node.spool import Spool, missing_uids
from node.store import InstanceRecord, Store

__all__ = [
    "Receiver",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "STATUS_SUCCESS",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
]

log = logging.getLogger("node.scp.receiver")

#: how often (seconds) the receiver logs its C-STORE times of the last window
TIMES_LOG_S = 60.0

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


def differing_elements(path: Path, ds: Any) -> list[str]:
    """The top-level elements (keywords, or tags) in which the stored file at ``path`` and ``ds``
    differ; ``[]`` when they hold the same data set."""
    try:
        old = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable first copy differs in everything
        return [f"(the stored copy cannot be read: {type(exc).__name__})"]
    out = []
    for tag in sorted(set(old.keys()) | set(ds.keys())):
        a, b = old.get(tag), ds.get(tag)
        if a is None or b is None or a.VR != b.VR or a.value != b.value:
            out.append(str(a.keyword if a is not None and a.keyword else b.keyword if b is not None and b.keyword
                           else tag))
    return out


class Receiver:
    """The node's Storage SCP.

    Args:
        config: a :class:`node.config.NodeConfig` (ae_title, bind_address,
            port, storage, allowed_calling_aes, max_associations, timeouts).
            ``port: 0`` picks a free port (see :attr:`port` after ``start``).
        store: the job store instances are indexed in.

    ``start()`` rescans the spool, then serves in background threads (one per
    association); ``stop()`` shuts the server down.  Also a context manager.
    A duplicate SOP Instance UID is stored once (the first copy is kept), counted
    (``instances.received_count``) and answered with success.
    """

    def __init__(self, config: NodeConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.spool = Spool(config.spool_dir, config.quarantine_dir)
        self.disk = DiskWatch(config.data_root, config.disk)  # where the spool is: shared_storage when set
        self.policy = AssociationPolicy(config.ae_title, config.allowed_calling_aes, config.max_associations,
                                        out_of_resources=self.disk.out_of_space)
        self._server: GuardedServer | None = None
        self._tls_server: GuardedServer | None = None
        self._servers: list[GuardedServer] = []
        self._stats_lock = threading.Lock()
        #: counters since start: stored, duplicates, refused, index_errors
        self.stats = {"stored": 0, "duplicates": 0, "conflicts": 0, "refused": 0, "index_errors": 0}
        #: C-STORE times by part (node/scp/timing.py), logged every ``TIMES_LOG_S`` while receiving
        self.times = StoreTimes()
        self._times_logged = time.monotonic()
        # per association: when its current message was complete, when its C-STORE answer was ready
        self._recv_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._answered: weakref.WeakKeyDictionary[Any, tuple[float, float]] = weakref.WeakKeyDictionary()

    # -- lifecycle -------------------------------------------------------
    def build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # Large PDUs: with pynetdicom's 16 KB default a 512x512 CT image arrives in ~32
        # P-DATA PDUs, each parsed in Python (figures: bench/README.md); but a bounded
        # size, which the guard enforces on what arrives.
        ae.maximum_pdu_size = self.config.limits.max_pdu_kib * 1024
        t = self.config.timeouts
        ae.acse_timeout = t.acse_s
        ae.dimse_timeout = t.dimse_s
        ae.network_timeout = t.network_s
        self.policy.apply(ae, backstop=self.config.max_associations + self.config.limits.max_pending_connections + 1)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # always set in pynetdicom's list (typed optional)
                ae.add_supported_context(cx.abstract_syntax, list(SUPPORTED_TRANSFER_SYNTAXES))
        return ae

    def start(self, *, rescan: bool = True) -> None:
        if self._servers:
            return
        self.spool.create()
        if rescan:
            self.spool.rescan(self.store, called_ae=self.config.ae_title)
        ae = self.build_ae()
        handlers = list(self.policy.handlers()) + [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_DIMSE_RECV, self._on_message),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
        ]
        tls = self.config.tls
        if tls is None or tls.plain_port:
            self._server = self._serve(ae, self.config.port, handlers, None)
            self._servers.append(self._server)
        if tls is not None:
            self._tls_server = self._serve(ae, tls.port, handlers, server_context(tls))
            self._servers.append(self._tls_server)
        log.info(
            "receiver %s listening on %s:%s%s (spool %s)", self.config.ae_title, self.config.bind_address,
            self.port if self._server is not None else "-",
            f", TLS on port {self.tls_port}" if self._tls_server is not None else "", self.spool.spool_dir,
        )

    def connection_limits(self) -> ConnectionLimits:
        lim, t = self.config.limits, self.config.timeouts
        return ConnectionLimits(
            acse_s=t.acse_s, network_s=t.network_s, max_request_pdu=lim.max_request_pdu_kib * 1024,
            max_data_pdu=lim.max_pdu_kib * 1024 + 6, max_pending=lim.max_pending_connections,
            max_per_peer=lim.max_connections_per_peer,
        )

    def _serve(self, ae: AE, port: int, handlers: list[Any], ssl_context: Any) -> GuardedServer:
        # AE.start_server(block=False) with the guarded server class (AE.make_server's documented
        # server_class parameter); started the way pynetdicom starts its own
        server = ae.make_server(
            (self.config.bind_address, port), evt_handlers=handlers, ssl_context=ssl_context,
            server_class=GuardedServer, limits=self.connection_limits(),
        )
        assert isinstance(server, GuardedServer)
        ae._servers.append(server)  # so that server.shutdown() (which removes it there) works
        threading.Thread(target=server.serve_forever, name=f"receiver:{port}", daemon=True).start()
        return server

    def stop(self) -> None:
        if self._servers:
            self.log_times()
        for server in self._servers:
            server.shutdown()
        self._servers = []
        self._server = self._tls_server = None

    def __enter__(self) -> "Receiver":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The plain port actually listened on (useful with ``port: 0``)."""
        if self._server is None:
            return int(self.config.port)
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The TLS port actually listened on (None: no TLS)."""
        if self._tls_server is None:
            return self.config.tls.port if self.config.tls is not None else None
        return int(self._tls_server.server_address[1])

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1
        INSTANCES_RECEIVED.labels(outcome=key).inc()

    def _refuse_for_resources(self, who: str, sop_uid: str, series_uid: str, study_uid: str, reason: str) -> int:
        """0xA700, and the instance recorded as refused: its series waits for it to be sent again."""
        self._count("refused")
        log.error("C-STORE refused (0x%04X, out of resources) %s: SOP instance %s: %s; series %s waits for it "
                  "to be sent again", STATUS_OUT_OF_RESOURCES, who, sop_uid, reason, series_uid)
        try:
            self.store.record_refusal(sop_uid, series_uid, study_uid, reason)
        except Exception:  # a full disk may refuse the database too: the log line above is what is left
            log.exception("C-STORE %s: cannot record the refusal of %s", who, sop_uid)
        return STATUS_OUT_OF_RESOURCES

    # -- handlers --------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_message(self, event: Any) -> None:
        # the network thread decoded a whole DIMSE message: the C-STORE's clock starts here
        self._recv_at[event.assoc] = time.monotonic()

    def _on_pdu_sent(self, event: Any) -> None:
        # the network thread wrote a PDU: the first one after a C-STORE's answer is that answer
        answered = self._answered.pop(event.assoc, None)
        if answered is None:
            return
        now = time.monotonic()
        began, ready = answered
        self.times.add(reply=now - ready, total=now - began)
        if now - began > SLOW_S:
            log.warning("slow C-STORE from %s: %.2f s from received to answered (the answer waited %.2f s to be "
                        "sent)", event.assoc.requestor.address, now - began, now - ready)
        if now - self._times_logged >= TIMES_LOG_S:
            self._times_logged = now
            log.info("receiver, last %.0f s: %s", TIMES_LOG_S, StoreTimes.summary(self.times.take_window()))

    def log_times(self) -> None:
        """Log the C-STORE times since start (at stop)."""
        log.info("receiver, since start: %s", StoreTimes.summary(self.times.since_start()))

    def _on_store(self, event: Any) -> int:
        entered = time.monotonic()
        began = self._recv_at.pop(event.assoc, entered)
        parts: dict[str, float] = {"queued": entered - began}
        # library log lines caused by this instance (pydicom's value warnings) name it
        with log_context(f"SOP instance {str(event.request.AffectedSOPInstanceUID or '')[:64]}"):
            try:
                status = self._store(event, parts)
            finally:
                BYTES_RECEIVED.inc(len(event.request.DataSet.getvalue()))
        ready = time.monotonic()
        self.times.add(**parts)
        self._answered[event.assoc] = (began, ready)
        if ready - began > SLOW_S:
            log.warning("slow C-STORE handler for SOP instance %s: %s", str(event.request.AffectedSOPInstanceUID)[:64],
                        ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        return status

    def _store(self, event: Any, parts: dict[str, float]) -> int:
        req = event.request
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title or "").strip()
        called = str(self.config.ae_title)
        peer = f"{assoc.requestor.address}"
        cmd_class = str(req.AffectedSOPClassUID or "").strip()
        cmd_inst = str(req.AffectedSOPInstanceUID or "").strip()
        ts = str(event.context.transfer_syntax)
        received_at = time.time()

        t_check = time.monotonic()
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
            qpath = self.spool.quarantine(data, reason, calling=calling, called=called, peer=peer, sop=cmd_inst,
                                          sop_class=cmd_class, ts=ts)
            log.warning("C-STORE refused (0x%04X) %s: SOP instance %r: %s; kept as %s", status, who, cmd_inst,
                        reason, qpath)
            return status

        # the encoding first: pydicom would read a truncated, over-long or differently encoded
        # data set leniently, and the file stored would be unreadable to stricter tools
        problem = structure_problem(raw, ts)
        if problem:
            return refuse(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set as {ts}: {problem}")
        # parse (fully: every element converted) -- a corrupt data set is refused
        try:
            ds = dcmread(BytesIO(data))
            for _ in ds.iterall():
                pass
        except Exception as exc:  # noqa: BLE001 - any parse error means "cannot understand"
            return refuse(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set ({ts}): {type(exc).__name__}: {exc}")

        missing = missing_uids(ds)
        if missing:
            return refuse(STATUS_DATASET_MISMATCH, f"missing or empty {', '.join(missing)}")
        for kw in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
            bad_uid = uid_problem(kw, uid_value(ds, kw))
            if bad_uid:
                return refuse(STATUS_DATASET_MISMATCH, bad_uid)
        sop_uid = uid_value(ds, "SOPInstanceUID")
        if sop_uid != cmd_inst:
            return refuse(
                STATUS_DATASET_MISMATCH,
                f"SOPInstanceUID in the data set ({sop_uid}) differs from the command's AffectedSOPInstanceUID "
                f"({cmd_inst})",
            )
        sop_class = uid_value(ds, "SOPClassUID")
        if sop_class != cmd_class:
            return refuse(
                STATUS_DATASET_MISMATCH,
                f"SOPClassUID in the data set ({sop_class}) differs from the command's AffectedSOPClassUID "
                f"({cmd_class})",
            )
        bad_image = image_problem(ds, sop_class, ts)
        if bad_image:
            return refuse(STATUS_DATASET_MISMATCH, bad_image)
        study_uid = uid_value(ds, "StudyInstanceUID")
        series_uid = uid_value(ds, "SeriesInstanceUID")

        path = self.spool.path_for(study_uid, series_uid, sop_uid)
        duplicate_file = path.exists()
        t_spool = time.monotonic()
        parts["check"] = t_spool - t_check
        replacing = False
        differs: list[str] = []
        if duplicate_file:
            differs = differing_elements(path, ds)
            if differs:
                policy = self.config.duplicates
                what = ", ".join(differs[:8]) + (f" and {len(differs) - 8} more" if len(differs) > 8 else "")
                log.warning("C-STORE %s: SOP instance %s re-sent with different content (%s differ%s); "
                            "policy %s: %s", who, sop_uid, what, "s" if len(differs) == 1 else "", policy,
                            {"keep_first": "kept the first copy", "keep_last": "replaced the first copy",
                             "quarantine": "kept the first copy, quarantined this one"}[policy])
                self._count("conflicts")
                replacing = policy == "keep_last"
                if not replacing:  # a replacement is counted with the new copy's index row below
                    try:
                        self.store.record_conflict(series_uid)
                    except Exception:  # counting must not turn the answer into a failure
                        log.exception("C-STORE %s: cannot count the conflict on series %s", who, series_uid)
                if policy == "quarantine":
                    self.spool.quarantine(data, f"re-sent SOP instance with different content ({what} differ); "
                                          "the first copy is kept", calling=calling, called=called, peer=peer,
                                          sop=cmd_inst, sop_class=cmd_class, ts=ts)
                    return STATUS_SUCCESS
        if not duplicate_file or replacing:
            full = self.disk.out_of_space()
            if full:
                return self._refuse_for_resources(who, sop_uid, series_uid, study_uid, full)
            try:
                self.spool.write(path, data)
            except OSError as exc:
                return self._refuse_for_resources(who, sop_uid, series_uid, study_uid, f"cannot write {path}: {exc}")

        # the file is durable: from here on the answer is success
        t_index = time.monotonic()
        parts["spool"] = t_index - t_spool
        outcome: str
        try:
            rec = InstanceRecord(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                series_uid=series_uid,
                study_uid=study_uid,
                path=str(path),
                transfer_syntax=ts,
                size=len(data),
                sha256=None if duplicate_file and not replacing else hashlib.sha256(data).hexdigest(),
                calling_ae=calling,
                called_ae=called,
                peer_address=peer,
                received_at=received_at,
                tags=tags_from_dataset(ds),
            )
            if replacing:
                self.store.record_conflict(series_uid, replacement=rec)
                outcome = "replaced"
            else:
                outcome = self.store.record_instance_grouped(rec)  # one transaction with concurrent C-STOREs
        except Exception:  # the rescan at next start indexes the file
            self._count("index_errors")
            log.exception("C-STORE %s: stored %s but could not index it (will be indexed on rescan)", who, path)
            outcome = "not indexed"
        parts["index"] = time.monotonic() - t_index
        if outcome == "duplicate":
            self._count("duplicates")
            if not differs:
                log.info("C-STORE %s: duplicate SOP instance %s (same content, kept once)", who, sop_uid)
        elif outcome == "new":
            self._count("stored")
            log.debug("C-STORE %s: stored %s", who, path)
        return STATUS_SUCCESS
