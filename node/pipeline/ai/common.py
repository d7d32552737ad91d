"""Shared plumbing of the AI backends: where models live (:func:`models_root`), torch threads
and device (:func:`prepare_torch`, :func:`select_device`), no network while a patient is processed
(:func:`no_network`), and label maps to tissue masks (:func:`tissue_masks`).

Nothing here imports torch at module import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, TypeVar

import numpy as np
from pydantic import BaseModel

from node.errors import BackendUnavailable, InputError
from node.profiles import Profile

if TYPE_CHECKING:  # imported where used: importing this module must not load torch
    import torch

_Section = TypeVar("_Section", bound=BaseModel)

log = logging.getLogger(__name__)

_settings: dict[str, Any] = {"models_root": None, "threads": None, "device": None}


def configure(*, models_root: str | Path | None = None, threads: int | None = None,
              device: str | None = None) -> None:
    """Set node-wide defaults (called by the node from its configuration)."""
    if models_root is not None:
        _settings["models_root"] = Path(models_root)
    if threads is not None:
        _settings["threads"] = int(threads)
    if device is not None:
        _settings["device"] = device


def models_root() -> Path:
    """The folder model paths in profiles are relative to.

    Order: :func:`configure`, ``$DICOM_NODE_MODELS``, ``<repository>/models``.
    """
    if _settings["models_root"] is not None:
        return Path(_settings["models_root"])
    env = os.environ.get("DICOM_NODE_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "models"


def resolve_model_path(value: str | Path, what: str = "model") -> Path:
    """An absolute model path: absolute values as they are, relative ones under :func:`models_root`."""
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else models_root() / p


def require_path(path: Path, what: str, hint: str = "") -> Path:
    """Raise :class:`BackendUnavailable` naming ``path`` when it does not exist."""
    if not path.exists():
        extra = f"; {hint}" if hint else ""
        raise BackendUnavailable(f"{what} not found: expected {path} (models root {models_root()}, "
                                 f"set DICOM_NODE_MODELS){extra}")
    return path


def default_threads() -> int:
    """Torch intra-op threads: :func:`configure`, ``$DICOM_NODE_TORCH_THREADS``, else 1."""
    if _settings["threads"]:
        return int(_settings["threads"])
    return int(os.environ.get("DICOM_NODE_TORCH_THREADS", "1"))


_prepared = False
_prepare_lock = threading.Lock()


def _torchvision_shim() -> None:
    """Make ``import torchvision`` work when pip paired the CPU torch with a CUDA torchvision.

    PyPI's torchvision wheels are CUDA builds; next to the CPU torch their ``_C`` extension
    cannot load (``libtorch_cuda.so`` missing) and ``import torchvision`` then dies in
    ``_meta_registrations`` with "operator torchvision::nms does not exist".  nnU-Net imports
    every trainer module while it looks a trainer up by name, some of those import timm and
    timm imports torchvision, so every trainer but plain ``nnUNetTrainer`` (TotalSegmentator's
    ``nnUNetTrainer_4000epochs_NoMirroring`` included) failed to load.  When the extension cannot
    load we declare the two operator schemas torchvision registers fake kernels for, so the
    import succeeds; torchvision's compiled ops (nms, roi_align, ...) stay unavailable and raise
    if called - none of the backends uses them.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    lib_dir = Path(spec.origin).parent if spec and spec.origin else None
    so = next(iter(sorted(lib_dir.glob("_C*.so")))) if lib_dir else None
    if so is not None:
        try:
            torch.ops.load_library(str(so))
            return
        except (OSError, RuntimeError):
            pass
    try:
        torch.ops.torchvision.nms  # noqa: B018 - looked up for its error: it raises unless some library defined the op
        return
    except (AttributeError, RuntimeError):
        pass
    log.info("torchvision's compiled ops do not load with this torch (CUDA wheel next to a CPU torch); "
             "declaring their schemas so torchvision imports (its detection ops stay unavailable)")
    lib = torch.library.Library("torchvision", "DEF")  # kept alive below
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _settings["_tv_lib"] = lib


def prepare_torch(threads: int | None = None) -> None:
    """Thread counts, nnU-Net worker counts and the torchvision shim; idempotent."""
    global _prepared
    n = threads or default_threads()
    os.environ.setdefault("nnUNet_def_n_proc", str(n))
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(f"torch is not installed ({exc.name}): see docs/ai-backends.md "
                                 "(pip install torch==2.13.0, then the extra with -c constraints.txt)") from None
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    with _prepare_lock:
        if not _prepared:
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass  # already set once parallel work started
            _torchvision_shim()
            _prepared = True


#: set by the node in a GPU slot's processes to the physical GPU the slot owns (its only visible one)
GPU_SLOT_ENV = "NODE_GPU_SLOT"


def slot_device(requested: str, env: Mapping[str, str] | None = None) -> str:
    """The device name to use for ``requested`` in this process.

    In a node GPU slot (``NODE_GPU_SLOT`` set, ``CUDA_VISIBLE_DEVICES=<that GPU>``) the
    slot's GPU is the only one visible and is ``cuda:0`` here, whatever index a profile
    names: the scheduler, not the profile, decides which GPU runs a job.  Elsewhere the
    request is kept as is.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    slot_gpu = environ.get(GPU_SLOT_ENV)
    if slot_gpu is not None and requested.startswith("cuda:") and requested != "cuda:0":
        log.info("device %s requested; in this GPU slot (GPU %s) the device is cuda:0", requested, slot_gpu)
        return "cuda:0"
    return requested


def select_device(requested: str | None = None) -> torch.device:
    """``torch.device`` for ``requested`` (``auto``/``cpu``/``cuda``/``cuda:N``; default: node config, auto)."""
    import torch

    req = (requested or _settings["device"] or "auto").lower()
    if req == "gpu":
        req = "cuda"
    req = slot_device(req)
    if req == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {req!r} requested but CUDA is not available here "
                                     f"(torch {torch.__version__}); use device: cpu or auto")
        return torch.device(req)
    if req == "cpu":
        return torch.device("cpu")
    raise InputError(f"device {requested!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")


# -- no network during patient processing ---------------------------------------------------

_guard = threading.local()
_hook_installed = False


class NetworkBlocked(RuntimeError):
    """A library tried to open a network connection while a patient was being processed."""


def _is_ip_socket_event(event: str, args: tuple) -> bool:
    if event == "socket.getaddrinfo":
        return True  # name resolution is network traffic
    if event in ("socket.connect", "socket.sendto"):
        sock = args[0]
        family = getattr(sock, "family", None)
        # AF_UNIX (multiprocessing managers/queues inside nnU-Net and TotalSegmentator) is local IPC
        return family is None or int(family) in (socket.AF_INET, socket.AF_INET6)
    return False


def _guard_depth() -> int:
    """How many :func:`no_network` blocks this thread is in."""
    return getattr(_guard, "depth", 0)


def _audit(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto") and _guard_depth() \
            and _is_ip_socket_event(event, args):
        target = args[:2] if event == "socket.getaddrinfo" else (args[1] if len(args) > 1 else args)
        _guard.blocked.append(f"{event} {target!r}")
        raise NetworkBlocked(f"network access refused during patient processing: {event} {target!r}")


@contextlib.contextmanager
def no_network() -> Iterator[list[str]]:
    """Refuse every network (IPv4/IPv6) connection and name lookup by this thread inside the block.

    Local IPC over AF_UNIX sockets (multiprocessing managers used by nnU-Net) stays allowed.

    Yields the list of refused attempts (filled as they happen).  Libraries that swallow
    the exception (TotalSegmentator's usage statistics do) still never reach the network.
    """
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True
    _guard.depth = getattr(_guard, "depth", 0) + 1
    _guard.blocked = []
    try:
        yield _guard.blocked
    finally:
        _guard.depth -= 1
        if _guard.blocked:
            log.warning("blocked %d network attempt(s) during patient processing: %s",
                        len(_guard.blocked), "; ".join(_guard.blocked[:3]))


# -- label maps -> tissue masks ---------------------------------------------------------------


def tissue_masks(label_map: np.ndarray, tissue_labels: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """``{tissue: label_map in labels}`` (a tissue is the union of its model labels)."""
    out = {}
    lut_size = int(max([int(label_map.max()) + 1] + [max(v) + 1 for v in tissue_labels.values() if v]))
    for tissue, ids in tissue_labels.items():
        lut = np.zeros(lut_size, dtype=bool)
        lut[[i for i in ids if i >= 0]] = True
        out[tissue] = lut[label_map]
    return out


def profile_tissue_labels(profile: Profile, name_to_id: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Model label ids per tissue: ``labels`` plus ``structures`` looked up in ``name_to_id``."""
    out: dict[str, list[int]] = {}
    for t in profile.tissues:
        ids = list(t.labels)
        for s in getattr(t, "structures", []) or []:
            if name_to_id is None or s not in name_to_id:
                known = ", ".join(sorted(name_to_id)[:20]) if name_to_id else "none"
                raise InputError(f"tissue {t.name}: structure {s!r} is not a label of the model "
                                 f"(known: {known}{', ...' if name_to_id and len(name_to_id) > 20 else ''})",
                                 path=profile.source)
            ids.append(int(name_to_id[s]))
        if not ids:
            raise InputError(f"tissue {t.name}: no model labels (set labels: [ids] or structures: [names])",
                             path=profile.source)
        out[t.name] = ids
    return out


def model_section(profile: Profile, cls: type[_Section]) -> _Section:
    """The profile's ``model:`` section validated as ``cls`` (also when a rule overrides the backend)."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(profile.model)
    except ValidationError as exc:
        msgs = "; ".join(f"model.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                         for e in exc.errors())
        raise InputError(f"profile {profile.name} has no usable model section for this backend: {msgs}",
                         path=profile.source) from None
