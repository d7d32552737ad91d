"""The spool: received instances on disk, and the quarantine of refused ones.

Owns the layout (``<spool>/<study>/<series>/<sop>.dcm``; ``<quarantine>/<stamp>_<id>[_<sop>].dcm``
with a ``.reason.txt`` next to each), the durable write of an instance, the rescan that indexes
files the store does not know, retention of processed series, and the quarantine: listing, releasing
an instance into the spool (checked again as if received) and deleting one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.contracts import SeriesState
from node.dataset_check import image_problem, part10_problem, uid_problem
from node.dicom_values import tags_from_dataset, uid_value
from node.durable import atomic_write, makedirs_durable, tmp_writer_gone
from node.store import InstanceRecord, Store

__all__ = [
    "REQUIRED_UIDS",
    "QuarantineEntry",
    "Spool",
    "missing_uids",
    "read_quarantine",
    "spool_path",
    "instance_problem",
]

log = logging.getLogger("node.spool")

#: the UIDs an instance needs to have a place in the spool (and an index row)
REQUIRED_UIDS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def _safe_name(uid: str) -> str:
    """A UID made safe as a path component: a DICOM UID (digits and dots) as it is; anything else
    with its unsafe characters replaced by '_', cut to 128, and a hash of the original appended,
    so that two different values never share a name."""
    v = uid.strip()
    name = _SAFE.sub("_", v)[:128]
    if name == v and name not in ("", ".", ".."):
        return name
    if name in ("", ".", ".."):
        name = "_"
    return f"{name}~{hashlib.sha256(uid.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives in the spool."""
    return spool_dir / _safe_name(study_uid) / _safe_name(series_uid) / f"{_safe_name(sop_uid)}.dcm"


def missing_uids(ds: Any) -> list[str]:
    """The :data:`REQUIRED_UIDS` that ``ds`` lacks or has empty."""
    return [kw for kw in REQUIRED_UIDS if not uid_value(ds, kw)]


def instance_problem(data: bytes) -> tuple[Any, str | None]:
    """The receiver's checks on a Part 10 file's bytes (encoding under its transfer syntax, a full
    parse, the UIDs, an image's pixel module): ``(dataset, None)`` or ``(None, what is wrong)``."""
    problem = part10_problem(data)
    if problem:
        return None, problem
    try:
        from io import BytesIO

        ds = dcmread(BytesIO(data))
        for _ in ds.iterall():
            pass
    except Exception as exc:  # noqa: BLE001 - any parse error: the file is not usable
        return None, f"cannot parse data set: {type(exc).__name__}: {exc}"
    missing = missing_uids(ds)
    if missing:
        return None, f"missing or empty {', '.join(missing)}"
    for kw in REQUIRED_UIDS:
        bad = uid_problem(kw, uid_value(ds, kw))
        if bad:
            return None, bad
    bad_image = image_problem(ds, uid_value(ds, "SOPClassUID"), str(ds.file_meta.get("TransferSyntaxUID", "")))
    return (None, bad_image) if bad_image else (ds, None)


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).replace("\r", " ")


class Spool:
    """The spool folder and the quarantine folder (``config.spool_dir``, ``config.quarantine_dir``)."""

    def __init__(self, spool_dir: str | Path, quarantine_dir: str | Path) -> None:
        self.spool_dir = Path(spool_dir)
        self.quarantine_dir = Path(quarantine_dir)

    def create(self) -> None:
        """Create both folders (if missing)."""
        makedirs_durable(self.spool_dir)
        makedirs_durable(self.quarantine_dir)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives in the spool."""
        return spool_path(self.spool_dir, study_uid, series_uid, sop_uid)

    def write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably (tmp + fsync + rename + fsync dir);
        raises ``OSError`` when the disk refuses."""
        atomic_write(path, data)

    # -- quarantine ------------------------------------------------------
    def quarantine(self, data: bytes, reason: str, **info: Any) -> Path | None:
        """Keep refused bytes with a ``.reason.txt`` (``reason``, then ``key: value`` per ``info``,
        then ``received_at``); returns the ``.dcm`` path, or ``None`` when the disk refused (logged)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        sop = info.get("sop") or ""
        stem = f"{stamp}_{uuid.uuid4().hex[:8]}" + (f"_{_safe_name(sop)}" if sop else "")
        path = self.quarantine_dir / f"{stem}.dcm"
        # one "key: value" per line (read back by read_quarantine): no line breaks inside values
        lines = [f"reason: {_one_line(reason)}"] + [f"{k}: {_one_line(str(v))}" for k, v in info.items()]
        lines.append(f"received_at: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        try:
            self.write(path, data)
            self.write(path.with_name(f"{stem}.reason.txt"), ("\n".join(lines) + "\n").encode("utf-8"))
        except OSError as exc:
            log.error("cannot quarantine %s (%s): %s", sop, reason, exc)
            return None
        return path

    def quarantined(self) -> list[QuarantineEntry]:
        """The refused instances, oldest first (see :func:`read_quarantine`)."""
        return read_quarantine(self.quarantine_dir)

    def quarantined_entry(self, name: str) -> QuarantineEntry:
        """The quarantine entry whose file is ``name`` (``<stem>.dcm``, as listed); KeyError when the
        name is not one of them (never a path: nothing outside the quarantine folder is reached)."""
        for e in self.quarantined():
            if e.path.name == name:
                return e
        raise KeyError(name)

    def delete_quarantined(self, name: str) -> QuarantineEntry:
        """Delete a quarantined instance and its ``.reason.txt``; returns what it was."""
        e = self.quarantined_entry(name)
        e.path.unlink(missing_ok=True)
        e.path.with_name(e.path.name[: -len(".dcm")] + ".reason.txt").unlink(missing_ok=True)
        return e

    def release(self, name: str, store: Store, *, called_ae: str) -> tuple[QuarantineEntry, str | None, str | None]:
        """Put a quarantined instance back into the spool as if it had just been received: the
        receiver's checks again (:func:`instance_problem`), the durable write, the index row.  An
        instance whose SOP Instance UID the spool holds with other bytes stays (keep-first).

        Returns ``(entry, problem, outcome)``: ``problem`` (it stays in the quarantine) or
        ``outcome`` (``new`` | ``duplicate``: :meth:`Store.record_instance`).
        """
        e = self.quarantined_entry(name)
        if not e.path.is_file():
            return e, "the file is gone from the quarantine folder", None
        data = e.path.read_bytes()
        ds, problem = instance_problem(data)
        if problem is not None or ds is None:
            return e, problem, None
        study, series, sop = (uid_value(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        path = self.path_for(study, series, sop)
        if path.exists() and path.read_bytes() != data:
            return e, f"the spool holds SOP instance {sop} with other content (the first copy is kept)", None
        if not path.exists():
            makedirs_durable(path.parent)
            self.write(path, data)
        rec = InstanceRecord(
            sop_instance_uid=sop, sop_class_uid=uid_value(ds, "SOPClassUID"), series_uid=series, study_uid=study,
            path=str(path), transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")), size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            calling_ae=e.calling or str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip() or None,
            called_ae=called_ae, peer_address=e.peer, tags=tags_from_dataset(ds),
        )
        outcome = store.record_instance(rec)
        e.path.unlink(missing_ok=True)
        e.path.with_name(e.path.name[: -len(".dcm")] + ".reason.txt").unlink(missing_ok=True)
        log.info("quarantined instance %s released into the spool (%s)", e.path.name, outcome)
        return e, None, outcome

    # -- rescan ----------------------------------------------------------
    def rescan(self, store: Store, *, called_ae: str) -> int:
        """Index spool files the store does not know (e.g. after a crash between write and index).

        Leftover ``*.tmp`` files (writes that never completed, so never
        acknowledged) are removed (on a spool several hosts share, only those whose writer is
        gone: :func:`node.durable.tmp_writer_gone`); unreadable files are moved to quarantine.
        The receive time of a rescued file is its modification time, ``called_ae``
        the AE title it is recorded as sent to.  Returns how many files were indexed.
        """
        if not self.spool_dir.exists():
            return 0
        known = store.indexed_paths()
        indexed = 0
        for p in sorted(self.spool_dir.rglob("*")):
            if not p.is_file():
                continue
            if p.name.endswith(".tmp"):
                # only a write that can no longer complete (another host's may be in flight)
                if tmp_writer_gone(p):
                    p.unlink(missing_ok=True)
                continue
            if p.suffix != ".dcm" or str(p) in known:
                continue
            try:
                problem = part10_problem(p.read_bytes())
                if problem:
                    raise ValueError(problem)
                ds = dcmread(p, stop_before_pixels=True)
                meta = ds.file_meta
                missing = missing_uids(ds)
                if missing:
                    raise ValueError(f"missing or empty {', '.join(missing)}")
                rec = InstanceRecord(
                    sop_instance_uid=uid_value(ds, "SOPInstanceUID"),
                    sop_class_uid=uid_value(ds, "SOPClassUID"),
                    series_uid=uid_value(ds, "SeriesInstanceUID"),
                    study_uid=uid_value(ds, "StudyInstanceUID"),
                    path=str(p),
                    transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
                    size=p.stat().st_size,
                    calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or None,
                    called_ae=called_ae,
                    received_at=p.stat().st_mtime,
                    tags=tags_from_dataset(ds),
                )
            except Exception as exc:  # noqa: BLE001 - whatever makes a file unindexable: quarantine it
                reason = f"spool rescan: cannot index {p}: {type(exc).__name__}: {exc}"
                q = self.quarantine(p.read_bytes(), reason, sop=p.stem)
                if q is not None:
                    p.unlink(missing_ok=True)
                log.warning("%s; moved to %s", reason, q)
                continue
            store.record_instance(rec)
            indexed += 1
        if indexed:
            log.info("spool rescan indexed %d instance(s) missing from the store", indexed)
        return indexed

    # -- retention -------------------------------------------------------
    def clean(self, store: Store, retention_days: float, *, now: float | None = None) -> int:
        """Delete the spool files of series processed (``done``) more than ``retention_days`` ago.

        The series and instance rows are kept (history); ``unrouted`` and ``failed``
        series are never cleaned.  ``retention_days: 0`` disables cleaning.
        Returns the number of files deleted.
        """
        days = float(retention_days)
        if days <= 0:
            return 0
        cutoff = (now if now is not None else time.time()) - days * 86400.0
        spool = self.spool_dir.resolve()
        removed = 0
        for s in store.list_series(SeriesState.DONE):
            if s.state_changed_at > cutoff:
                continue
            folders = set()
            for inst in store.series_instances(s.series_uid):
                p = Path(inst.path)
                try:
                    if spool not in p.resolve().parents:
                        continue  # never delete outside the spool
                    if p.is_file():
                        p.unlink()
                        removed += 1
                    folders.add(p.parent)
                except OSError as exc:
                    log.warning("retention: cannot delete %s: %s", p, exc)
            for folder in folders:
                for d in (folder, folder.parent):
                    try:
                        d.rmdir()  # only when empty
                    except OSError:
                        pass
        if removed:
            log.info("spool retention: deleted %d file(s) of series done more than %g day(s) ago", removed, days)
        return removed


@dataclass(frozen=True)
class QuarantineEntry:
    """One refused instance kept in the quarantine folder (see :meth:`Spool.quarantine`)."""

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
