"""What the stages hand each other: the states of the store's tables and the typed records
written to its JSON columns (a job's parameters and result) or sent to a job process (its spec).

Each record reads the JSON shape the node has always written (:meth:`from_json`, which also
reads the legacy alias keys) and writes it back unchanged (:meth:`to_json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from node.config import ModelsConfig
from node.pipeline.outputs.options import DEFAULT_OUTPUTS, OutputOptions

if TYPE_CHECKING:  # annotation only: node.routing imports this module
    from node.routing.rules import RuleSet

__all__ = [
    "SeriesState",
    "JobState",
    "DispatchState",
    "DispatchKind",
    "Resource",
    "FailureKind",
    "SlotInfo",
    "JobParams",
    "OriginAddress",
    "JobResult",
    "ProcessInfo",
    "JobSpec",
    "NodeStatus",
    "RulesInForce",
]


class SeriesState(StrEnum):
    """``series.state``: receiving -> complete -> routed | unrouted -> processing -> done | failed."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    UNROUTED = "unrouted"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    """``jobs.state``: queued -> running -> done | failed (or queued again), superseded."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DispatchState(StrEnum):
    """``dispatches.state``: pending -> sent | failed."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class DispatchKind(StrEnum):
    """``dispatches.kind``: C-STORE of the SEG (as soon as it is written), the rule's other result
    objects (SR, overlay, STL; over STOW-RS also the SEG: everything in one request), or the share drop."""

    DICOM = "dicom"
    OUTPUTS = "outputs"
    SHARE = "share"


class Resource(StrEnum):
    """``jobs.resource``: the worker-pool slot kind a job needs."""

    CPU = "cpu"
    GPU = "gpu"


class FailureKind(StrEnum):
    """How a try failed: bad input and a missing backend fail the job at once, the rest is retried."""

    INPUT = "input"
    BACKEND = "backend"
    TRANSIENT = "transient"


def _str(value: Any) -> str | None:
    """A non-empty string value of a JSON field, else None."""
    return value if isinstance(value, str) and value else None


def _path(value: Any) -> Path | None:
    text = _str(value)
    return Path(text) if text is not None else None


@dataclass(frozen=True)
class SlotInfo:
    """``params.slot``: the worker-pool slot and process the latest try of a job ran in."""

    name: str  #: cpu<N> | gpu<id>
    kind: Resource
    gpu: int | None
    pid: int
    process: str  #: 'slot' (the slot's long-lived process) | 'job' (a process of its own)
    device: str | None  #: models.device given to the process
    cuda_visible_devices: str | None  #: None: the environment was left as it was
    host: str | None = None  #: the host the try ran on (Dask: the worker's; local: None, the node's)
    worker: str | None = None  #: the Dask worker's address (None: a local slot)

    def to_json(self) -> dict[str, Any]:
        """Without the None values: the store merges it with SQLite's json_patch, which drops them."""
        d = {"name": self.name, "kind": str(self.kind), "gpu": self.gpu, "pid": self.pid, "process": self.process,
             "device": self.device, "cuda_visible_devices": self.cuda_visible_devices, "host": self.host,
             "worker": self.worker}
        return {k: v for k, v in d.items() if v is not None}

    def where(self) -> str:
        """Where the try ran, in one line (``jobs show``)."""
        parts = [f"slot {self.name}"]
        if self.host:
            parts.append(f"host {self.host}")
        if self.worker:
            parts.append(f"Dask worker {self.worker}")
        if self.gpu is not None:
            parts.append(f"GPU {self.gpu}")
        if self.pid:
            parts.append(f"pid {self.pid}" + (" (long-lived)" if self.process == "slot" else ""))
        return ", ".join(parts)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SlotInfo:
        gpu, cuda = d.get("gpu"), d.get("cuda_visible_devices")  # cuda: "" (no GPU) differs from None
        return cls(name=str(d.get("name") or ""), kind=Resource(d.get("kind") or Resource.CPU),
                   gpu=int(gpu) if gpu is not None else None, pid=int(d.get("pid") or 0),
                   process=str(d.get("process") or ""), device=_str(d.get("device")),
                   cuda_visible_devices=None if cuda is None else str(cuda), host=_str(d.get("host")),
                   worker=_str(d.get("worker")))


@dataclass(frozen=True)
class JobParams:
    """``jobs.params``: what the router took from the matched rule, and where the last try ran."""

    destinations: tuple[str, ...] = ()  #: names from node.yaml, or ``origin``
    share: bool = False
    backend_override: str | None = None  #: the rule's ``backend``, else the profile's
    calling_ae: str | None = None  #: the series' calling AE when it was routed
    rule_line: int | None = None
    supersede: bool = True  #: a newer generation's result supersedes this one
    slot: SlotInfo | None = None  #: set by the pool when a try starts
    outputs: OutputOptions = OutputOptions()  #: the rule's ``outputs:`` and ``overlay:``

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"destinations": list(self.destinations), "share": self.share,
                             "backend_override": self.backend_override, "calling_ae": self.calling_ae,
                             "rule_line": self.rule_line, "supersede": self.supersede}
        if self.outputs.kinds != DEFAULT_OUTPUTS:  # rows of jobs that return only the SEG stay as they were
            d.update(self.outputs.to_params())
        if self.slot is not None:
            d["slot"] = self.slot.to_json()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> JobParams:
        d = d or {}
        slot = d.get("slot")
        line = d.get("rule_line")
        return cls(destinations=tuple(str(x) for x in d.get("destinations") or ()),
                   share=bool(d.get("share")), backend_override=_str(d.get("backend_override")),
                   calling_ae=_str(d.get("calling_ae")), rule_line=int(line) if line is not None else None,
                   supersede=bool(d.get("supersede", True)),
                   slot=SlotInfo.from_json(slot) if isinstance(slot, Mapping) else None,
                   outputs=OutputOptions.from_params(dict(d)))


@dataclass(frozen=True)
class OriginAddress:
    """``result.origin``: the address the ``origin`` destination resolved to when the job finished."""

    calling_ae: str
    ae_title: str
    host: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"calling_ae": self.calling_ae, "ae_title": self.ae_title, "host": self.host, "port": self.port}

    @classmethod
    def from_json(cls, d: Any) -> OriginAddress | None:
        if not isinstance(d, Mapping) or not d.get("host") or not d.get("port"):
            return None
        calling = str(d.get("calling_ae") or "")
        return cls(calling_ae=calling, ae_title=str(d.get("ae_title") or calling), host=str(d["host"]),
                   port=int(d["port"]))


#: keys of the result folder in ``jobs.result``: ``output_dir``, then legacy aliases
_FOLDER_KEYS = ("output_dir", "result_dir", "dir", "folder", "outputs_dir")


@dataclass(frozen=True)
class JobResult:
    """``jobs.result``: the paths a job's run produced (empty until a try finished or wrote its SEG)."""

    output_dir: Path | None = None  #: ``results/<job id>/``
    seg: Path | None = None
    meshes: tuple[Path, ...] | None = None  #: None: not recorded (the files in the folder are the meshes)
    report: Path | None = None  #: ``report.json``
    seg_series_uid: str | None = None
    timings_s: Mapping[str, Any] = field(default_factory=dict)  #: the report's ``timings_s``
    backend: Mapping[str, Any] = field(default_factory=dict)  #: the report's ``backend`` section
    seg_early: Path | None = None  #: ``results/<job id>-seg.dcm``, the SEG handed on before the meshes
    origin: OriginAddress | None = None
    #: the report's quality warnings: the result failed a sanity check (still delivered)
    warnings: tuple[str, ...] = ()
    qc: tuple[Path, ...] = ()  #: the QC pictures (``<output_dir>/qc/*.png``, node.pipeline.stages.qc)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "output_dir": str(self.output_dir) if self.output_dir is not None else None,
            "seg": str(self.seg) if self.seg is not None else None,
            "meshes": [str(m) for m in self.meshes] if self.meshes is not None else None,
            "report": str(self.report) if self.report is not None else None,
            "seg_series_uid": self.seg_series_uid,
            "timings_s": dict(self.timings_s) or None,
            "backend": dict(self.backend) or None,
            "seg_early": str(self.seg_early) if self.seg_early is not None else None,
            "origin": self.origin.to_json() if self.origin is not None else None,
            "warnings": list(self.warnings) or None,
            "qc": [str(q) for q in self.qc] or None,
        }
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> JobResult:
        d = d or {}
        seg = _path(d.get("seg")) or _path(d.get("seg_path"))
        folder = next((p for p in (_path(d.get(k)) for k in _FOLDER_KEYS) if p is not None), None)
        if folder is None and seg is not None:  # rows that name only the SEG: its folder
            folder = seg.parent
        meshes_v = d.get("meshes") or d.get("mesh_paths")
        if meshes_v is None and isinstance(d.get("meshes"), list):
            meshes_v = []
        meshes = tuple(Path(str(m)) for m in meshes_v) if isinstance(meshes_v, list) else None
        timings = d.get("timings_s")
        backend = d.get("backend")
        return cls(output_dir=folder, seg=seg, meshes=meshes,
                   report=_path(d.get("report")) or _path(d.get("report_path")),
                   seg_series_uid=_str(d.get("seg_series_uid")),
                   timings_s=dict(timings) if isinstance(timings, Mapping) else {},
                   backend=dict(backend) if isinstance(backend, Mapping) else {},
                   seg_early=_path(d.get("seg_early")), origin=OriginAddress.from_json(d.get("origin")),
                   warnings=tuple(str(w) for w in d.get("warnings") or ()),
                   qc=tuple(Path(str(q)) for q in d.get("qc") or ()))


@dataclass(frozen=True)
class ProcessInfo:
    """What a job or slot process is told when it starts: its slot, environment and node."""

    slot: str
    env: Mapping[str, str]  #: set before anything imports torch (``CUDA_VISIBLE_DEVICES``)
    log_level: str
    node_pid: int  #: the node process, watched by the job process (with its start time)
    node_started: float  #: seconds after boot (:func:`node.job_process.process_started`), not wall clock
    log_phi: bool = False  #: node.yaml's ``log_phi``
    nice: int = 0  #: node.yaml's ``job_nice``: the process lowers its CPU and I/O priority by this


@dataclass(frozen=True)
class JobSpec:
    """One try of a job, as the pool hands it to the process that runs the pipeline."""

    job_id: int
    series_uid: str
    paths: tuple[str, ...]  #: the series' spool files
    profile: str
    profiles_dir: Path
    backend: str | None  #: the rule's backend override, else None (the profile's)
    output_dir: Path  #: ``results/<job id>/``
    seg_series_uid: str
    decode_workers: int | None
    models: ModelsConfig  #: node.yaml's ``models`` (``device: cuda`` in a GPU slot)
    outputs: OutputOptions = OutputOptions()  #: the result objects beside the SEG the rule asked for
    file_mode: int = 0o640  #: node.yaml's ``file_mode`` / ``dir_mode`` for what the try writes
    dir_mode: int = 0o750


@dataclass(frozen=True)
class NodeStatus:
    """What the running node tells its console about its live parts (one snapshot; the console
    runs in a process of its own and asks the node over node/console/control.py)."""

    pid: int  #: the node process
    started_at: float  #: when the node started (epoch s)
    receiver_up: bool  #: the DICOM receiver listens
    port: int  #: the receiver's port
    tls_port: int | None  #: its DICOM-TLS port, when configured
    associations_now: int  #: associations open now
    receiver_stats: Mapping[str, int]  #: the receiver's counts since start (stored, duplicates, refused...)
    slots: tuple[dict[str, Any], ...]  #: the worker pool's slots (``WorkerPool.snapshot()``)
    executor: str  #: where tries run (``executor.describe()``)
    last_errors: tuple[dict[str, Any], ...]  #: the node's last ERROR log records: at, logger, message


@dataclass(frozen=True)
class RulesInForce:
    """The routing rules the running node uses now (they differ from the file while an edit of it
    is broken), and why the file's content is not in force (None when it is)."""

    ruleset: RuleSet
    last_error: str | None
