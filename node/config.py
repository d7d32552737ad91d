"""Node configuration: ``node.yaml``, validated at the door.

The keys of :class:`NodeConfig` are a public interface (operators write them): an unknown key
or a bad value is a :class:`ConfigError` naming the file, the field path and the value, e.g.
``node.yaml: destinations.pacs.port: must be 1..65535 (got 70000)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from node.errors import InputError

__all__ = [
    "ConfigError",
    "RetryPolicy",
    "Destination",
    "AllowedAE",
    "KnownAE",
    "ShareConfig",
    "NetworkTimeouts",
    "ConnectionLimitsConfig",
    "DiskConfig",
    "TLSConfig",
    "HTTPConfig",
    "ModelsConfig",
    "NodeConfig",
    "load_config",
    "REPO_ROOT",
    "DEFAULT_CONFIG_NAME",
]

#: the repository root (folder holding ``node/``), used as a last fallback for
#: the shipped ``routing_rules.yaml`` and ``profiles/``
REPO_ROOT = Path(__file__).resolve().parent.parent
#: name used in error messages when no configuration file was given
DEFAULT_CONFIG_NAME = "node.yaml"
#: the ``pacs`` destination of the embedded defaults (Orthanc's defaults on this host)
EMBEDDED_PACS = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


class ConfigError(InputError):
    """``node.yaml`` is unreadable or invalid.  ``str(exc)`` is ``"<file>: <field>: <problem>"``."""


def _check_ae(value: str) -> str:
    v = value.strip() if isinstance(value, str) else value
    if not isinstance(v, str) or not _AE_RE.match(v):
        raise ValueError(f"must be an AE title of 1..16 printable ASCII characters without '\\' (got {value!r})")
    return v


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be 1..65535 (got {value})")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RetryPolicy(_Model):
    """Retry with exponential backoff: delay(n) = min(backoff_max_s, backoff_base_s * 2**(n-1))."""

    max_attempts: int = Field(3, ge=1)
    backoff_base_s: float = Field(30.0, ge=0)
    backoff_max_s: float = Field(3600.0, ge=0)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the next try after ``attempt`` failed tries (attempt >= 1)."""
        return float(min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt - 1))))


class Destination(_Model):
    """A DICOM peer the node sends results to."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Send over TLS (its certificate checked against ``tls.ca_certificates``, ours presented)."""
    server_name: str | None = None
    """The name its certificate must carry (default: ``host``)."""

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae(v))
    _port = field_validator("port")(lambda cls, v: _check_port(v))

    def as_tuple(self) -> tuple[str, str, int]:
        return (self.ae_title, self.host, self.port)


# -- DICOMweb STOW-RS destinations -------------------------------------------------
class _Secret(_Model):
    """A secret given inline or, better, in a file (read when used: rotate it without a restart)."""

    def _read(self, inline: str | None, file: Path | None, what: str) -> str:
        if inline is not None:
            return inline
        assert file is not None
        try:
            return file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} file {file}: {exc}", tag="auth") from None

    def _exactly_one(self, a: Any, b: Any, names: str) -> None:
        if (a is None) == (b is None):
            raise ValueError(f"give exactly one of {names}")


class BasicAuth(_Secret):
    username: str
    password: str | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> BasicAuth:
        self._exactly_one(self.password, self.password_file, "password, password_file")
        return self

    def secret(self) -> str:
        return self._read(self.password, self.password_file, "password")


class BearerAuth(_Secret):
    token: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> BearerAuth:
        self._exactly_one(self.token, self.token_file, "token, token_file")
        return self

    def secret(self) -> str:
        return self._read(self.token, self.token_file, "token")


class StowAuth(_Model):
    """``{basic: {username, password | password_file}}`` or ``{bearer: {token | token_file}}``."""

    basic: BasicAuth | None = None
    bearer: BearerAuth | None = None

    @model_validator(mode="after")
    def _one(self) -> StowAuth:
        if (self.basic is None) == (self.bearer is None):
            raise ValueError("give exactly one of basic, bearer")
        return self


class StowDestination(_Model):
    """A DICOMweb archive the node sends results to with STOW-RS (``POST <stow>/studies``)."""

    stow: str
    """The DICOMweb service root, e.g. ``https://archive.example.org/dicom-web``."""
    auth: StowAuth | None = None
    timeout_s: float = Field(120.0, gt=0)
    verify_tls: bool | Path = True
    """False, or a CA bundle file."""
    max_request_mb: float | None = Field(None, gt=0)
    """Split a job's objects into requests of at most about this size (default: one request;
    a server answering 413 gets smaller ones anyway)."""

    @field_validator("stow")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or len(v) < 10:
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        return v.rstrip("/")


def _destination_kind(v: Any) -> str:
    return "stow" if isinstance(v, StowDestination) or (isinstance(v, dict) and "stow" in v) else "dimse"


AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[StowDestination, Tag("stow")],
    Discriminator(_destination_kind),
]
# -- end of STOW-RS destinations ------------------------------------------------------------------------------


class AllowedAE(_Model):
    """An entry of the calling-AE allow-list; ``host`` (optional) must equal the peer address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae(v))


class KnownAE(_Model):
    """Network address of a calling AE, used by the ``origin`` destination (send results back)."""

    host: str
    port: int
    ae_title: str | None = None  #: AE title to call at that address (default: the calling AE title itself)

    _port = field_validator("port")(lambda cls, v: _check_port(v))


class ShareConfig(_Model):
    """File share output: meshes/reports are written under ``root`` following ``path_template``."""

    root: Path = Path("./var/share")
    path_template: str = "{PatientID}/{StudyDate}_{AccessionNumber}/{SeriesNumber}_{SeriesDescription}_{organ}/"


class ModelsConfig(_Model):
    """Where AI models live and how they run (see docs/ai-backends.md)."""

    root: Path | None = None
    """Folder that model paths in profiles are relative to; default $DICOM_NODE_MODELS, else <repo>/models."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1)
    """torch threads per job (more than one on a busy machine was much slower: bench/README.md)."""
    totalseg_weights: Path | None = None
    """TotalSegmentator weights folder (TOTALSEG_WEIGHTS_PATH); default under ``root``."""
    totalseg_home: Path | None = None
    """TotalSegmentator home with config.json (TOTALSEG_HOME_DIR); default under ``root``."""


class ExecutorConfig(_Model):
    """Where jobs run: ``local`` (processes on this host, the default) or ``dask`` (a Dask distributed
    cluster, docs/scaling.md)."""

    kind: Literal["local", "dask"] = "local"
    scheduler: str | None = None
    """The Dask scheduler's address, ``tcp://host:8786`` (``tls://`` with ``security``); ``kind: dask`` only."""
    connect_timeout_s: float = Field(30.0, gt=0)
    """How long the node waits for the scheduler at start (it keeps receiving meanwhile and after)."""

    @model_validator(mode="after")
    def _scheduler_for_dask(self) -> "ExecutorConfig":
        if self.kind == "dask":
            if not self.scheduler:
                raise ValueError("kind: dask needs scheduler: tcp://host:8786 (the Dask scheduler's address)")
            if "://" not in self.scheduler or not self.scheduler.split("://", 1)[1]:
                raise ValueError(f"scheduler must be an address like tcp://host:8786 (got {self.scheduler!r})")
        elif self.scheduler:
            raise ValueError("scheduler is only used with kind: dask")
        return self


class NetworkTimeouts(_Model):
    """pynetdicom timeouts in seconds (ACSE = association negotiation, DIMSE = message, network = idle)."""

    acse_s: float = Field(30.0, gt=0)
    dimse_s: float = Field(60.0, gt=0)
    network_s: float = Field(60.0, gt=0)
    connect_s: float = Field(10.0, gt=0)


class ConnectionLimitsConfig(_Model):
    """What one connection may hold before it associates (see node/scp/guard.py)."""

    max_request_pdu_kib: int = Field(64, ge=4, le=1024)
    """Largest A-ASSOCIATE-RQ accepted (KiB)."""
    max_pdu_kib: int = Field(4096, ge=16, le=65536)
    """The maximum PDU length the receiver advertises (KiB); longer P-DATA PDUs abort the association."""
    max_pending_connections: int = Field(32, ge=1)
    """Connections that have not associated yet; the oldest is dropped to admit a new one."""
    max_connections_per_peer: int = Field(24, ge=1)
    """Connections open at a time from one address (associated or not)."""


class TLSConfig(_Model):
    """DICOM TLS (node/scp/tls.py): the receiver's TLS port and what the sender presents."""

    certificate: Path
    """Our certificate (PEM; the chain after it)."""
    key: Path
    """Its private key (PEM, unencrypted; readable by the node only)."""
    ca_certificates: Path | None = None
    """The CAs whose certificates we trust (PEM): peers sending to us, and TLS destinations."""
    require_client_certificate: bool = True
    """A peer must present a certificate signed by one of ``ca_certificates``."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    max_version: Literal["1.2", "1.3"] | None = None
    port: int = 2762
    """The TLS port (2762: DICOM over TLS)."""
    plain_port: bool = True
    """Keep listening on ``port`` (the node's plain port) beside the TLS port; false: TLS only."""
    expiry_warning_days: int = Field(30, ge=0)
    """Warn (at start and daily) when our certificate expires within this many days."""

    _port = field_validator("port")(lambda cls, v: _check_port(v))

    @model_validator(mode="after")
    def _client_cert_needs_ca(self) -> "TLSConfig":
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate: true needs ca_certificates (the CAs to check them with)")
        if self.max_version and float(self.max_version) < float(self.min_version):
            raise ValueError(f"max_version {self.max_version} is below min_version {self.min_version}")
        return self


class HTTPConfig(_Model):
    """The operations console (node/console/): HTTP API and web pages, served inside ``dicom-node serve``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Address to listen on (default: this host only; put a TLS certificate before opening it wider)."""
    port: int = 8080
    """0: any free port (tests)."""
    certificate: Path | None = None
    """HTTPS certificate (PEM, chain after it); with ``key``.  None: plain HTTP."""
    key: Path | None = None
    session_max_age_s: float = Field(8 * 3600.0, gt=0)
    """A browser session ends this long after login."""
    login_max_failures: int = Field(5, ge=1)
    """Failed logins allowed per user name within ``login_window_s`` (per client address: four times
    as many); further logins are refused until the window has passed."""
    login_window_s: float = Field(300.0, gt=0)

    @field_validator("port")
    @classmethod
    def _http_port(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError(f"must be 1..65535, or 0 for any free port (got {v})")
        return v

    @model_validator(mode="after")
    def _cert_and_key(self) -> "HTTPConfig":
        if (self.certificate is None) != (self.key is None):
            raise ValueError("give both certificate and key for HTTPS, or neither")
        return self


class DiskConfig(_Model):
    """Free space on the storage volume (see docs/architecture.md, "Disk full")."""

    warn_free_mib: int = Field(2048, ge=0)
    """Below this much free space the node logs a warning (once per crossing, and every hour)."""
    reserve_free_mib: int = Field(512, ge=0)
    """Below this the receiver refuses new associations (out of resources) and C-STOREs (0xA700):
    the rest is kept for results."""
    check_interval_s: float = Field(5.0, gt=0)


class StoreConfig(_Model):
    """Where the job store lives (see docs/scaling.md, "Store: PostgreSQL")."""

    url: str | None = None
    """``postgresql://user@host:port/db`` (several node processes on several hosts share it; the
    password from ``~/.pgpass`` or ``PGPASSWORD``), or ``sqlite:///path`` (relative paths against the
    config file's folder); unset: SQLite in ``<storage>/node.db``, the embedded default."""
    job_lease_s: float = Field(60.0, ge=5)
    """How long a job claim holds without renewal: the claiming node renews it every few seconds
    while the job runs; once it has run out (that node is gone), another node runs the job again."""
    work_lease_s: float = Field(15.0, ge=2)
    """On a shared store one node process at a time completes and routes series; its lease is
    renewed every 0.5 s, and another node takes the work over this long after its holder died."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg  # noqa: F401 - only whether it is installed
            except ModuleNotFoundError:
                raise ValueError("PostgreSQL needs psycopg: pip install 'dicom-node[postgres]'") from None
            return v
        if v.startswith("sqlite:///") and len(v) > len("sqlite:///"):
            return v
        raise ValueError(f"must be postgresql://... or sqlite:///path (got {v.split('@')[-1]!r})")

    @property
    def postgres(self) -> bool:
        return bool(self.url) and str(self.url).startswith(("postgresql://", "postgres://"))


def _mode(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        value = int(value.replace("o", ""), 8)
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"must be a permission mode like '0640' (got {value!r})")
    if value & 0o002:
        raise ValueError(f"must not be writable by everyone (got {value:04o})")
    return value


def _default_workers() -> int:
    return max(1, (os.cpu_count() or 1) - 1)


class NodeConfig(_Model):
    """Everything in ``node.yaml``.  See :func:`load_config` for path resolution."""

    ae_title: str = "DICOMNODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    storage: Path = Path("./var")
    shared_storage: Path | None = None
    """A folder every host of a multi-node installation mounts: the spool, quarantine and
    results live there instead of under ``storage`` (see docs/scaling.md)."""
    store: StoreConfig = Field(default_factory=StoreConfig)
    quiet_period_s: float = Field(10.0, ge=0)
    early_start_s: float = Field(2.0, ge=0)
    """Start processing a series speculatively once it has been quiet this long (results are held
    until ``quiet_period_s`` confirms the series is complete with the same instances); 0 = off.
    Only in effect when shorter than ``quiet_period_s``."""
    workers: int = Field(default_factory=_default_workers, ge=1)
    """CPU job slots."""
    gpus: list[int] = Field(default_factory=list)
    """GPU ids (CUDA device numbers) with one model job slot each, beside the CPU slots; [] = no GPU."""
    job_timeout_s: float = Field(3600.0, gt=0)
    job_nice: int = Field(10, ge=0, le=19)
    """Niceness of job and slot processes (and the processes they start), with the lowest I/O
    priority of the best-effort class when above 0: receiving and the node's own work come first
    when the CPUs or the disk are busy (bench/README.md, soak).  0 = as the node."""
    job_retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(max_attempts=3, backoff_base_s=30, backoff_max_s=900))
    dispatch_retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(max_attempts=10, backoff_base_s=30, backoff_max_s=3600)
    )
    rules: Path = Path("routing_rules.yaml")
    profiles: Path = Path("profiles")
    share: ShareConfig = Field(default_factory=ShareConfig)
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    allowed_calling_aes: list[AllowedAE] = Field(default_factory=list)
    known_aes: dict[str, KnownAE] = Field(default_factory=dict)
    max_associations: int = Field(10, ge=1)
    timeouts: NetworkTimeouts = Field(default_factory=NetworkTimeouts)
    limits: ConnectionLimitsConfig = Field(default_factory=ConnectionLimitsConfig)
    spool_retention_days: float = Field(7.0, ge=0)
    duplicates: Literal["keep_first", "keep_last", "quarantine"] = "keep_first"
    """A SOP instance re-sent with *different* content: keep the first copy, replace it by the new
    one (the series is processed again), or keep the first and quarantine the second.  Either way
    it is logged as a warning naming what differs and counted on the series."""
    file_mode: int = 0o640
    """Mode of every file the node writes (spool, quarantine, results, share): patient data."""
    dir_mode: int = 0o750
    """Mode of the folders it creates."""
    log_phi: bool = False
    tls: TLSConfig | None = None
    """DICOM TLS (none: plain DICOM only)."""
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    """The operations console (web pages and API)."""
    """Log patient names, IDs, dates and share paths made of them (default: UIDs and job ids only)."""
    disk: DiskConfig = Field(default_factory=DiskConfig)
    incomplete_series_wait_s: float = Field(3600.0, ge=0)
    """A series with instances refused for want of resources waits this long for them to be sent
    again before it is completed anyway, marked incomplete."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    """Where jobs run (``kind: local``: the worker pool's processes; ``kind: dask``: a Dask cluster)."""

    @model_validator(mode="after")
    def _gpus_belong_to_dask_workers(self) -> "NodeConfig":
        if self.executor.kind == "dask" and self.gpus:
            raise ValueError("gpus: with executor kind dask the GPUs belong to the Dask workers "
                             "(dicom-node worker --gpus N); remove gpus from node.yaml")
        return self

    @property
    def early_start_enabled(self) -> bool:
        """Whether series are started early (``0 < early_start_s < quiet_period_s``)."""
        return 0 < self.early_start_s < self.quiet_period_s

    #: the configuration file this was loaded from (None: embedded defaults)
    config_path: Path | None = Field(default=None, exclude=True)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae(v))

    @field_validator("port")
    @classmethod
    def _listen_port(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError(f"must be 1..65535, or 0 for any free port (got {v})")
        return v

    @field_validator("file_mode", "dir_mode", mode="before")
    @classmethod
    def _modes(cls, v: Any) -> int:
        return _mode(v)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("gpus")
    @classmethod
    def _gpu_ids(cls, v: list[int]) -> list[int]:
        if any(g < 0 for g in v):
            raise ValueError(f"GPU ids must be >= 0 (got {v})")
        if len(set(v)) != len(v):
            raise ValueError(f"GPU ids must be unique (got {v})")
        return v

    @field_validator("destinations")
    @classmethod
    def _dest_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "origin" in v:
            raise ValueError("'origin' is reserved (it means: send back to the calling AE, see known_aes)")
        return v

    # -- derived paths -------------------------------------------------
    @property
    def data_root(self) -> Path:
        """Where spool, quarantine and results live: ``shared_storage``, else ``storage``."""
        return self.shared_storage if self.shared_storage is not None else self.storage

    @property
    def spool_dir(self) -> Path:
        """Where received instances are written: ``<data_root>/spool/<study>/<series>/<sop>.dcm``."""
        return self.data_root / "spool"

    @property
    def results_dir(self) -> Path:
        """Job results: ``<data_root>/results/<job id>/`` and ``<job id>-seg.dcm``."""
        return self.data_root / "results"

    @property
    def database_path(self) -> Path:
        """The SQLite job store: ``<storage>/node.db``, or the file of a ``sqlite:///`` store url."""
        url = self.store.url
        if url and url.startswith("sqlite:///"):
            return Path(url[len("sqlite:///"):])
        return self.storage / "node.db"

    @property
    def database_url(self) -> str:
        """What :class:`node.store.Store` opens: the PostgreSQL URL, else the SQLite file."""
        return str(self.store.url) if self.store.postgres else str(self.database_path)

    @property
    def quarantine_dir(self) -> Path:
        """Refused instances with a ``.reason.txt`` next to each: ``<data_root>/quarantine/``."""
        return self.data_root / "quarantine"

    def destination(self, name: str) -> Destination | StowDestination:
        """The named destination; raises :class:`ConfigError` naming the unknown destination."""
        try:
            return self.destinations[name]
        except KeyError:
            raise ConfigError(
                f"unknown destination {name!r} (known: {', '.join(sorted(self.destinations)) or 'none'})",
                path=self.config_path or DEFAULT_CONFIG_NAME,
                tag="destinations",
            ) from None

    def origin_destination(self, calling_ae: str) -> Destination | None:
        """Address to send results back to ``calling_ae`` (from ``known_aes``), or None if unknown."""
        known = self.known_aes.get(calling_ae.strip())
        if known is None:
            return None
        return Destination(ae_title=known.ae_title or calling_ae.strip(), host=known.host, port=known.port)


def _format_error(err: ErrorDetails) -> tuple[str, str]:
    parts = list(err.get("loc", ()))
    if len(parts) >= 3 and parts[0] == "destinations" and parts[2] in ("dimse", "stow"):
        del parts[2]  # the destination union's tag is no key of the file
    loc = ".".join(str(p) for p in parts)
    typ = err.get("type", "")
    if typ == "extra_forbidden":
        return loc, "unknown key"
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return loc, msg


def _resolve(p: Path, base: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p)


def load_config(path: str | Path | None = None) -> NodeConfig:
    """Load and validate ``node.yaml``; ``None`` returns the embedded defaults.

    Relative paths are made absolute against the folder of the configuration file (with
    no file: the current working directory): ``storage``, ``share.root`` (left at its
    default while ``storage`` is set: ``<storage>/share``), ``models.root``,
    ``models.totalseg_weights``, ``models.totalseg_home``, and ``rules`` / ``profiles``
    when given; left at their defaults, ``rules`` and ``profiles`` are the first that exists
    of that folder, the working directory and the repository root, so that ``dicom-node
    serve`` without a config finds the shipped ``routing_rules.yaml`` and ``profiles/``.

    Raises :class:`ConfigError` (an :class:`~node.errors.InputError`) with a one-line
    message naming the file and the field.

    Usage: ``cfg = load_config("node.yaml")``, then ``cfg.spool_dir``, ``cfg.database_path``,
    ``cfg.destinations["pacs"].port``.
    """
    where = Path(path) if path is not None else Path(DEFAULT_CONFIG_NAME)
    # The embedded defaults mirror the documented example: a local PACS (Orthanc's
    # default AE/port) named ``pacs``, the destination the shipped rules send to.
    data: Any = {"destinations": {"pacs": dict(EMBEDDED_PACS)}}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration: {exc.strerror or exc}", path=where) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {' '.join(str(exc).split())}", path=where) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"must be a mapping of keys to values (got {type(data).__name__})", path=where)
        if "config_path" in data:
            raise ConfigError("unknown key", path=where, tag="config_path")
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        loc, msg = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConfigError(msg + more, path=where, tag=loc or None) from None

    explicit = set(data)
    if path is not None:
        base = Path(path).resolve().parent
        cfg.config_path = Path(path).resolve()
    else:
        base = Path.cwd()
    cfg.storage = _resolve(cfg.storage, base)
    if cfg.shared_storage is not None:
        cfg.shared_storage = _resolve(cfg.shared_storage, base)
    if cfg.store.url and cfg.store.url.startswith("sqlite:///"):
        cfg.store.url = "sqlite:///" + str(_resolve(Path(cfg.store.url[len("sqlite:///"):]), base))
    share_root_given = isinstance(data.get("share"), dict) and "root" in data["share"]
    if share_root_given or "storage" not in explicit:
        cfg.share.root = _resolve(cfg.share.root, base)
    else:  # storage moved, share root left at its default: keep it under storage
        cfg.share.root = cfg.storage / "share"
    for attr in ("root", "totalseg_weights", "totalseg_home"):
        value = getattr(cfg.models, attr)
        if value is not None:
            setattr(cfg.models, attr, _resolve(value, base))
    if cfg.tls is not None:
        for attr in ("certificate", "key", "ca_certificates"):
            value = getattr(cfg.tls, attr)
            if value is None:
                continue
            resolved = _resolve(value, base)
            if not resolved.is_file():
                raise ConfigError(f"no such file: {resolved}", path=where, tag=f"tls.{attr}")
            setattr(cfg.tls, attr, resolved)
    for attr in ("certificate", "key"):
        value = getattr(cfg.http, attr)
        if value is not None:
            resolved = _resolve(value, base)
            if not resolved.is_file():
                raise ConfigError(f"no such file: {resolved}", path=where, tag=f"http.{attr}")
            setattr(cfg.http, attr, resolved)
    for key in ("rules", "profiles"):
        value = getattr(cfg, key)
        if key in explicit:
            setattr(cfg, key, _resolve(value, base))
            continue
        candidates = [_resolve(value, base), _resolve(value, Path.cwd()), _resolve(value, REPO_ROOT)]
        chosen = next((c for c in candidates if c.exists()), candidates[0])
        setattr(cfg, key, chosen)
    return cfg
