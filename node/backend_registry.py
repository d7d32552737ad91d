"""The segmentation backends the node knows: one entry per backend, from which the profile
schema, the rule validator, the pipeline's backend loader, the SEG's algorithm identification
and the worker pool's slot choice all derive.

Adding a backend means adding one entry here (and its module under ``node/pipeline/ai/`` or ``hu/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.errors import ProfileError


@dataclass(frozen=True)
class BackendSpec:
    """One segmentation backend."""

    name: str  #: the value of a profile's ``model_type`` and of a rule's ``backend``
    display_name: str  #: SEG SegmentAlgorithmName and what the operator reads
    runs_model: bool  #: runs a trained model: its jobs want a GPU slot unless its device is ``cpu``
    extra: str | None  #: pip extra that installs its dependencies (None: always installed)
    module: str  #: module that holds the backend class (imported lazily: AI packages are optional)
    class_name: str  #: class implementing :class:`node.pipeline.backends.Backend`


#: every backend, in the order the CLI and error messages list them
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("hu_based", "dicom-node HU threshold", runs_model=False, extra=None,
                module="node.pipeline.hu.backend", class_name="HUBackend"),
    BackendSpec("totalsegmentator", "TotalSegmentator", runs_model=True, extra="totalseg",
                module="node.pipeline.ai.totalseg", class_name="TotalSegmentatorBackend"),
    BackendSpec("monai", "MONAI", runs_model=True, extra="monai",
                module="node.pipeline.ai.monai", class_name="MonaiBackend"),
    BackendSpec("nnunet", "nnU-Net", runs_model=True, extra="nnunet",
                module="node.pipeline.ai.nnunet", class_name="NnUNetBackend"),
)

#: the backend of a profile that names none
DEFAULT_BACKEND = "hu_based"

_BY_NAME = {b.name: b for b in BACKENDS}
BACKEND_NAMES: tuple[str, ...] = tuple(_BY_NAME)
MODEL_BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.runs_model)


def allowed_text() -> str:
    """The backend names as an error message lists them: ``'a', 'b' or 'c'``."""
    quoted = [f"'{n}'" for n in BACKEND_NAMES]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def backend_spec(name: str) -> BackendSpec:
    """The registry entry of backend ``name``.

    Raises:
        ProfileError: no backend has that name (the message lists the allowed ones).
    """
    spec = _BY_NAME.get(name)
    if spec is None:
        raise ProfileError(f"model_type '{name}' is not allowed; allowed: {', '.join(BACKEND_NAMES)}")
    return spec


def runs_model(name: str) -> bool:
    """Whether backend ``name`` runs a model; False for unknown names (the job reports those)."""
    spec = _BY_NAME.get(name)
    return spec is not None and spec.runs_model
