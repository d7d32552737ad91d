"""The segment step: a backend's mask for every tissue of the profile, handed on one by one
where the backend streams them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from node.errors import InputError
from node.pipeline.backends import Backend, is_streaming
from node.pipeline.volume import Volume
from node.profiles import Profile


def segment(
    backend: Backend,
    volume: Volume,
    profile: Profile,
    phase: str,
    on_mask: Callable[[str, np.ndarray], None],
) -> dict[str, np.ndarray]:
    """``{tissue: mask}`` from ``backend``.  A streaming backend calls ``on_mask(name, mask)`` as
    each mask is final; for the others the caller hands the masks on once they are all there."""
    if is_streaming(backend):
        return backend.segment(volume, profile, phase=phase, on_mask=on_mask)
    return backend.segment(volume, profile, phase=phase)


def check_masks(masks: dict[str, np.ndarray], profile: Profile, model_type: str) -> None:
    """Raise :class:`InputError` when the backend returned no mask for one of the profile's tissues."""
    missing = [t.name for t in profile.result_tissues if t.name not in masks]
    if missing:
        raise InputError(f"backend {model_type} returned no mask for tissue(s) {', '.join(missing)}")


def voxel_report(mask: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """A tissue's entries in ``report.json`` from its mask: voxels and their volume."""
    n = int(np.count_nonzero(mask))
    return {"voxels": n, "volume_ml_voxels": round(n * voxel_ml, 3)}
