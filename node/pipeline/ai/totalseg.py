"""TotalSegmentator backend: ``totalsegmentator.python_api.totalsegmentator`` called in-process,
offline (weights checked first, usage statistics off, :func:`~node.pipeline.ai.common.no_network`).

Profile section ``model:`` (task, fast, roi_subset, device, weights): see
``profiles/ai/brain_totalseg.yaml`` and ``docs/ai-backends.md``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

import totalsegmentator  # noqa: F401  - a missing package makes backends.get_backend say how to install it
from node.errors import BackendUnavailable
from node.pipeline.ai import common as ai_common
from node.pipeline.volume import Volume
from node.profiles import Profile, TotalSegmentatorModel

if TYPE_CHECKING:  # nibabel (one of TotalSegmentator's packages) is imported where it is used
    import nibabel as nib

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_call_lock = threading.Lock()  # TotalSegmentator reads/writes process-wide env and config


def weights_dir(settings: TotalSegmentatorModel | None = None) -> Path:
    """The weights folder TotalSegmentator will read (the node sets TOTALSEG_WEIGHTS_PATH to it)."""
    if settings is not None and settings.weights:
        return ai_common.resolve_model_path(settings.weights)
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"]) / "nnunet" / "results"
    return ai_common.models_root() / "totalsegmentator"


def home_dir() -> Path:
    """TotalSegmentator's home (config.json): TOTALSEG_HOME_DIR or <models root>/totalsegmentator_home."""
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"])
    return ai_common.models_root() / "totalsegmentator_home"


def ensure_offline_config(home: Path) -> Path:
    """Write/patch ``config.json`` so TotalSegmentator never sends usage statistics."""
    home.mkdir(parents=True, exist_ok=True)
    cfg_file = home / "config.json"
    cfg = {}
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError:
            cfg = {}
    want = {"send_usage_stats": False, "statistics_disclaimer_shown": True}
    if any(cfg.get(k) != v for k, v in want.items()) or "prediction_counter" not in cfg or "totalseg_id" not in cfg:
        cfg.setdefault("totalseg_id", "totalseg_dicomnode")
        cfg.setdefault("prediction_counter", 0)
        cfg.update(want)
        tmp = cfg_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=4))
        os.replace(tmp, cfg_file)
    return cfg_file


def required_folders(settings: TotalSegmentatorModel) -> list[Path]:
    """Weights folders the task needs (the task model, plus the 6 mm crop model for roi_subset)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    cfg = get_task_config(settings.task, fast=settings.fast, quiet=True)
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    if settings.roi_subset and cfg.get("crop") is None and not settings.task.endswith("_mr"):
        ids.append(298)
    elif cfg.get("crop") is not None or cfg.get("cascade"):
        ids.append(cfg.get("crop_model") or 298)
    out = []
    root = weights_dir(settings)
    for tid in ids:
        if not isinstance(tid, int) or tid not in TASK_ID_WEIGHTS_CONFIGS:
            continue
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        rel = Path(info.get("rel_path") or "") / info["foldername"]
        out.append(root / rel)
    return out


def check_weights(settings: TotalSegmentatorModel) -> None:
    """Raise :class:`BackendUnavailable` naming each missing weights folder and the offline import."""
    missing = [p for p in required_folders(settings) if not p.is_dir()]
    if missing:
        root = weights_dir(settings)
        raise BackendUnavailable(
            f"TotalSegmentator model for task {settings.task}{' --fast' if settings.fast else ''} is not installed: "
            f"expected folder {', '.join(str(p) for p in missing)}. The node never downloads; on a machine with "
            f"the weights zip run: TOTALSEG_WEIGHTS_PATH={root} totalseg_import_weights -i <weights.zip> "
            "(or copy the unpacked folder there)")


@functools.lru_cache(maxsize=1)
def snomed_mapping() -> dict[str, dict[str, tuple[str, str, str]]]:
    """``{structure: {"category": (value, scheme, meaning), "type": ..., "modifier": ...}}`` from
    TotalSegmentator's ``resources/totalsegmentator_snomed_mapping.csv``."""
    from importlib import resources

    text = resources.files("totalsegmentator").joinpath("resources/totalsegmentator_snomed_mapping.csv").read_text()
    out: dict[str, dict[str, tuple[str, str, str]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        entry = {}
        for key, prefix in (("category", "SegmentedPropertyCategoryCodeSequence"),
                            ("type", "SegmentedPropertyTypeCodeSequence"),
                            ("modifier", "SegmentedPropertyTypeModifierCodeSequence")):
            v = row.get(f"{prefix}.CodeValue") or ""
            if v:
                entry[key] = (v, row[f"{prefix}.CodingSchemeDesignator"], row[f"{prefix}.CodeMeaning"])
        out[row["Structure"]] = entry
    return out


def class_names(task: str) -> dict[str, int]:
    """``{structure name: label id}`` of the task's multilabel output."""
    from totalsegmentator.map_to_binary import class_map

    return {name: int(i) for i, name in class_map[task].items()}


def to_nifti(volume: Volume) -> nib.Nifti1Image:
    """The volume as a nibabel image (``[i, j, k]``, RAS affine = diag(-1, -1, 1) @ LPS affine).

    TotalSegmentator reorients to canonical and back itself, so its label map comes back on
    this grid (transposed back to ``[k, j, i]`` by the caller)."""
    import nibabel as nib

    data = np.ascontiguousarray(volume.array.transpose(2, 1, 0))
    if data.dtype != np.int16 and np.all(np.mod(data[::7, ::7, ::7], 1) == 0):
        data = data.astype(np.int16)
    img = nib.Nifti1Image(data, _LPS_TO_RAS @ volume.affine)
    img.header.set_xyzt_units("mm")
    return img


def _device_arg(settings: TotalSegmentatorModel) -> str:
    dev = ai_common.select_device(settings.device)
    if dev.type == "cuda":
        return f"gpu:{dev.index}" if dev.index is not None else "gpu"
    return "cpu"


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _cpu_count(n: int) -> Iterator[None]:
    """TotalSegmentator sets ``torch.set_num_threads(multiprocessing.cpu_count())`` on CPU; more
    torch threads than free cores are much slower (bench figures in docs/ai-backends.md), so it
    sees ``n`` cores."""
    import multiprocessing

    old = multiprocessing.cpu_count
    multiprocessing.cpu_count = lambda: n
    try:
        yield
    finally:
        multiprocessing.cpu_count = old


def run_totalsegmentator(img: nib.Nifti1Image, settings: TotalSegmentatorModel) -> nib.Nifti1Image:
    """Call TotalSegmentator on a nibabel image offline; returns its multilabel image."""
    ai_common.prepare_torch(settings.threads)
    check_weights(settings)
    device = _device_arg(settings)
    home = home_dir()
    ensure_offline_config(home)
    from totalsegmentator.python_api import totalsegmentator as ts

    n = settings.threads or ai_common.default_threads()
    import torch

    with _call_lock, _env(TOTALSEG_WEIGHTS_PATH=str(weights_dir(settings)), TOTALSEG_HOME_DIR=str(home)), \
            _cpu_count(n), ai_common.no_network(), contextlib.redirect_stdout(io.StringIO()):
        out = ts(img, None, ml=True, nr_thr_resamp=1, nr_thr_saving=1, fast=settings.fast, task=settings.task,
                 roi_subset=settings.roi_subset, quiet=True, device=device, skip_saving=True)
    if torch.get_num_threads() != n:  # TotalSegmentator restores its own setting; keep ours
        torch.set_num_threads(n)
    return out


class TotalSegmentatorBackend:
    """TotalSegmentator inference driven by the profile's ``model:`` section."""

    def check(self, profile: Profile) -> None:
        settings: TotalSegmentatorModel = ai_common.model_section(profile, TotalSegmentatorModel)
        check_weights(settings)
        ai_common.profile_tissue_labels(profile, class_names(settings.task))

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        settings: TotalSegmentatorModel = ai_common.model_section(profile, TotalSegmentatorModel)
        wanted = ai_common.profile_tissue_labels(profile, class_names(settings.task))
        seg = run_totalsegmentator(to_nifti(volume), settings)
        label_map = np.asarray(seg.dataobj).astype(np.uint16, copy=False).transpose(2, 1, 0)
        if label_map.shape != volume.shape:
            raise BackendUnavailable(f"TotalSegmentator returned shape {label_map.shape}, volume is {volume.shape}")
        return ai_common.tissue_masks(label_map, wanted)

    def run_info(self) -> dict[str, Any]:
        """Nothing beyond the report: this backend keeps no state between runs."""
        return {}
