"""nnU-Net v2 backend: a trained results folder run in-process with ``nnUNetPredictor``, the
predictor kept in a small per-process LRU cache (:func:`get_predictor`) so that consecutive jobs
with the same model skip the cold load.

Profile section ``model:`` (folder, configuration, folds, device): see
``profiles/ai/pancreas_nnunet.yaml`` and ``docs/ai-backends.md``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node.errors import BackendUnavailable, InputError
from node.pipeline.ai import common as ai_common
from node.pipeline.orientation import check_codes, to_orientation
from node.pipeline.volume import Volume
from node.profiles import NnUNetModel, Profile

import nnunetv2  # noqa: F401  - a missing package makes backends.get_backend say how to install it

if TYPE_CHECKING:  # for annotations only: torch is imported where it is used
    import torch

log = logging.getLogger(__name__)


def _cache_limits() -> tuple[int, float]:
    """At most ``DICOM_NODE_MODEL_CACHE`` models (default 2) and ``DICOM_NODE_MODEL_CACHE_MB`` MB
    of weights (default 4096) stay cached."""
    return (int(os.environ.get("DICOM_NODE_MODEL_CACHE", "2")),
            float(os.environ.get("DICOM_NODE_MODEL_CACHE_MB", "4096")))


class _Entry:
    def __init__(self, predictor: Any, mb: float, load_s: float) -> None:
        self.predictor = predictor
        self.mb = mb
        self.load_s = load_s
        self.lock = threading.Lock()


_cache: "OrderedDict[tuple, _Entry]" = OrderedDict()
_cache_lock = threading.Lock()


_last_run: dict[str, Any] = {}


def last_run_info() -> dict[str, Any]:
    """What the last :func:`predict_label_map` in this process used: ``model_cache`` ('hit' | 'miss'),
    ``load_s`` (0.0 on a hit), ``device``, ``cached_models`` (the worker adds it to the job report)."""
    return dict(_last_run)


def clear_cache() -> None:
    """Drop every cached predictor (tests, memory pressure)."""
    with _cache_lock:
        _cache.clear()


def cached_models() -> list[tuple]:
    """Keys of the predictors currently cached (most recently used last)."""
    with _cache_lock:
        return list(_cache)


def label_names(folder: Path) -> dict[str, int]:
    """``{structure name: label id}`` from the model's ``dataset.json`` (int labels only)."""
    data = json.loads((folder / "dataset.json").read_text())
    return {str(k): int(v) for k, v in data.get("labels", {}).items() if isinstance(v, int)}


DEFAULT_ORIENTATION = "LAS"
"""What a model folder that does not say was trained on: dcm2niix's storage of axial images."""


def input_orientation(settings: NnUNetModel, folder: Path) -> str:
    """The storage orientation the model was trained on: the profile's ``input_orientation``, else
    the model's ``dataset.json`` ``input_orientation`` (``dicom-node dataset export`` writes it),
    else :data:`DEFAULT_ORIENTATION`."""
    if settings.input_orientation:
        return settings.input_orientation
    data = json.loads((folder / "dataset.json").read_text())
    stated = data.get("input_orientation")
    if stated:
        try:
            return check_codes(str(stated))
        except ValueError as exc:
            raise InputError(f"{folder / 'dataset.json'}: input_orientation: {exc}", tag="input_orientation") from None
    return DEFAULT_ORIENTATION


def check_model(settings: NnUNetModel) -> Path:
    """The model folder, or :class:`BackendUnavailable` saying what is missing."""
    folder = ai_common.require_path(ai_common.resolve_model_path(settings.folder), "nnU-Net model folder",
                                    "copy the trained results folder (dataset.json, plans.json, fold_N/) there")
    for name in ("dataset.json", "plans.json"):
        ai_common.require_path(folder / name, f"nnU-Net {name}")
    for f in settings.folds:
        ai_common.require_path(folder / f"fold_{f}" / settings.checkpoint, f"nnU-Net checkpoint of fold {f}")
    return folder


def _build_predictor(folder: Path, settings: NnUNetModel, device: torch.device) -> Any:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=settings.step_size,
        use_gaussian=True,
        use_mirroring=settings.mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    folds = tuple(f if f == "all" else int(f) for f in settings.folds)
    try:
        predictor.initialize_from_trained_model_folder(str(folder), folds, settings.checkpoint)
    except (RuntimeError, ImportError) as exc:
        if "torchvision" in str(exc) or isinstance(exc, ImportError):
            raise BackendUnavailable(
                f"nnU-Net could not load the trainer class of {folder}: {exc}. A CUDA torchvision next to the "
                "CPU torch breaks nnU-Net's trainer lookup; see docs/ai-backends.md") from None
        raise
    if predictor.trainer_name is None:  # pragma: no cover
        raise BackendUnavailable(f"nnU-Net trainer of {folder} not found")
    return predictor


def get_predictor(settings: NnUNetModel, device: torch.device | None = None) -> tuple[Any, _Entry, bool]:
    """The cached predictor for ``settings`` (built on first use); returns (predictor, entry, was_cached)."""
    ai_common.prepare_torch(settings.threads)
    device = device or ai_common.select_device(settings.device)
    folder = check_model(settings)
    key = (str(folder.resolve()), settings.configuration, tuple(settings.folds), settings.checkpoint,
           str(device), settings.step_size, settings.mirroring)
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry.predictor, entry, True
    t0 = time.perf_counter()
    predictor = _build_predictor(folder, settings, device)
    mb = sum(p.numel() * p.element_size() for p in predictor.network.parameters()) / 1e6
    mb *= max(1, len(predictor.list_of_parameters))
    entry = _Entry(predictor, mb, time.perf_counter() - t0)
    max_n, max_mb = _cache_limits()
    with _cache_lock:
        _cache[key] = entry
        while len(_cache) > max(1, max_n) or (
                len(_cache) > 1 and sum(e.mb for e in _cache.values()) > max_mb):
            old, _ = _cache.popitem(last=False)
            log.info("nnU-Net model cache: evicted %s", old[0])
    log.info("nnU-Net model %s loaded in %.2f s (%.1f MB weights, device %s)", folder, entry.load_s, mb, device)
    return predictor, entry, False


def predict_label_map(volume: Volume, settings: NnUNetModel) -> np.ndarray:
    """The model's label map on the volume grid (``[k, j, i]``, uint8/uint16).

    Same steps as ``nnUNetPredictor.predict_single_npy_array`` (the configuration's
    preprocessor ``run_case_npy``, ``predict_logits_from_preprocessed_data``,
    ``convert_predicted_logits_to_segmentation_with_correct_shape``) but in this process:
    nnU-Net's adapter starts a background process per call, which cost seconds per job.

    Axes: nnU-Net's default reader is SimpleITK, whose array is ``[z, y, x]`` with spacing
    ``[sz, sy, sx]``, the NIfTI's voxel order: a model learns the storage orientation of its
    training NIfTIs.  The volume is brought to that orientation (:func:`input_orientation`) by
    axis flips and permutations, handed over as ``[k, j, i]``, and the segmentation is brought
    back the same way, exactly.
    """
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    predictor, entry, was_cached = get_predictor(settings)
    _last_run.clear()
    _last_run.update(model_cache="hit" if was_cached else "miss", load_s=0.0 if was_cached else round(entry.load_s, 3),
                     device=str(getattr(predictor, "device", "")), cached_models=len(cached_models()))
    oriented = to_orientation(volume.array, volume.affine, input_orientation(settings, check_model(settings)))
    _last_run.update(input_orientation=oriented.codes)
    si, sj, sk = oriented.spacing
    data = np.ascontiguousarray(oriented.array, dtype=np.float32)[None]
    with entry.lock, ai_common.no_network():
        pre = predictor.configuration_manager.preprocessor_class(verbose=False)
        x, _, props = pre.run_case_npy(data, None, {"spacing": [sk, sj, si]}, predictor.plans_manager,
                                       predictor.configuration_manager, predictor.dataset_json)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(x)).cpu()
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props,
            return_probabilities=False)
    seg = oriented.back(np.asarray(seg))
    if seg.shape != volume.shape:
        raise InputError(f"nnU-Net returned shape {seg.shape}, volume is {volume.shape}")
    return seg


class NnUNetBackend:
    """nnU-Net v2 inference driven by the profile's ``model:`` section."""

    def check(self, profile: Profile) -> None:
        """Raise when the profile's model cannot run here (package, folder, labels)."""
        settings: NnUNetModel = ai_common.model_section(profile, NnUNetModel)
        folder = check_model(settings)
        ai_common.profile_tissue_labels(profile, label_names(folder))

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        _last_run.clear()  # a long-lived slot process: nothing stale from an earlier job's prediction
        settings: NnUNetModel = ai_common.model_section(profile, NnUNetModel)
        folder = check_model(settings)
        wanted = ai_common.profile_tissue_labels(profile, label_names(folder))
        label_map = predict_label_map(volume, settings)
        return ai_common.tissue_masks(label_map, wanted)

    def run_info(self) -> dict[str, Any]:
        """The model cache this process used for the last prediction (see :func:`last_run_info`)."""
        return last_run_info()
