"""Dispatch: deliver finished jobs' results (C-STORE of the SEG, share drop).

The worker creates one ``dispatches`` row per (job, destination, kind) when a
job is done; the service's scheduler calls :meth:`Dispatcher.run_due`
periodically.  Each call processes every *due* pending dispatch::

    claim (lease)  ->  perform  ->  sent            (sent_at; where: dispatch_attempts)
                                ->  pending again   (attempts < max: next_attempt_at =
                                                     now + dispatch_retry.delay(attempts))
                                ->  failed          (attempts exhausted, or an error that
                                                     retrying cannot fix; last_error)

Everything is in the job store, so retries survive a restart: a dispatch is
due when its persisted ``next_attempt_at`` has passed.  A claim moves
``next_attempt_at`` ahead by a lease; if the process dies mid-send the
dispatch becomes due again when the lease runs out (the C-STORE is
idempotent: the same SOP Instance UID is sent again, which a PACS stores once).

Kinds:

* ``dicom``: the job's SEG (``<organ>_seg.dcm``; while the job still makes its meshes,
  the SEG it handed on early, ``result["seg_early"]``) is sent with
  :func:`node.scp.sender.send_datasets` to ``config.destinations[name]``, or
  for ``origin`` to the address of the calling AE (``job.params["calling_ae"]``,
  else the series' calling AE) from ``config.known_aes``, falling back to the
  address the worker recorded in ``job.result["origin"]``.  :class:`~node.scp.sender.DestinationUnavailable`
  (peer down, association rejected/aborted) and failure statuses from the
  peer are retried with backoff; an unknown destination, an origin AE with no
  known address or a missing SEG file fail at once (``jobs retry`` after
  fixing the cause).
* ``outputs`` (issue 14): the rule's other DICOM objects (SR, overlay, Encapsulated STL, from
  ``report.json`` ``outputs``) once the job is done, C-STORE in one association; to a STOW-RS
  destination (:class:`~node.config.StowDestination`) every object including the SEG in one
  request (:func:`node.dicomweb.stow`), the server's per-instance failure reasons in the detail.
* ``share``: :func:`node.share.drop` into ``share.root`` / ``share.path_template``
  (SEG, STL, PLY, report.json + manifest.json).  An ``OSError`` (share not
  mounted, disk full) is retried; a bad template fails at once (and is
  already refused when the Dispatcher is created).

Job results: the job row's ``result`` JSON must name the result folder
(``output_dir``; also accepted: ``result_dir``/``dir``/``folder``, or the folder
of ``seg``/``seg_path``).  The file list is taken from the pipeline's
``report.json`` in that folder (``outputs.seg``, ``outputs.meshes``), falling
back to ``seg``/``meshes`` keys of the job result or the files in the folder.

Every attempt is logged in the store's ``dispatch_attempts`` table: when, outcome
(``sent`` / ``retry`` / ``failed``) and detail -- for ``sent`` the place it went
(``ORTHANC@127.0.0.1:4242 (1/1 instance(s) stored) SOP 1.2...`` or the share folder).
:meth:`Store.dispatch_attempts` reads it (``jobs show``; :func:`dispatch_log` here).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import ConfigError, Destination, NodeConfig, StowDestination
from node.dicomweb import stow, stow_auth
from node.errors import InputError, NodeError
from node.pipeline.outputs.options import OutputOptions, dicom_objects
from node.scp.sender import DestinationUnavailable, send_datasets
from node.share import ShareFile, Superseded, drop, validate_template
from node.store import Dispatch, Job, Store

__all__ = ["Dispatcher", "DispatchOutcome", "PermanentDispatchError", "dispatch_log"]

log = logging.getLogger("node.dispatcher")



class PermanentDispatchError(NodeError):
    """Retrying will not help (configuration or missing result): the dispatch fails at once."""


@dataclass(frozen=True)
class DispatchOutcome:
    """Result of one attempt (what :meth:`Dispatcher.dispatch_one` returns)."""

    dispatch_id: int
    job_id: int
    kind: str
    destination: str
    attempt: int
    state: str  #: sent | pending (will retry) | failed
    detail: str
    location: str | None = None  #: where it went (AE@host:port or share folder), for sent
    retry_at: float | None = None


def dispatch_log(store: Store, *, job_id: int | None = None, dispatch_id: int | None = None) -> list[dict[str, Any]]:
    """Attempts recorded by the dispatcher, oldest first (see :meth:`Store.dispatch_attempts`)."""
    return store.dispatch_attempts(job_id=job_id, dispatch_id=dispatch_id)


def _one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Dispatcher:
    """Delivers due dispatches.  Safe to run in several threads/processes at once (leases).

    Args:
        config: the node configuration (destinations, known_aes, share,
            dispatch_retry, timeouts, ae_title).
        store: the job store.
        lease_s: how long a claimed dispatch is reserved for this attempt;
            default: long enough for the configured network timeouts.

    Raises:
        ConfigError: the share path template is invalid.
    """

    def __init__(self, config: NodeConfig, store: Store, *, lease_s: float | None = None) -> None:
        self.config = config
        self.store = store
        try:
            validate_template(config.share.path_template)
        except ConfigError as exc:
            raise ConfigError(exc.message, path=config.config_path or "node.yaml", tag=exc.tag) from None
        t = config.timeouts
        self.lease_s = float(lease_s) if lease_s is not None else max(300.0, t.connect_s + t.acse_s + 4 * t.dimse_s)
        self._lock = threading.Lock()  # one run_due at a time per Dispatcher

    # -- the scheduler entry point ------------------------------------------
    def run_due(self, now: float | None = None) -> int:
        """Process every dispatch due at ``now`` (default: the current time); returns how many were tried.

        ``now`` also anchors the backoff (``retry_at = now + delay``), which
        lets tests step through time.  A dispatch retried within this call
        (zero backoff) is tried again until it is sent or its attempts are used up.
        """
        if not self._lock.acquire(blocking=False):
            return 0  # another run_due of this Dispatcher is going on
        try:
            n = 0
            while True:
                t = now if now is not None else time.time()
                d = self.store.claim_dispatch(lease_s=self.lease_s, now=t)
                if d is None:
                    return n
                self.dispatch_one(d, now=t)
                n += 1
        finally:
            self._lock.release()

    # -- one attempt ----------------------------------------------------------
    def dispatch_one(self, d: Dispatch, *, now: float | None = None) -> DispatchOutcome:
        """Perform one claimed dispatch and record its outcome (never raises for delivery errors)."""
        started = time.time()
        t = now if now is not None else started
        policy = self.config.dispatch_retry
        location: str | None = None
        try:
            job = self.store.get_job(d.job_id)
            if job is None:
                raise PermanentDispatchError(f"job {d.job_id} does not exist")
            if d.kind == "dicom":
                detail, location = self._send_dicom(job, d)
            elif d.kind == "outputs":  # issue 14 hook
                detail, location = self._send_outputs(job, d)
            elif d.kind == "share":
                detail, location = self._send_share(job, d)
            else:
                raise PermanentDispatchError(f"unknown dispatch kind {d.kind!r}")
        except Superseded as exc:
            return self._finish(d, started, "failed", f"superseded: {exc}")
        except (PermanentDispatchError, InputError) as exc:  # ConfigError is an InputError
            return self._finish(d, started, "failed", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - transient by default: retry with backoff
            err = str(exc) if isinstance(exc, DestinationUnavailable) else f"{type(exc).__name__}: {exc}"
            if d.attempts >= policy.max_attempts:
                return self._finish(d, started, "failed", f"gave up after {d.attempts} attempt(s): {err}")
            retry_at = t + policy.delay(d.attempts)
            return self._finish(d, started, "pending", err, retry_at=retry_at)
        return self._finish(d, started, "sent", detail, location=location)

    def _finish(
        self,
        d: Dispatch,
        started: float,
        state: str,
        detail: str,
        *,
        location: str | None = None,
        retry_at: float | None = None,
    ) -> DispatchOutcome:
        detail = _one_line(detail)
        what = f"dispatch {d.id} (job {d.job_id}, {d.kind} -> {d.destination}, attempt {d.attempts})"
        if state == "sent":
            ok = self.store.mark_dispatch_sent(d.id)
            log.info("%s sent%s: %s", what, f" -> {location}" if location and location not in detail else "", detail)
        else:
            new = self.store.mark_dispatch_failed(d.id, detail, retry_at=retry_at)
            ok = new is not None
            if state == "pending":
                log.warning("%s failed, retry in %.0f s: %s", what, (retry_at or 0) - time.time(), detail)
            else:
                log.error("%s failed for good: %s", what, detail)
        if not ok:  # someone else finished it (lease expired and another dispatcher took over)
            log.warning("%s: no longer pending when recording %s", what, state)
        try:
            self.store.record_dispatch_attempt(
                d, started_at=started, outcome="retry" if state == "pending" else state, detail=detail,
                location=location,
            )
        except Exception:  # noqa: BLE001 - the log is informative; the state change above is what counts
            log.exception("cannot record the attempt of %s", what)
        return DispatchOutcome(d.id, d.job_id, d.kind, d.destination, d.attempts, state, detail, location, retry_at)

    # -- result files -------------------------------------------------------
    @staticmethod
    def _result_dir(job: Job) -> Path:
        r = job.result or {}
        for key in ("output_dir", "result_dir", "dir", "folder", "outputs_dir"):
            v = r.get(key)
            if isinstance(v, str) and v:
                return Path(v)
        for key in ("seg", "seg_path"):
            v = r.get(key)
            if isinstance(v, str) and v:
                return Path(v).parent
        raise PermanentDispatchError(f"job {job.id} has no result folder in its result ({sorted(r)})")

    def _result_files(self, job: Job) -> tuple[Path, Path | None, list[ShareFile], dict[str, Any]]:
        """(folder, SEG path or None, files for the share, report) of a done job."""
        if job.state == "superseded":
            raise Superseded(f"job {job.id} is superseded ({job.error or 'a newer generation exists'})", Path(), {})
        if job.state != "done":
            raise PermanentDispatchError(f"job {job.id} is {job.state}, not done")
        folder = self._result_dir(job)
        if not folder.is_dir():
            raise PermanentDispatchError(f"result folder {folder} of job {job.id} is missing")
        r = job.result or {}
        report: dict[str, Any] = {}
        report_path = Path(r.get("report") or r.get("report_path") or folder / "report.json")
        if not report_path.is_absolute():
            report_path = folder / report_path
        if report_path.is_file():
            try:
                report = json.loads(report_path.read_text(encoding="utf-8"))
            except ValueError:
                report = {}
        outputs = report.get("outputs") or {}

        def _p(v: Any) -> Path:
            p = Path(str(v))
            return p if p.is_absolute() else folder / p

        seg_name = outputs.get("seg") or r.get("seg") or r.get("seg_path")
        seg = _p(seg_name) if seg_name else next(iter(sorted(folder.glob("*_seg.dcm"))), None)
        meshes_v = outputs.get("meshes")
        if meshes_v is None:
            meshes_v = r.get("meshes") or r.get("mesh_paths")
        meshes = [_p(m) for m in meshes_v] if meshes_v is not None else sorted(
            [*folder.glob("*.stl"), *folder.glob("*.ply")]
        )
        files: list[ShareFile] = []
        if seg is not None:
            files.append(ShareFile(seg, seg.name, "seg"))
        for m in meshes:
            files.append(ShareFile(m, m.name, m.suffix.lstrip(".").lower()))
        if report_path.is_file():
            files.append(ShareFile(report_path, "report.json", "report"))
        missing = [str(f.source) for f in files if not Path(f.source).is_file()]
        if missing:
            raise PermanentDispatchError(f"result file(s) of job {job.id} missing: {', '.join(missing)}")
        return folder, seg, files, report

    # -- dicom -----------------------------------------------------------------
    def _destination(self, job: Job, d: Dispatch) -> Destination | StowDestination:
        if d.destination == "origin":
            calling = str(job.params.get("calling_ae") or "")
            if not calling:
                series = self.store.get_series(job.series_uid)
                calling = (series.calling_ae if series else None) or ""
            dest = self.config.origin_destination(calling) if calling else None
            recorded = (job.result or {}).get("origin")
            if dest is None and isinstance(recorded, dict) and recorded.get("host") and recorded.get("port"):
                # the address resolved when the job finished (known_aes changed since)
                dest = Destination(
                    ae_title=recorded.get("ae_title") or calling, host=recorded["host"], port=int(recorded["port"])
                )
            if dest is None:
                raise PermanentDispatchError(
                    f"destination 'origin': calling AE {calling or '(unknown)'!r} of series {job.series_uid}"
                    " has no address in known_aes"
                )
            return dest
        return self.config.destination(d.destination)  # ConfigError if unknown

    @staticmethod
    def _early_seg(job: Job) -> Path | None:
        """The SEG of a job that is not done yet but wrote it (``result.seg_early``), else None.

        A retry of the job writes the same SEG instance, so it may go before the job is done.
        """
        early = (job.result or {}).get("seg_early")
        if job.state not in ("running", "queued") or not early:
            return None
        path = Path(str(early))
        if not path.is_file():  # retried (transient) until the job is done
            raise NodeError(f"job {job.id} is {job.state} and its early SEG {path} is missing")
        return path

    def _send_dicom(self, job: Job, d: Dispatch) -> tuple[str, str]:
        dest = self._destination(job, d)
        seg = self._early_seg(job)
        if seg is None:
            _, seg, _, _ = self._result_files(job)
        if seg is None:
            raise PermanentDispatchError(f"job {job.id} produced no SEG to send")
        if isinstance(dest, StowDestination):  # issue 14
            return self._stow(job, dest, [seg])
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        result = send_datasets([seg], dest, calling_ae=self.config.ae_title, timeouts=self.config.timeouts)
        if not result.ok:
            raise NodeError(f"{where}: {result.summary()}")  # peer's failure status: retried with backoff
        sops = ", ".join(i.sop_instance_uid for i in result.sent)
        return f"{result.summary()}; SOP Instance {sops}", where

    # -- issue 14: the rule's other outputs, and STOW-RS --------------------------
    def _send_outputs(self, job: Job, d: Dispatch) -> tuple[str, str]:
        """SR, overlay and Encapsulated STL of a done job (with the SEG for a STOW-RS destination:
        everything in one request), C-STORE in one association or STOW-RS."""
        dest = self._destination(job, d)
        folder, seg, _, report = self._result_files(job)
        kinds = OutputOptions.from_params(job.params).kinds
        files = [folder / p for p in dicom_objects(report, kinds)]
        if isinstance(dest, StowDestination) and seg is not None and "seg" in kinds:
            files.insert(0, seg)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PermanentDispatchError(f"output file(s) of job {job.id} missing: {', '.join(missing[:5])}")
        if not files:
            raise PermanentDispatchError(f"job {job.id} wrote none of the outputs its rule asks for")
        if isinstance(dest, StowDestination):
            return self._stow(job, dest, files)
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        result = send_datasets(files, dest, calling_ae=self.config.ae_title, timeouts=self.config.timeouts)
        if not result.ok:
            raise NodeError(f"{where}: {result.summary()}")  # peer's failure status: retried with backoff
        return result.summary(), where

    def _stow(self, job: Job, dest: StowDestination, files: list[Path]) -> tuple[str, str]:
        series = self.store.get_series(job.series_uid)
        result = stow(
            files, dest.stow, auth=stow_auth(dest), timeout_s=dest.timeout_s,
            verify=str(dest.verify_tls) if isinstance(dest.verify_tls, Path) else dest.verify_tls,
            max_request_bytes=int(dest.max_request_mb * 2**20) if dest.max_request_mb else None,
            study_instance_uid=series.study_uid if series else None,
        )
        if not result.ok:
            # the server's reasons per instance go into the attempt's detail; retried with backoff
            raise NodeError(result.summary())
        return result.summary(), dest.stow

    # -- share -------------------------------------------------------------------
    def _send_share(self, job: Job, d: Dispatch) -> tuple[str, str]:
        _, seg, files, report = self._result_files(job)
        series = self.store.get_series(job.series_uid)
        tags: dict[str, Any] = dict(series.tags) if series else {}
        rin = report.get("input") or {}
        fields: dict[str, Any] = dict(tags)
        fields.update(
            {
                "organ": job.profile,
                "profile": job.profile,
                "rule": job.rule,
                "backend": job.backend,
                "job_id": job.id,
                "generation": job.generation,
                "StudyInstanceUID": series.study_uid if series else rin.get("study_instance_uid"),
                "SeriesInstanceUID": job.series_uid,
                "calling_ae": series.calling_ae if series else None,
            }
        )
        if "SeriesDescription" not in fields and rin.get("series_description") is not None:
            fields["SeriesDescription"] = rin.get("series_description")
        job_info = {
            "id": job.id,
            "series_uid": job.series_uid,
            "rule": job.rule,
            "profile": job.profile,
            "backend": job.backend,
            "rules_version": job.rules_version,
            "generation": job.generation,
            "created_at": job.created_at,
            "finished_at": job.finished_at,
        }
        inputs = {
            "study_instance_uid": fields["StudyInstanceUID"],
            "series_instance_uid": job.series_uid,
            "instance_count": series.instance_count if series else rin.get("files"),
            "source_ae": series.calling_ae if series else None,
            "called_ae": series.called_ae if series else None,
            "modality": tags.get("Modality"),
            "series_description": tags.get("SeriesDescription", rin.get("series_description")),
        }
        seg_uid = job.seg_series_uid or (report.get("outputs") or {}).get("seg_series_instance_uid")
        supersedes = self._older_results(job)
        result = drop(
            self.config.share.root,
            self.config.share.path_template,
            fields,
            files,
            job=job_info,
            inputs=inputs,
            seg_series_uid=seg_uid,
            supersedes=supersedes,
        )
        return f"{len(files)} file(s) + manifest.json", str(result.folder)  # the folder is the location

    def _older_results(self, job: Job) -> list[dict[str, Any]]:
        """Done jobs of older generations of the same series and profile, with their share folder if any."""
        older = []
        for j in self.store.list_jobs(series_uid=job.series_uid):
            if j.id == job.id or j.profile != job.profile or j.generation >= job.generation:
                continue
            if j.state not in ("done", "superseded"):
                continue
            folder = None
            shares = {x.id for x in self.store.list_dispatches(job_id=j.id) if x.kind == "share"}
            for a in reversed(dispatch_log(self.store, job_id=j.id)):
                if a["outcome"] == "sent" and a["location"] and a["dispatch_id"] in shares:
                    try:
                        folder = Path(a["location"]).relative_to(Path(self.config.share.root)).as_posix()
                    except ValueError:
                        folder = None
                    break
            older.append(
                {"job_id": j.id, "generation": j.generation, "seg_series_instance_uid": j.seg_series_uid, "folder": folder}
            )
        return older
