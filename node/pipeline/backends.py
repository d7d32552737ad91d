"""Segmentation backends behind one interface.

A backend takes a :class:`~node.pipeline.volume.Volume` and a
:class:`~node.profiles.Profile` and returns one boolean mask per tissue on the
volume grid.  Backends are looked up by the profile's ``model_type`` (or a rule's
override) and imported lazily, so the HU backend works without any AI package.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from node.errors import BackendUnavailable, ProfileError
from node.pipeline.volume import Volume
from node.profiles import MODEL_TYPES, Profile


class Backend(Protocol):
    """What every backend implements."""

    name: str

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        """Return ``{tissue name: bool mask shaped like volume.array}`` for every tissue.

        A backend that computes tissues one after another sets ``streams_masks = True``
        and accepts ``on_mask=callable(name, mask)``, called as each mask is final, so the
        pipeline can mesh a tissue while the next one is segmented.
        """


#: model_type -> (module, class, pip extra that installs its dependencies)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "hu_based": ("node.pipeline.hu.backend", "HUBackend", None),
    "totalsegmentator": ("node.pipeline.ai.totalseg", "TotalSegmentatorBackend", "totalseg"),
    "nnunet": ("node.pipeline.ai.nnunet", "NnUNetBackend", "nnunet"),
    "monai": ("node.pipeline.ai.monai", "MonaiBackend", "monai"),
}


def get_backend(model_type: str) -> Backend:
    """Instantiate the backend for ``model_type``.

    Raises:
        ProfileError: unknown model type.
        BackendUnavailable: the backend's package is not installed; the message says
            which ``pip install`` command fixes it.
    """
    if model_type not in _REGISTRY:
        raise ProfileError(f"model_type '{model_type}' is not allowed; allowed: {', '.join(MODEL_TYPES)}")
    module, cls, extra = _REGISTRY[model_type]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        hint = (f"pip install torch==2.13.0 && pip install -e '.[{extra}]' -c constraints.txt "
                "(in the dicom-node checkout; see docs/ai-backends.md)" if extra else "reinstall dicom-seg-node")
        raise BackendUnavailable(
            f"backend '{model_type}' is not available ({exc.name} is not installed): run {hint}"
        ) from None
    return getattr(mod, cls)()


def check_profile(profile: Profile, backend: str | None = None) -> str | None:
    """Why ``profile`` cannot run here with ``backend`` (default: its model_type), or None.

    Reports a missing package (with the install command) and, for AI backends, a missing
    model folder or weights and structure names the model does not have.
    """
    from node.errors import NodeError

    try:
        be = get_backend(backend or profile.model_type)
        check = getattr(be, "check", None)
        if check is not None:
            check(profile)
    except NodeError as exc:
        return str(exc)
    return None
