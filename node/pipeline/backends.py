"""Segmentation backends behind one interface.

A backend takes a :class:`~node.pipeline.volume.Volume` and a
:class:`~node.profiles.Profile` and returns one boolean mask per tissue on the
volume grid.  Backends are looked up in :mod:`node.backend_registry` by the profile's
``model_type`` (or a rule's override) and imported lazily, so the HU backend works without
any AI package.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, TypeGuard

import numpy as np

from node.backend_registry import backend_spec
from node.errors import BackendUnavailable
from node.pipeline.volume import Volume
from node.profiles import Profile


class Backend(Protocol):
    """What every backend implements (registered in :mod:`node.backend_registry`)."""

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        """Return ``{tissue name: bool mask shaped like volume.array}`` for every tissue."""

    def run_info(self) -> dict[str, Any]:
        """What the last :meth:`segment` in this process used (e.g. model cache hit or miss,
        load time, device), for the job report; ``{}`` when there is nothing to say."""


class StreamingBackend(Backend, Protocol):
    """A backend that computes tissues one after another and says so with ``streams_masks = True``."""

    streams_masks: bool

    def segment(
        self,
        volume: Volume,
        profile: Profile,
        *,
        phase: str,
        on_mask: Callable[[str, np.ndarray], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """As :meth:`Backend.segment`, calling ``on_mask(name, mask)`` as each mask is final, so
        the pipeline can mesh a tissue while the next one is segmented."""


def is_streaming(backend: Backend) -> TypeGuard[StreamingBackend]:
    """Whether ``backend`` hands each mask on as it is final (a :class:`StreamingBackend`)."""
    return bool(getattr(backend, "streams_masks", False))


def get_backend(model_type: str) -> Backend:
    """Instantiate the backend for ``model_type``.

    Raises:
        ProfileError: unknown model type.
        BackendUnavailable: the backend's package is not installed; the message says
            which ``pip install`` command fixes it.
    """
    spec = backend_spec(model_type)
    extra = spec.extra
    try:
        mod = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        hint = (f"pip install torch==2.13.0 && pip install -e '.[{extra}]' -c constraints.txt "
                "(in the dicom-node checkout; see docs/ai-backends.md)" if extra else "reinstall dicom-seg-node")
        raise BackendUnavailable(
            f"backend '{model_type}' is not available ({exc.name} is not installed): run {hint}"
        ) from None
    backend: Backend = getattr(mod, spec.class_name)()
    return backend


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
