"""C-STORE SCU (the SEG to a PACS) and C-ECHO.

Files are sent as their bytes are when the peer accepts their transfer syntax.  A peer that
cannot be reached, a rejected or aborted association or a lost connection raise
:class:`DestinationUnavailable`; what the peer answered is in the :class:`SendResult` (how
the dispatcher retries either: docs/architecture.md).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # sop_class makes its names at import

from node.errors import NodeError

__all__ = [
    "DestinationUnavailable",
    "InstanceStatus",
    "SendResult",
    "send_datasets",
    "echo",
    "keep_responses",
]

log = logging.getLogger("node.scp.sender")

# send files as their bytes are: pynetdicom then takes SOP class/instance and
# transfer syntax from the file meta and streams the data set without decoding
# or re-encoding it (its default decodes and re-encodes every file)
_pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNING_STATUSES = {0xB000, 0xB006, 0xB007}


class DestinationUnavailable(NodeError):
    """The destination could not be reached or refused the association: transient, retry later."""

    transient = True

    def __init__(self, message: str, result: "SendResult | None" = None) -> None:
        super().__init__(message)
        #: per-instance statuses gathered before the association was lost (None if it never opened)
        self.result = result


@dataclass
class InstanceStatus:
    sop_instance_uid: str
    path: str | None
    status: int | None  #: DIMSE status from the peer, None if not sent
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or self.status in _WARNING_STATUSES)


@dataclass
class SendResult:
    """Per-instance statuses of one send: ``ok`` when every instance got a success (0x0000) or
    warning (0xB000, 0xB006, 0xB007) status; a failure status from the peer is in ``failed``."""

    destination: tuple[str, str, int]
    instances: list[InstanceStatus] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.instances)

    @property
    def sent(self) -> list[InstanceStatus]:
        return [i for i in self.instances if i.ok]

    @property
    def failed(self) -> list[InstanceStatus]:
        return [i for i in self.instances if not i.ok]

    def summary(self) -> str:
        ae, host, port = self.destination
        text = f"{len(self.sent)}/{len(self.instances)} instance(s) stored at {ae}@{host}:{port}"
        if self.failed:
            f = self.failed[0]
            text += f"; first failure {f.sop_instance_uid}: " + (
                f"status 0x{f.status:04X}" if f.status is not None else str(f.error)
            )
        return text


def _dest_tuple(destination: Any) -> tuple[str, str, int]:
    if isinstance(destination, (tuple, list)):
        ae, host, port = destination
    else:
        ae, host, port = destination.ae_title, destination.host, destination.port
    return str(ae), str(host), int(port)


def _timeouts(ae: AE, timeouts: Any) -> None:
    if timeouts is None:
        return
    if isinstance(timeouts, (int, float)):
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = float(timeouts)
        return
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.connection_timeout = getattr(timeouts, "connect_s", None)


@dataclass
class _Item:
    source: str | Path | Dataset
    path: str | None
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def _describe(item: str | Path | Dataset) -> _Item:
    if isinstance(item, Dataset):
        meta = getattr(item, "file_meta", None)
        ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ""
        return _Item(item, None, str(item.SOPClassUID), str(item.SOPInstanceUID), ts or ExplicitVRLittleEndian)
    path = Path(item)
    ds = dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    sop_inst = str(meta.get("MediaStorageSOPInstanceUID", "") or ds.get("SOPInstanceUID", ""))
    return _Item(path, str(path), sop_class, sop_inst, str(meta.TransferSyntaxUID))


def keep_responses(assoc: Any) -> Any:
    """Let only a waiting ``send_*`` call take the peer's answers off ``assoc``'s DIMSE queue.

    pynetdicom's requestor runs a reactor thread that polls the same queue (for requests the peer
    might send) and each ``send_*`` call pauses it with a check that races: on a busy machine the
    reactor can take the C-STORE response itself, log "Received unexpected C-STORE service message"
    and drop it; the ``send_*`` call then waits out its DIMSE timeout and aborts (pynetdicom issue
    875; in bench/soak.py it ended a few associations per run, the node logging "Network timeout
    reached" 10 s after its answer).  An association we open serves no requests, so the reactor's
    non-blocking reads get nothing.  Returns ``assoc``.
    """
    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        return blocking_get(block=True) if block else (None, None)

    dimse.get_msg = get_msg
    return assoc


def _associate(ae: AE, dest: tuple[str, str, int], calling_ae: str, tls: ssl.SSLContext | None = None,
               server_name: str | None = None) -> Any:
    ae_title, host, port = dest
    try:
        tls_args = (tls, server_name or host) if tls is not None else None
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    except OSError as exc:  # pragma: no cover - pynetdicom normally reports this as not established
        raise DestinationUnavailable(f"{ae_title}@{host}:{port}: cannot connect: {exc}") from None
    if assoc.is_established:
        return keep_responses(assoc)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        codes = (
            f" (result 0x{rj.result:02X}, source 0x{rj.result_source:02X}, reason 0x{rj.diagnostic:02X})"
            if rj is not None and rj.result is not None
            else ""
        )
        raise DestinationUnavailable(f"{ae_title}@{host}:{port}: association rejected{codes} (calling AE {calling_ae})")
    # pynetdicom reports a refused TCP connection as an abort too
    raise DestinationUnavailable(
        f"{ae_title}@{host}:{port}: cannot connect or association aborted (peer down or not listening?)"
    )


def send_datasets(
    items: Iterable[str | Path | Dataset],
    destination: Any,
    *,
    calling_ae: str = "DICOMNODE",
    timeouts: Any = None,
    tls: ssl.SSLContext | None = None,
) -> SendResult:
    """Send instances with C-STORE in one association.

    For every SOP class being sent it proposes the instance's own transfer syntax and the
    uncompressed syntaxes as a fallback: a file is sent as its bytes are (no re-encoding) when
    the peer accepts its syntax, else decompressed and sent uncompressed.

    Args:
        items: file paths (sent as their bytes) and/or pydicom Datasets.
        destination: ``(ae_title, host, port)`` or an object with those
            attributes (:class:`node.config.Destination`).
        calling_ae: our AE title.
        timeouts: a :class:`node.config.NetworkTimeouts`, a number of seconds
            for all of them, or None for pynetdicom's defaults.
        tls: an SSL context (:func:`node.scp.tls.client_context`) to send over TLS; the
            certificate must name ``destination.server_name`` or its host.

    Returns:
        :class:`SendResult` with one :class:`InstanceStatus` per item.

    Raises:
        DestinationUnavailable: peer down, association rejected/aborted, or
            the association was lost before every instance was answered.
    """
    dest = _dest_tuple(destination)
    described = [_describe(i) for i in items]
    result = SendResult(dest)
    if not described:
        return result

    ae = AE(ae_title=calling_ae)
    _timeouts(ae, timeouts)
    # one context per (SOP class, own syntax) + one uncompressed fallback per SOP class
    wanted: dict[str, list[str]] = {}
    for it in described:
        syntaxes = wanted.setdefault(it.sop_class, [])
        if it.transfer_syntax not in syntaxes and it.transfer_syntax not in _UNCOMPRESSED:
            syntaxes.append(it.transfer_syntax)
    n = sum(len(v) + 1 for v in wanted.values())
    if n > 128:
        raise NodeError(f"too many SOP class / transfer syntax combinations in one send ({n} > 128)")
    for sop_class, syntaxes in wanted.items():
        for ts in syntaxes:
            ae.add_requested_context(sop_class, [ts])
        ae.add_requested_context(sop_class, list(_UNCOMPRESSED))

    assoc = _associate(ae, dest, calling_ae, tls, getattr(destination, "server_name", None))
    try:
        for it in described:
            if not assoc.is_established:
                result.instances.append(InstanceStatus(it.sop_instance, it.path, None, "association lost"))
                continue
            accepted = {
                str(cx.transfer_syntax[0])
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == it.sop_class
            }
            payload: str | Path | Dataset = it.source
            if it.transfer_syntax not in accepted:
                if not accepted:
                    result.instances.append(
                        InstanceStatus(it.sop_instance, it.path, None, f"peer accepts no context for {it.sop_class}")
                    )
                    continue
                # peer only takes uncompressed: decode and send that
                ds = dcmread(payload) if not isinstance(payload, Dataset) else payload
                if UID(it.transfer_syntax).is_compressed:
                    ds.decompress()
                payload = ds
            try:
                status = assoc.send_c_store(payload)
            except Exception as exc:  # noqa: BLE001 - a bad instance must not stop the others
                result.instances.append(InstanceStatus(it.sop_instance, it.path, None, f"{type(exc).__name__}: {exc}"))
                continue
            code = int(status.Status) if status and "Status" in status else None
            err = None if code is not None else "no response (timeout or association lost)"
            result.instances.append(InstanceStatus(it.sop_instance, it.path, code, err))
    finally:
        if assoc.is_established:
            assoc.release()
    lost = [i for i in result.instances if i.status is None and i.error and "association" in i.error.lower()]
    no_answer = [i for i in result.instances if i.status is None and i.error and i.error.startswith("no response")]
    if lost or no_answer:
        ae_title, host, port = dest
        raise DestinationUnavailable(
            f"{ae_title}@{host}:{port}: association lost after {len(result.sent)}/{len(result.instances)} instance(s)",
            result,
        )
    log.info("%s", result.summary())
    return result


def echo(destination: Any, *, calling_ae: str = "DICOMNODE", timeouts: Any = None,
         tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO ``destination``; returns the status (0x0000 = OK).  Raises :class:`DestinationUnavailable`."""
    dest = _dest_tuple(destination)
    ae = AE(ae_title=calling_ae)
    _timeouts(ae, timeouts)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, dest, calling_ae, tls, getattr(destination, "server_name", None))
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise DestinationUnavailable(f"{dest[0]}@{dest[1]}:{dest[2]}: no answer to C-ECHO")
    return int(status.Status)
