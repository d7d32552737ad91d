"""Dispatch: delivers finished jobs' results, one ``dispatches`` row at a time (C-STORE of the SEG
to a DICOM destination, the rule's other result objects by C-STORE or STOW-RS, or the share
drop), with leases and retries with backoff that survive a restart; every attempt is logged in
``dispatch_attempts``.  See docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import ConfigError, Destination, NodeConfig, StowDestination
from node.contracts import DispatchKind, DispatchState, JobState
from node.dicomweb import stow, stow_auth
from node.errors import InputError, NodeError
from node.jobs import resolve_origin
from node.pipeline.outputs.options import dicom_objects
from node.logsafe import log_phi_enabled
from node.metrics import DISPATCH_ATTEMPTS
from node.routing.rules import ORIGIN
from node.scp.sender import DestinationUnavailable, send_datasets
from node.scp.tls import client_context
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
    state: DispatchState  #: sent | pending (will retry) | failed
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
            if d.kind == DispatchKind.DICOM:
                detail, location = self._send_dicom(job, d)
            elif d.kind == DispatchKind.OUTPUTS:
                detail, location = self._send_outputs(job, d)
            elif d.kind == DispatchKind.SHARE:
                detail, location = self._send_share(job, d)
            else:
                raise PermanentDispatchError(f"unknown dispatch kind {d.kind!r}")
        except Superseded as exc:
            return self._finish(d, started, DispatchState.FAILED, f"superseded: {exc}")
        except (PermanentDispatchError, InputError) as exc:  # ConfigError is an InputError
            return self._finish(d, started, DispatchState.FAILED, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - transient by default: retry with backoff
            err = str(exc) if isinstance(exc, DestinationUnavailable) else f"{type(exc).__name__}: {exc}"
            if d.attempts >= policy.max_attempts:
                return self._finish(d, started, DispatchState.FAILED, f"gave up after {d.attempts} attempt(s): {err}")
            retry_at = t + policy.delay(d.attempts)
            return self._finish(d, started, DispatchState.PENDING, err, retry_at=retry_at)
        return self._finish(d, started, DispatchState.SENT, detail, location=location)

    def _finish(
        self,
        d: Dispatch,
        started: float,
        state: DispatchState,
        detail: str,
        *,
        location: str | None = None,
        retry_at: float | None = None,
    ) -> DispatchOutcome:
        detail = _one_line(detail)
        what = f"dispatch {d.id} (job {d.job_id}, {d.kind} -> {d.destination}, attempt {d.attempts})"
        # share folders are made of patient IDs, names and dates: the log shows them only with log_phi
        shown, shown_at = self._hide_share_paths(detail), self._hide_share_paths(location or "")
        if state == DispatchState.SENT:
            ok = self.store.mark_dispatch_sent(d.id)
            log.info("%s sent%s: %s", what, f" -> {shown_at}" if location and location not in detail else "", shown)
        else:
            new = self.store.mark_dispatch_failed(d.id, detail, retry_at=retry_at)
            ok = new is not None
            if state == DispatchState.PENDING:
                log.warning("%s failed, retry in %.0f s: %s", what, (retry_at or 0) - time.time(), shown)
            else:
                log.error("%s failed for good: %s", what, shown)
        outcome = "retry" if state == DispatchState.PENDING else str(state)
        DISPATCH_ATTEMPTS.labels(outcome=outcome, destination=d.destination, kind=str(d.kind)).inc()
        if not ok:  # someone else finished it (lease expired and another dispatcher took over)
            log.warning("%s: no longer pending when recording %s", what, state)
        try:
            self.store.record_dispatch_attempt(
                d, started_at=started, outcome="retry" if state == DispatchState.PENDING else state, detail=detail,
                location=location,
            )
        except Exception:  # the log is informative; the state change above is what counts
            log.exception("cannot record the attempt of %s", what)
        return DispatchOutcome(d.id, d.job_id, d.kind, d.destination, d.attempts, state, detail, location, retry_at)

    def _hide_share_paths(self, text: str) -> str:
        if log_phi_enabled() or not text:
            return text
        root = str(self.config.share.root).rstrip("/")
        return re.sub(re.escape(root) + r"/[^\s'\"]*", root + "/<phi>", text)

    # -- result files -------------------------------------------------------
    @staticmethod
    def _result_dir(job: Job) -> Path:
        if job.result.output_dir is None:
            raise PermanentDispatchError(f"job {job.id} has no result folder in its result "
                                         f"({sorted(job.result.to_json())})")
        return job.result.output_dir

    def _result_files(self, job: Job) -> tuple[Path, Path | None, list[ShareFile], dict[str, Any]]:
        """(folder, SEG path or None, files for the share, report) of a done job."""
        if job.state == JobState.SUPERSEDED:
            raise Superseded(f"job {job.id} is superseded ({job.error or 'a newer generation exists'})", Path(), {})
        if job.state != JobState.DONE:
            raise PermanentDispatchError(f"job {job.id} is {job.state}, not done")
        folder = self._result_dir(job)
        if not folder.is_dir():
            raise PermanentDispatchError(f"result folder {folder} of job {job.id} is missing")
        r = job.result
        report: dict[str, Any] = {}
        report_path = r.report or folder / "report.json"
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

        seg_name = outputs.get("seg") or r.seg
        seg = _p(seg_name) if seg_name else next(iter(sorted(folder.glob("*_seg.dcm"))), None)
        meshes_v = outputs.get("meshes")
        if meshes_v is None:
            meshes_v = r.meshes or None
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
        # the QC pictures (qc/qc_<tissue>_<view>.png) beside the rest, under their own names; one
        # missing is left out (QC never holds back a result)
        for q in outputs.get("qc") or [str(x) for x in r.qc]:
            if _p(q).is_file():
                files.append(ShareFile(_p(q), Path(str(q)).name, "qc"))
        missing = [str(f.source) for f in files if not Path(f.source).is_file()]
        if missing:
            raise PermanentDispatchError(f"result file(s) of job {job.id} missing: {', '.join(missing)}")
        return folder, seg, files, report

    # -- dicom -----------------------------------------------------------------
    def _destination(self, job: Job, d: Dispatch) -> Destination | StowDestination:
        if d.destination == ORIGIN:
            # known_aes, else the address resolved when the job finished (known_aes changed since)
            origin = resolve_origin(self.config, self.store, job, recorded=True)
            if origin.destination is None:
                raise PermanentDispatchError(
                    f"destination 'origin': calling AE {origin.calling_ae or '(unknown)'!r} of series"
                    f" {job.series_uid} has no address in known_aes"
                )
            return origin.destination
        return self.config.destination(d.destination)  # ConfigError if unknown

    @staticmethod
    def _early_seg(job: Job) -> Path | None:
        """The SEG of a job that is not done yet but wrote it (``result.seg_early``), else None.

        A retry of the job writes the same SEG instance, so it may go before the job is done.
        """
        path = job.result.seg_early
        if job.state not in (JobState.RUNNING, JobState.QUEUED) or path is None:
            return None
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
        if isinstance(dest, StowDestination):
            return self._stow(job, dest, [seg])
        where = f"{dest.ae_title}@{dest.host}:{dest.port}" + (" (TLS)" if dest.tls else "")
        tls = client_context(self.config.tls) if dest.tls else None
        result = send_datasets([seg], dest, calling_ae=self.config.ae_title, timeouts=self.config.timeouts, tls=tls)
        if not result.ok:
            raise NodeError(f"{where}: {result.summary()}")  # peer's failure status: retried with backoff
        sops = ", ".join(i.sop_instance_uid for i in result.sent)
        return f"{result.summary()}; SOP Instance {sops}", where

    # -- the rule's other outputs, and STOW-RS ------------------------------------
    def _send_outputs(self, job: Job, d: Dispatch) -> tuple[str, str]:
        """SR, overlay and Encapsulated STL of a done job (with the SEG for a STOW-RS destination:
        everything in one request), C-STORE in one association or STOW-RS."""
        dest = self._destination(job, d)
        folder, seg, _, report = self._result_files(job)
        kinds = job.params.outputs.kinds
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
        where = f"{dest.ae_title}@{dest.host}:{dest.port}" + (" (TLS)" if dest.tls else "")
        tls = client_context(self.config.tls) if dest.tls else None
        result = send_datasets(files, dest, calling_ae=self.config.ae_title, timeouts=self.config.timeouts, tls=tls)
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
            if j.state not in (JobState.DONE, JobState.SUPERSEDED):
                continue
            folder = None
            shares = {x.id for x in self.store.list_dispatches(job_id=j.id) if x.kind == DispatchKind.SHARE}
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
