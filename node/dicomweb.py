"""DICOMweb STOW-RS: send a job's DICOM objects to an archive over HTTP, with the
``dicomweb-client`` library (it writes the multipart/related request).

All instances go in one request; a server that refuses the size (HTTP 413) or a configured
``max_request_mb`` splits them into smaller requests.  The server's answer is read per instance
(ReferencedSOPSequence / FailedSOPSequence with its FailureReason), also from an error response
(409 Conflict carries the same body).  A server that cannot be reached or does not answer raises
:class:`~node.scp.sender.DestinationUnavailable`; what it answered is in the :class:`StowResult`
(the dispatcher retries both with backoff).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset

from node.scp.sender import DestinationUnavailable

__all__ = ["StowInstance", "StowResult", "stow"]

log = logging.getLogger("node.dicomweb")

#: FailureReason codes (PS3.18 Table 10.6.3-3, the C-STORE statuses)
_REASONS = {
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
    0x0110: "processing failure",
    0x0122: "referenced SOP class not supported",
}


@dataclass
class StowInstance:
    """One instance of a STOW-RS request and what the server said about it."""

    sop_instance_uid: str
    path: str | None
    stored: bool | None = None  #: None: the server did not mention it
    failure_reason: int | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.failure_reason is not None:
            text = _REASONS.get(self.failure_reason, "")
            return f"{self.sop_instance_uid}: FailureReason 0x{self.failure_reason:04X}" + (f" ({text})" if text else "")
        return f"{self.sop_instance_uid}: {self.error or 'not in the server response'}"


@dataclass
class StowResult:
    """Per-instance outcome of one :func:`stow`: ``ok`` when every instance was stored."""

    url: str
    instances: list[StowInstance] = field(default_factory=list)
    requests: int = 0  #: HTTP requests made
    warnings: list[str] = field(default_factory=list)  #: WarningReason / Warning headers

    @property
    def ok(self) -> bool:
        return bool(self.instances) and all(i.stored for i in self.instances)

    @property
    def sent(self) -> list[StowInstance]:
        return [i for i in self.instances if i.stored]

    @property
    def failed(self) -> list[StowInstance]:
        return [i for i in self.instances if not i.stored]

    def summary(self, limit: int = 5) -> str:
        text = (f"{len(self.sent)}/{len(self.instances)} instance(s) stored at {self.url} "
                f"({self.requests} STOW-RS request(s))")
        if self.failed:
            shown = "; ".join(i.describe() for i in self.failed[:limit])
            more = f"; and {len(self.failed) - limit} more" if len(self.failed) > limit else ""
            text += f"; failed: {shown}{more}"
        return text


def _session(auth: Any, verify: bool | str) -> requests.Session:
    s = requests.Session()
    s.verify = verify
    if auth is not None:
        kind, value = auth
        if kind == "basic":
            s.auth = value
        elif kind == "bearer":
            s.headers["Authorization"] = f"Bearer {value}"
    return s


def _response_dataset(resp: requests.Response | None) -> Dataset | None:
    if resp is None or not resp.content:
        return None
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
    # some servers (Orthanc's plugin on a 409) send the DICOM JSON body without a Content-Type
    if ctype in ("application/dicom+json", "application/json") or (not ctype and resp.content.lstrip()[:1] == b"{"):
        try:
            return Dataset.from_json(resp.json())
        except (ValueError, TypeError, KeyError):
            return None
    return None


def _apply(result: StowResult, batch: list[StowInstance], ds: Dataset | None, status: int | None) -> None:
    by_uid = {i.sop_instance_uid: i for i in batch}
    if ds is not None:
        for item in ds.get("ReferencedSOPSequence", []):
            inst = by_uid.get(str(item.get("ReferencedSOPInstanceUID", "")))
            if inst is not None:
                inst.stored = True
                if item.get("WarningReason") is not None:
                    result.warnings.append(f"{inst.sop_instance_uid}: WarningReason 0x{int(item.WarningReason):04X}")
        for item in ds.get("FailedSOPSequence", []):
            inst = by_uid.get(str(item.get("ReferencedSOPInstanceUID", "")))
            if inst is not None:
                inst.stored = False
                reason = item.get("FailureReason")
                inst.failure_reason = int(reason) if reason is not None else None
    for inst in batch:
        if inst.stored is None:
            if status is not None and 200 <= status < 300 and ds is None:
                inst.stored = True  # a server that answers 200 without a body stored them all
            else:
                inst.stored = False
                inst.error = f"HTTP {status}, not in the server response" if status else "no response"


def _batches(items: list[tuple[StowInstance, bytes]], max_bytes: int | None) -> list[list[tuple[StowInstance, bytes]]]:
    if not max_bytes:
        return [items]
    out: list[list[tuple[StowInstance, bytes]]] = [[]]
    size = 0
    for it in items:
        if out[-1] and size + len(it[1]) > max_bytes:
            out.append([])
            size = 0
        out[-1].append(it)
        size += len(it[1])
    return out


def stow(
    files: Iterable[str | Path],
    url: str,
    *,
    auth: tuple[str, Any] | None = None,
    timeout_s: float = 120.0,
    verify: bool | str = True,
    max_request_bytes: int | None = None,
    study_instance_uid: str | None = None,
) -> StowResult:
    """Store DICOM files at a DICOMweb server with STOW-RS (``POST {url}/studies``).

    Args:
        files: DICOM files (Part 10), sent as they are (their transfer syntax is kept).
        url: the DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``.
        auth: ``("basic", (user, password))`` or ``("bearer", token)``; None: no authentication.
        timeout_s: per HTTP request.
        verify: TLS verification (False, or a CA bundle path).
        max_request_bytes: split the instances into requests of at most about this size.
        study_instance_uid: post to ``{url}/studies/{uid}`` (the server refuses instances of
            another study, one by one); default ``{url}/studies``.

    Raises:
        DestinationUnavailable: the server could not be reached, timed out, or answered with an
            error that names no instance (5xx, 401, 403, 404, ...).  Instances it refused one by one
            are in the result, not raised.
    """
    from dicomweb_client.api import DICOMwebClient

    items: list[tuple[StowInstance, bytes]] = []
    for f in files:
        data = Path(f).read_bytes()
        ds = pydicom.dcmread(Path(f), stop_before_pixels=True)
        items.append((StowInstance(str(ds.SOPInstanceUID), str(f)), data))
    result = StowResult(url)
    result.instances = [i for i, _ in items]
    if not items:
        return result
    client = DICOMwebClient(url, session=_session(auth, verify), timeout=timeout_s,
                            chunk_size=1 << 40)  # one body with Content-Length, not chunked transfer
    client.set_http_retry_params(retry=False)  # the dispatcher retries, durably, with its backoff

    def post(batch: list[tuple[StowInstance, bytes]]) -> None:
        # the client encodes pydicom datasets; the files are read whole, pixel data as stored
        datasets = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)) for _, data in batch]
        insts = [i for i, _ in batch]
        result.requests += 1
        try:
            ds = client.store_instances(datasets, study_instance_uid=study_instance_uid)
            _apply(result, insts, ds if len(ds) else None, 200)
        except requests.HTTPError as exc:
            resp = exc.response
            code = resp.status_code if resp is not None else None
            if code == 413 and len(batch) > 1:  # too large for the server: halves
                log.info("STOW-RS %s: request of %d instances too large (413), splitting", url, len(batch))
                half = len(batch) // 2
                post(batch[:half])
                post(batch[half:])
                return
            body = _response_dataset(resp)
            if body is not None and (body.get("FailedSOPSequence") or body.get("ReferencedSOPSequence")):
                _apply(result, insts, body, code)  # 409 Conflict / 400 with per-instance reasons
                return
            text = (resp.text[:300] if resp is not None and resp.text else "").strip()
            raise DestinationUnavailable(f"STOW-RS {url}: HTTP {code} {resp.reason if resp is not None else ''}"
                                         + (f": {text}" if text else "")) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DestinationUnavailable(f"STOW-RS {url}: {type(exc).__name__}: {exc}") from None

    for batch in _batches(items, max_request_bytes):
        post(batch)
    for inst in result.failed:
        log.warning("STOW-RS %s: %s", url, inst.describe())
    log.info("%s", result.summary())
    return result


def stow_auth(destination: Any) -> tuple[str, Any] | None:
    """The ``auth`` argument of :func:`stow` for a :class:`node.config.StowDestination`."""
    a = getattr(destination, "auth", None)
    if a is None:
        return None
    if a.basic is not None:
        return ("basic", (a.basic.username, a.basic.secret()))
    if a.bearer is not None:
        return ("bearer", a.bearer.secret())
    return None

