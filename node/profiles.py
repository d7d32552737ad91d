"""Organ profiles: the schema of ``profiles/<name>.yaml`` and its loader.

A profile names its backend (``model_type``) and its tissues: HU range (or one per contrast
phase), morphology steps in millimetres, mesh options, colour and the SNOMED CT codes of the
SEG.  Every schema error names the file, the field path and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from node.backend_registry import BACKEND_NAMES, DEFAULT_BACKEND, allowed_text, backend_spec
from node.errors import ProfileError
PHASES = ("non_contrast", "contrast")


def default_profiles_dir() -> Path:
    """The profiles folder: ``$DICOM_NODE_PROFILES`` or the repository's ``profiles/``."""
    env = os.environ.get("DICOM_NODE_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept (SNOMED CT by default) as used in the SEG segment description."""

    value: str
    meaning: str
    scheme: str = "SCT"


HURange = Annotated[tuple[float, float], Field(description="[low, high] in HU, inclusive")]


class PhaseRanges(_Strict):
    """HU ranges per contrast phase; the phase is read from the DICOM header."""

    non_contrast: HURange
    contrast: HURange


# -- morphology steps ---------------------------------------------------------------


class _RadiusStep(_Strict):
    radius_mm: float = Field(gt=0, le=50)


class Closing(_RadiusStep):
    op: Literal["closing"]


class Opening(_RadiusStep):
    op: Literal["opening"]


class Dilation(_RadiusStep):
    op: Literal["dilation"]


class Erosion(_RadiusStep):
    op: Literal["erosion"]


class Median(_RadiusStep):
    op: Literal["median"]


class FillHoles(_Strict):
    op: Literal["fill_holes"]
    mode: Literal["3d", "slice"] = "3d"
    max_area_mm2: float | None = Field(
        default=None, gt=0, description="slice mode only: fill only holes of at most this area (mm^2) per slice"
    )

    @model_validator(mode="after")
    def _area_needs_slice(self) -> "FillHoles":
        if self.max_area_mm2 is not None and self.mode != "slice":
            raise ValueError("max_area_mm2 needs mode: slice")
        return self


class KeepLargest(_Strict):
    op: Literal["keep_largest"]
    n: int = Field(default=1, ge=1)


class RemoveSmall(_Strict):
    op: Literal["remove_small"]
    min_ml: float = Field(gt=0)


class Grow(_Strict):
    """Add voxels in ``hu`` that are connected to the mask (hysteresis), at most ``max_mm`` away."""

    op: Literal["grow"]
    hu: HURange
    max_mm: float | None = Field(default=None, gt=0)


class RemoveThick(_RadiusStep):
    """Drop the parts of the mask a ball of ``radius_mm`` fits into (large blobs such as a
    contrast-filled aorta or an organ); thin structures (cartilage, vessel walls) stay.
    The scan's first and last slices do not cut a blob short."""

    op: Literal["remove_thick"]


class ConnectedTo(_Strict):
    """Keep the parts of the mask connected to an earlier ``tissue`` (6-connected).

    The other tissue's mask grown by ``margin_mm`` is the seed; the margin itself is then
    removed from the result (it is that tissue's partial-volume rim, not this tissue).
    """

    op: Literal["connected_to"]
    tissue: str
    margin_mm: float = Field(default=0, ge=0, le=20)


class EdgeGrow(_Strict):
    """Grow the mask to its local half-maximum edge (see :func:`node.pipeline.hu.refine.edge_grow`).

    A neighbouring voxel joins when its HU reaches ``background + level * (tissue - background)``:
    ``tissue`` is the mask's mean HU within ``background_mm / 2``, ``background`` the lowest HU
    within ``background_mm`` (not below ``floor_hu``).  At most ``max_mm`` is added, in-plane
    (``mode: slice``) or in 3D.  For thin structures whose partial-volume rim a global threshold
    misses (costal cartilage in fat).
    """

    op: Literal["edge_grow"]
    max_mm: float = Field(gt=0, le=10)
    background_mm: float = Field(default=3, gt=0, le=20)
    level: float = Field(default=0.5, gt=0, lt=1)
    floor_hu: float = Field(default=-150, ge=-1024, le=500)
    mode: Literal["slice", "3d"] = "slice"
    avoid: list[str] = Field(default_factory=list, description="earlier tissues the growth must not enter")


class SliceValleys(_Strict):
    """Remove the dim layers between bright bodies stacked along the slice axis (intervertebral
    discs between vertebral bodies; see :func:`node.pipeline.hu.morphology.slice_valleys`).

    In each slice, a connected part of at least ``min_area_mm2`` is removed when its median
    HU (unsmoothed, over its voxels at least ``core_mm`` from its edge) is below ``ratio``
    times the highest median of the parts that overlap it in-plane within ``window_mm``
    above it, and also within ``window_mm`` below it (a side cut short by the scan's edge
    is left out).  The voxels of the tissues listed in
    ``without`` are not part of the parts (and are not removed).
    """

    op: Literal["slice_valleys"]
    window_mm: float = Field(default=15, gt=0, le=100)
    ratio: float = Field(default=0.7, gt=0, lt=1)
    min_area_mm2: float = Field(default=100, ge=0, le=10000)
    core_mm: float = Field(default=3, ge=0, le=20, description="the median is taken this far inside each part")
    without: list[str] = Field(default_factory=list,
                               description="earlier tissues whose voxels are left out of the parts (and kept)")


class Select(_Strict):
    """Keep the parts of the mask that lie where the organ lies (see
    :func:`node.pipeline.hu.anatomy.select`): the mask is cut at necks narrower than
    ``2 * split_mm`` (every voxel goes back to its nearest part), and the ``n`` largest parts
    whose centroid is on ``side`` of the midline, ``lateral_mm`` from it and ``anterior_mm``
    in front of the spine's centre (negative: behind), of ``min_ml`` .. ``max_ml``, are kept
    (``side: both``: ``n`` on each side, for paired organs)."""

    op: Literal["select"]
    split_mm: float = Field(default=0, ge=0, le=30)
    side: Literal["any", "left", "right", "both"] = "any"
    n: int = Field(default=1, ge=1, le=20)
    lateral_mm: tuple[float, float] | None = None
    anterior_mm: tuple[float, float] | None = None
    min_ml: float = Field(default=0, ge=0)
    max_ml: float | None = Field(default=None, gt=0)
    max_split_mm: float = Field(default=0, ge=0, le=30,
                                description="parts above max_ml are cut again at wider necks, up to this radius")


class AdaptHU(_Strict):
    """Re-threshold at the organ's own density: the median +- ``sd`` robust standard deviations
    of the HU in its core (the mask eroded by ``core_mm``), within ``limits`` (see
    :func:`node.pipeline.hu.anatomy.adapt_hu`); what is connected to the core is kept."""

    op: Literal["adapt_hu"]
    core_mm: float = Field(default=10, ge=0, le=50)
    sd: float = Field(default=2, gt=0, le=5)
    limits: HURange | None = None
    grow_mm: float | None = Field(default=None, ge=0, le=50,
                                  description="only within this distance of the mask (None: anywhere)")


class DropGas(_Strict):
    """Drop the connected parts whose core is gas (see :func:`node.pipeline.hu.anatomy.drop_gas`):
    at least ``fraction`` of their voxels ``core_mm`` or more inside are below ``air_hu``."""

    op: Literal["drop_gas"]
    core_mm: float = Field(default=3, ge=0, le=20)
    air_hu: float = Field(default=-950, ge=-1024, le=-500)
    fraction: float = Field(default=0.5, gt=0, le=1)


class Subtract(_Strict):
    """Remove earlier ``tissues`` (grown by ``margin_mm``) from the mask before the next steps
    (``exclude`` removes them after all the steps)."""

    op: Literal["subtract"]
    tissues: list[str] = Field(min_length=1)
    margin_mm: float = Field(default=0, ge=0, le=20)


class Trachea(_Strict):
    """Keep the trachea and main bronchi of an air mask (see :func:`node.pipeline.hu.anatomy.trachea`):
    a lumen of ``min_area_mm2`` .. ``max_area_mm2`` within ``midline_mm`` of the midline in the
    top slice, ringed by soft tissue, followed down to where its branches meet the lungs, and
    ``bronchi_mm`` at most below the carina; shorter than ``min_length_mm``: none."""

    op: Literal["trachea"]
    min_area_mm2: float = Field(default=40, gt=0)
    max_area_mm2: float = Field(default=700, gt=0)
    midline_mm: float = Field(default=30, gt=0)
    min_length_mm: float = Field(default=30, ge=0)
    bronchi_mm: float = Field(default=40, ge=0)


MorphologyStep = Annotated[
    Union[
        Closing, Opening, Dilation, Erosion, Median, FillHoles, KeepLargest, RemoveSmall, Grow, RemoveThick,
        ConnectedTo, EdgeGrow, SliceValleys, Select, AdaptHU, DropGas, Subtract, Trachea,
    ],
    Field(discriminator="op"),
]
STEP_OPS = (
    "closing", "connected_to", "dilation", "edge_grow", "erosion", "fill_holes", "grow", "keep_largest", "median",
    "opening", "remove_small", "remove_thick", "slice_valleys",
    # the anatomy steps (node.pipeline.hu.anatomy)
    "adapt_hu", "drop_gas", "select", "subtract", "trachea",
)


class Inside(_Strict):
    """Restrict a tissue to the filled envelope of an earlier tissue (e.g. marrow inside cortex).

    The envelope is the earlier tissue closed by ``closing_mm`` and hole-filled (in 3D or
    per slice).  As ``outside`` the same envelope is removed from the tissue instead (after
    its morphology), e.g. costal cartilage that is never inside a bone.
    """

    tissue: str
    closing_mm: float = Field(default=0, ge=0, le=50)
    fill: Literal["3d", "slice"] = "slice"


class MeshSpec(_Strict):
    """Surface mesh options (see :class:`node.pipeline.mesh.model.MeshOptions`)."""

    enabled: bool = True
    smoothing: Literal["windowed_sinc", "taubin", "laplacian", "none"] = "windowed_sinc"
    iterations: int = Field(default=20, ge=0, le=500)
    pass_band: float = Field(default=0.03, gt=0, le=2)
    decimate: float | None = Field(default=None, gt=0, le=1, description="fraction of triangles to keep")
    max_triangles: int | None = Field(default=None, ge=100)


class Expect(_Strict):
    """What a plausible result of a tissue looks like; every result is checked against it
    (:mod:`node.pipeline.stages.quality`) and a failed check is a warning on the job, not a failure."""

    volume_ml: tuple[float, float] | None = Field(
        default=None, description="[low, high] mL of a whole organ (of each side when paired)")
    paired: bool = Field(default=False, description="left and right organs (split at the midline)")
    max_side_ratio: float = Field(default=1.5, gt=1, le=10,
                                  description="paired: the larger side at most this many times the smaller")

    @field_validator("volume_ml")
    @classmethod
    def _ordered_ml(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"volume range [{v[0]}, {v[1]}] must have 0 <= low < high")
        return v


class Tissue(_Strict):
    """One output structure of a profile: a SEG segment and a mesh."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    description: str
    color: tuple[int, int, int]
    hu: HURange | PhaseRanges | None = None
    smooth_mm: float = Field(default=0, ge=0, le=10, description="Gaussian sigma applied to HU before thresholding")
    inside: Inside | None = None
    outside: Inside | None = Field(default=None, description="the filled envelope of an earlier tissue, removed")
    exclude: list[str] = Field(default_factory=list, description="earlier tissues removed from this one")
    morphology: list[MorphologyStep] = Field(default_factory=list)
    mesh: MeshSpec = MeshSpec()
    output: bool = Field(default=True, description="false: a landmark for later tissues only "
                         "(exclude, inside, ...), not in the SEG, the meshes or the report")
    expect: Expect | None = None
    category: Code
    type: Code
    labels: list[int] = Field(default_factory=list, description="model label ids (AI backends)")
    structures: list[str] = Field(
        default_factory=list,
        description="model structure names (AI backends): TotalSegmentator class names or the labels of the "
        "model's dataset.json; resolved to label ids by the backend and united with ``labels``",
    )

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError("each RGB component must be 0..255")
        return v

    @field_validator("hu")
    @classmethod
    def _ordered(cls, v: Any) -> Any:
        ranges = [v] if isinstance(v, tuple) else [v.non_contrast, v.contrast] if v is not None else []
        for lo, hi in ranges:
            if lo >= hi:
                raise ValueError(f"HU range [{lo}, {hi}] must have low < high")
        return v

    def hu_range(self, phase: str) -> tuple[float, float] | None:
        """The HU range for ``phase`` (``non_contrast`` or ``contrast``)."""
        if self.hu is None or isinstance(self.hu, tuple):
            return self.hu
        return getattr(self.hu, phase)


class BodyMaskSpec(_Strict):
    """How the body outline is found before any tissue threshold."""

    enabled: bool = True
    threshold_hu: float = -400
    opening_mm: float = Field(default=3, ge=0)
    min_component_ml: float = Field(default=20, gt=0)
    dense_hu: float | None = Field(
        default=None, description="material at least this dense (bone, and the head holders, table tops, "
        "arcs and leads of patient support) is body only where softer body tissue encloses it in its "
        "slice, or where it encloses tissue itself (a cortex around marrow; not air pockets between a "
        "holder and the table top): devices touching the skin, also through a cushion, stay out. Off "
        "(null) by default; on in the brain and bones profiles (tests/test_support_devices.py)")


# -- backend-specific model sections (``model:`` in the profile) ------------------------

Device = str  # auto | cpu | cuda | cuda:N (checked when the backend runs)


class TotalSegmentatorModel(_Strict):
    """``model:`` of a ``totalsegmentator`` profile (passed to ``totalsegmentator.python_api``)."""

    task: str = "total"
    fast: bool = False
    roi_subset: list[str] | None = None
    device: Device = "auto"
    weights: str | None = Field(default=None, description="weights folder (TOTALSEG_WEIGHTS_PATH); "
                                "relative to the models root; default: the node's TotalSegmentator folder")
    threads: int | None = Field(default=None, ge=1, le=64)


class NnUNetModel(_Strict):
    """``model:`` of an ``nnunet`` profile: a trained nnU-Net v2 results folder."""

    folder: str = Field(description="trainer folder (holds dataset.json, plans.json, fold_N/); "
                        "relative to the models root")
    configuration: str = "3d_fullres"
    folds: list[int | Literal["all"]] = Field(default=[0], min_length=1)  # pydantic copies a mutable default per model
    checkpoint: str = "checkpoint_final.pth"
    device: Device = "auto"
    step_size: float = Field(default=0.5, gt=0, le=1)
    mirroring: bool = False
    threads: int | None = Field(default=None, ge=1, le=64)
    input_orientation: str | None = Field(
        default=None, description="storage orientation of the training images as axis codes (LAS, LPS, RAS, ...); "
        "default: the model folder's dataset.json 'input_orientation' (written by dicom-node dataset export), "
        "else LAS (dcm2niix's, what most public models were trained on)")

    @field_validator("input_orientation")
    @classmethod
    def _orientation(cls, v: str | None) -> str | None:
        from node.pipeline.orientation import check_codes

        return None if v is None else check_codes(v)


class MonaiModel(_Strict):
    """``model:`` of a ``monai`` profile: a bundle folder, or a TorchScript file with its settings."""

    bundle: str | None = Field(default=None, description="MONAI bundle folder (configs/inference.json, models/)")
    torchscript: str | None = Field(default=None, description="TorchScript model file")
    window: HURange | None = Field(default=None, description="HU window scaled to [0, 1] (TorchScript)")
    spacing: tuple[float, float, float] | None = Field(
        default=None, description="(i, j, k) mm the model expects; the volume is resampled to it and back")
    roi_size: tuple[int, int, int] = (64, 64, 64)
    sw_batch_size: int = Field(default=1, ge=1)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    device: Device = "auto"
    threads: int | None = Field(default=None, ge=1, le=64)

    @model_validator(mode="after")
    def _one_source(self) -> "MonaiModel":
        if (self.bundle is None) == (self.torchscript is None):
            raise ValueError("set exactly one of bundle or torchscript")
        if self.torchscript is not None and self.window is None:
            raise ValueError("window: required with torchscript ([low, high] HU scaled to 0..1)")
        return self


#: the typed ``model:`` section of each backend that runs a model (keys: node.backend_registry names)
MODEL_SECTIONS: dict[str, type[_Strict]] = {
    "totalsegmentator": TotalSegmentatorModel,
    "nnunet": NnUNetModel,
    "monai": MonaiModel,
}


class Profile(_Strict):
    """An organ profile as loaded from ``profiles/<name>.yaml``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    description: str
    model_type: str = DEFAULT_BACKEND  #: a backend of node.backend_registry
    modality: str = "CT"
    phase: Literal["auto", "non_contrast", "contrast"] = "auto"
    body_mask: BodyMaskSpec = BodyMaskSpec()
    working_grid_mm: float | None = Field(
        default=None, gt=0, le=5,
        description="segment and mesh on a grid of about this voxel size (block-averaged HU); "
        "None = the series' own grid. The SEG still covers every original frame.",
    )
    tissues: list[Tissue] = Field(min_length=1)
    model: dict[str, Any] = Field(default_factory=dict, description="backend-specific settings")
    refuse_without_backend: str | None = Field(
        default=None, description="why there is no HU fallback: a job is refused with this reason when the "
        "profile's backend (package or weights) is not installed")
    source: str | None = Field(default=None, exclude=True)

    @field_validator("model_type")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKEND_NAMES:
            # reported like any other not-allowed value (see _format_error)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": allowed_text()})
        return value

    @model_validator(mode="after")
    def _references(self) -> "Profile":
        seen: list[str] = []
        for n, t in enumerate(self.tissues):
            if t.name in seen:
                raise ValueError(f"tissues[{n}].name: duplicate tissue name '{t.name}'")
            refs = ([t.inside.tissue] if t.inside else []) + ([t.outside.tissue] if t.outside else [])
            refs += list(t.exclude)
            refs += [s.tissue for s in t.morphology if isinstance(s, ConnectedTo)]
            refs += [a for s in t.morphology if isinstance(s, EdgeGrow) for a in s.avoid]
            refs += [w for s in t.morphology if isinstance(s, SliceValleys) for w in s.without]
            refs += [w for s in t.morphology if isinstance(s, Subtract) for w in s.tissues]
            for r in refs:
                if r not in seen:
                    raise ValueError(
                        f"tissues[{n}] ({t.name}): refers to '{r}', which is not an earlier tissue; "
                        f"earlier tissues: {', '.join(seen) or 'none'}"
                    )
            runs_model = backend_spec(self.model_type).runs_model
            if not runs_model and t.hu is None:
                raise ValueError(f"tissues[{n}].hu: required for model_type {self.model_type}")
            if runs_model and not (t.labels or t.structures):
                raise ValueError(f"tissues[{n}] ({t.name}): model_type {self.model_type} needs labels "
                                 "(model label ids) or structures (model structure names)")
            seen.append(t.name)
        if not any(t.output for t in self.tissues):
            raise ValueError("tissues: at least one tissue must be an output (output: true)")
        section = MODEL_SECTIONS.get(self.model_type)
        if section is not None:
            try:
                section.model_validate(self.model)
            except ValidationError as exc:
                lines = []
                for e in exc.errors():
                    loc = _loc(("model", *e["loc"]))
                    msg = e["msg"].removeprefix("Value error, ")
                    if e["type"] == "extra_forbidden":
                        msg = f"unknown field; allowed: {', '.join(section.model_fields)}"
                    lines.append(f"{loc}: {msg}")
                raise ValueError("; ".join(lines)) from None
        return self

    @property
    def result_tissues(self) -> list[Tissue]:
        """The tissues that are results (SEG segments, meshes, report); the others are landmarks."""
        return [t for t in self.tissues if t.output]

    def model_settings(self) -> Any:
        """The typed ``model:`` section for this profile's backend (``None`` for hu_based)."""
        section = MODEL_SECTIONS.get(self.model_type)
        return section.model_validate(self.model) if section else None

    def resolve_phase(self, contrast_applied: bool, override: str | None = None) -> str:
        """Pick the contrast phase: explicit override, then the profile's setting, then the header."""
        choice = override or self.phase
        if choice not in ("auto", *PHASES):
            raise ProfileError(f"phase must be one of auto, {', '.join(PHASES)} (got {choice!r})")
        if choice == "auto":
            return "contrast" if contrast_applied else "non_contrast"
        return choice


# -- loading ---------------------------------------------------------------------------


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STEP_OPS or part in ("tuple[float, float]", "PhaseRanges"):
            continue  # pydantic's union branch names, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _format_error(err: ErrorDetails, data: Any) -> str:
    loc = _loc(err["loc"])
    kind = err["type"]
    if kind == "union_tag_invalid":
        got = err.get("input", {}).get("op") if isinstance(err.get("input"), dict) else err.get("input")
        hint = difflib.get_close_matches(str(got), STEP_OPS, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{loc}.op: '{got}' is not allowed{extra}; allowed: {', '.join(STEP_OPS)}"
    if kind == "union_tag_not_found":
        return f"{loc}: missing 'op'; allowed: {', '.join(STEP_OPS)}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{loc}: {err['input']!r} is not allowed; allowed: {expected}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown field"
    if kind == "missing":
        return f"{loc}: required field missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def parse_profile(data: Any, source: str) -> Profile:
    """Validate a profile mapping; raise :class:`ProfileError` listing every problem."""
    if not isinstance(data, dict):
        raise ProfileError("a profile must be a YAML mapping", path=source)
    try:
        return Profile.model_validate({**data, "source": source})
    except ValidationError as exc:
        seen: list[str] = []
        for e in exc.errors():
            line = _format_error(e, data)
            if line not in seen:
                seen.append(line)
        raise ProfileError("; ".join(seen), path=source) from None


def load_profile_file(path: str | Path) -> Profile:
    """Load and validate one profile file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile: {exc.strerror}", path=p) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ProfileError(f"{where}invalid YAML: {getattr(exc, 'problem', exc)}", path=p) from None
    profile = parse_profile(data, str(p))
    if profile.name != p.stem:
        raise ProfileError(f"name: '{profile.name}' must match the file name '{p.stem}'", path=p)
    return profile


def list_profiles(directory: str | Path | None = None) -> list[str]:
    """Names of the profiles in ``directory`` (default :func:`default_profiles_dir`)."""
    d = Path(directory) if directory else default_profiles_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


def load_profile(name_or_path: str | Path, directory: str | Path | None = None) -> Profile:
    """Load a profile by name (from the profiles folder) or by file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_profile_file(p)
    d = Path(directory) if directory else default_profiles_dir()
    f = d / f"{name_or_path}.yaml"
    if not f.exists():
        names = list_profiles(d)
        hint = difflib.get_close_matches(str(name_or_path), names, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ProfileError(f"unknown profile '{name_or_path}'{extra}; available: {', '.join(names) or 'none'}", path=d)
    return load_profile_file(f)
