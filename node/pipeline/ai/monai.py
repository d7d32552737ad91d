"""MONAI backend: a MONAI bundle folder (model-zoo layout, its own pre- and postprocessing) or a
TorchScript model with MONAI's sliding-window inference; models are cached per process.

Profile section ``model:`` (bundle, or torchscript with window, spacing, roi_size, ...): see
``profiles/ai/spleen_monai.yaml`` and ``docs/ai-backends.md``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import monai  # noqa: F401  - a missing package makes backends.get_backend say how to install it
from node.errors import BackendUnavailable, InputError
from node.pipeline.ai import common as ai_common
from node.pipeline.volume import Volume
from node.profiles import MonaiModel, Profile

if TYPE_CHECKING:  # for annotations only: torch is imported where it is used
    import torch

log = logging.getLogger(__name__)

_cache: "OrderedDict[tuple, Any]" = OrderedDict()
_cache_lock = threading.Lock()
_MAX_MODELS = 2


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# -- orientation ------------------------------------------------------------------------------


def to_ras(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data in RAS (x, y, z), RAS affine, orientation transform back to the volume)``.

    What MONAI models trained with ``LoadImaged`` + ``Orientationd(axcodes="RAS")`` expect; a
    permutation/flip of the axes, no interpolation, undone by :func:`from_ras`."""
    import nibabel as nib
    from nibabel import orientations as ornt

    data = volume.array.transpose(2, 1, 0)  # [i, j, k]
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    src = ornt.io_orientation(aff)
    to = ornt.ornt_transform(src, ornt.axcodes2ornt("RAS"))
    ras = ornt.apply_orientation(data, to)
    ras_aff = aff @ ornt.inv_ornt_aff(to, data.shape)
    back = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), src)
    del nib
    return np.ascontiguousarray(ras, dtype=np.float32), ras_aff, back


def from_ras(label_ras: np.ndarray, back: np.ndarray) -> np.ndarray:
    """A RAS ``(x, y, z)`` label map back on the volume grid ``[k, j, i]``."""
    from nibabel import orientations as ornt

    return np.ascontiguousarray(ornt.apply_orientation(label_ras, back).transpose(2, 1, 0))


def prepare_input(volume: Volume, settings: MonaiModel) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Model input ``(1, x, y, z)`` float32 in [0, 1] (window, optional resampling) and how to go back.

    Public so that a model can be trained on exactly what the backend will feed it.
    """
    from monai.transforms import ScaleIntensityRange

    ras, ras_aff, back = to_ras(volume)
    shape = ras.shape
    if settings.spacing is not None:
        from scipy import ndimage

        cur = np.linalg.norm(ras_aff[:3, :3], axis=0)
        zoom = cur / np.asarray(settings.spacing, float)
        ras = ndimage.zoom(ras, zoom, order=1)
    if settings.window is None:  # the profile schema requires it with torchscript
        raise ValueError("model: window is not set")
    lo, hi = settings.window
    x = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(ras[None])
    return np.asarray(x, dtype=np.float32), back, shape


def _labels_to_grid(label: np.ndarray, ras_shape: tuple[int, ...]) -> np.ndarray:
    if label.shape == tuple(ras_shape):
        return label
    from scipy import ndimage

    zoom = np.asarray(ras_shape, float) / np.asarray(label.shape, float)
    out = ndimage.zoom(label, zoom, order=0)
    return out[: ras_shape[0], : ras_shape[1], : ras_shape[2]]


# -- TorchScript ------------------------------------------------------------------------------


def _cached(key: tuple, what: str, load: Callable[[], Any]) -> Any:
    """The model for ``key`` from this process's LRU cache, loading it with ``load`` on a miss."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    t0 = time.perf_counter()
    model = load()
    log.info("MONAI %s loaded in %.2f s", what, time.perf_counter() - t0)
    with _cache_lock:
        _cache[key] = model
        while len(_cache) > _MAX_MODELS:
            _cache.popitem(last=False)
    return model


def _torchscript(path: Path, device: torch.device) -> Any:
    import torch

    key = ("ts", str(path.resolve()), path.stat().st_mtime, str(device))
    return _cached(key, f"TorchScript {path}", lambda: torch.jit.load(str(path), map_location=device).eval())


def _model_path(settings: MonaiModel) -> Path:
    """The bundle folder, else the TorchScript file (the profile sets exactly one); it must exist."""
    if settings.bundle:
        return ai_common.require_path(ai_common.resolve_model_path(settings.bundle), "MONAI bundle folder")
    if settings.torchscript is None:
        raise ValueError("model: neither bundle nor torchscript is set")  # the profile schema prevents this
    return ai_common.require_path(ai_common.resolve_model_path(settings.torchscript), "MONAI TorchScript model")


def predict_torchscript(volume: Volume, settings: MonaiModel) -> np.ndarray:
    import torch
    from monai.inferers import sliding_window_inference

    path = _model_path(settings)
    device = ai_common.select_device(settings.device)
    model = _torchscript(path, device)
    x, back, ras_shape = prepare_input(volume, settings)
    with torch.inference_mode(), ai_common.no_network():
        t = torch.from_numpy(x)[None].to(device)
        logits = sliding_window_inference(t, roi_size=settings.roi_size, sw_batch_size=settings.sw_batch_size,
                                          predictor=model, overlap=settings.overlap, mode="gaussian")
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"TorchScript model {path} returned {type(logits).__name__}, not a tensor of logits")
        label = torch.argmax(logits, dim=1)[0].to(torch.uint8).cpu().numpy()
    return from_ras(_labels_to_grid(label, ras_shape), back)


# -- bundle -----------------------------------------------------------------------------------


class _Bundle:
    def __init__(self, root: Path, device: torch.device) -> None:
        import torch
        from monai.bundle import ConfigParser

        cfg_file = next((root / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")
                         if (root / "configs" / n).exists()), None)
        if cfg_file is None:
            raise BackendUnavailable(f"MONAI bundle {root}: configs/inference.json not found")
        parser = ConfigParser()
        parser.read_config(str(cfg_file))
        meta = root / "configs" / "metadata.json"
        if meta.exists():
            parser.read_meta(str(meta))
        parser["bundle_root"] = str(root)
        parser["device"] = str(device)
        parser["output_dir"] = tempfile.gettempdir()
        for k in ("network_def", "preprocessing", "inferer"):
            if k not in parser:
                raise BackendUnavailable(f"MONAI bundle {root}: {cfg_file.name} has no '{k}'")
        self.network = parser.get_parsed_content("network_def", instantiate=True).to(device)
        weights = next((root / "models" / n for n in ("model.pt", "model.pth") if (root / "models" / n).exists()), None)
        if weights is None:
            raise BackendUnavailable(f"MONAI bundle {root}: models/model.pt not found")
        state = torch.load(str(weights), map_location=device, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        self.network.load_state_dict(state)
        self.network.eval()
        self.preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        self.inferer = parser.get_parsed_content("inferer", instantiate=True)
        self.postprocessing = None
        if "postprocessing" in parser:
            from monai.transforms import Compose, SaveImaged

            post = parser.get_parsed_content("postprocessing", instantiate=True)
            kept = [t for t in getattr(post, "transforms", [post]) if not isinstance(t, SaveImaged)]
            self.postprocessing = Compose(kept)
        self.device = device
        self.lock = threading.Lock()


def _bundle(root: Path, device: torch.device) -> _Bundle:
    return _cached(("bundle", str(root.resolve()), str(device)), f"bundle {root}", lambda: _Bundle(root, device))


def predict_bundle(volume: Volume, settings: MonaiModel) -> np.ndarray:
    """The bundle's label map on the volume grid: its own preprocessing on a temporary NIfTI of the
    volume and its own postprocessing (``SaveImaged`` removed); its output must come back on the
    input grid (``Invertd`` in the bundle when it resamples)."""
    import nibabel as nib
    import torch
    from monai.data import decollate_batch

    root = _model_path(settings)
    device = ai_common.select_device(settings.device)
    b = _bundle(root, device)
    img = nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32),
                          np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine)
    with tempfile.TemporaryDirectory(prefix="monai-") as tmp, b.lock, torch.inference_mode(), \
            ai_common.no_network():
        f = Path(tmp) / "image.nii.gz"
        nib.save(img, f)
        data = b.preprocessing({"image": str(f)})
        x = data["image"][None].to(device)
        data["pred"] = b.inferer(x, b.network)[0]
        if b.postprocessing is not None:
            data = b.postprocessing(data)
        pred = data["pred"]
        pred = pred.detach().cpu().numpy() if hasattr(pred, "detach") else np.asarray(pred)
    del decollate_batch
    if pred.ndim == 4:
        pred = np.argmax(pred, axis=0) if pred.shape[0] > 1 else pred[0]
    label = np.rint(pred).astype(np.uint16)
    want = volume.array.shape[::-1]
    if label.shape != want:
        raise InputError(f"MONAI bundle {root} returned shape {label.shape}, expected {want} (the input grid); "
                         "add Invertd to its postprocessing when it resamples")
    return np.ascontiguousarray(label.transpose(2, 1, 0))


class MonaiBackend:
    """MONAI inference (bundle or TorchScript) driven by the profile's ``model:`` section."""

    def check(self, profile: Profile) -> None:
        settings: MonaiModel = ai_common.model_section(profile, MonaiModel)
        _model_path(settings)
        ai_common.profile_tissue_labels(profile)

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        settings: MonaiModel = ai_common.model_section(profile, MonaiModel)
        wanted = ai_common.profile_tissue_labels(profile)
        ai_common.prepare_torch(settings.threads)
        label = predict_bundle(volume, settings) if settings.bundle else predict_torchscript(volume, settings)
        return ai_common.tissue_masks(label, wanted)

    def run_info(self) -> dict[str, Any]:
        """Nothing beyond the report: this backend keeps no state between runs."""
        return {}
