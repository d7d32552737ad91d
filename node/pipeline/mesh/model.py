"""What the mesher takes and gives: :class:`MeshOptions` and :class:`Mesh`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping

import numpy as np

from node.errors import ProfileError
from node.pipeline.mesh.coincident import float32_unique_count
from node.pipeline.mesh.geometry import signed_volume, volume_centroid
from node.pipeline.mesh.topology import Topology, topology

Smoothing = Literal["windowed_sinc", "taubin", "laplacian", "none"]
SMOOTHING_METHODS: tuple[str, ...] = ("windowed_sinc", "taubin", "laplacian", "none")


@dataclass
class MeshOptions:
    """How to turn one mask into a surface mesh.

    Attributes:
        smoothing: ``'windowed_sinc'`` (VTK, volume preserving, default), ``'taubin'``
            (lambda/mu filter, nearly volume preserving), ``'laplacian'`` (plain umbrella
            operator; shrinks the surface, kept for compatibility) or ``'none'``.
        iterations: smoothing iterations (0 to 500).
        pass_band: windowed-sinc pass band (0 < pass_band < 1; smaller is smoother);
            for Taubin it sets ``mu`` through ``k_pb = 1/lambda + 1/mu``.
        decimate: fraction of the triangles to *keep* (0 < decimate <= 1), or ``None``.
        max_triangles: upper bound on the triangle count (>= 4), or ``None``.  With
            ``decimate`` also set, the smaller target wins.
    """

    smoothing: Smoothing = "windowed_sinc"
    iterations: int = 20
    pass_band: float = 0.03
    decimate: float | None = None
    max_triangles: int | None = None

    def __post_init__(self) -> None:
        if self.smoothing not in SMOOTHING_METHODS:
            raise ProfileError(
                f"unknown smoothing {self.smoothing!r}; expected one of {', '.join(SMOOTHING_METHODS)}",
                tag="smoothing",
            )
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)):
            raise ProfileError(f"iterations must be an integer, got {self.iterations!r}", tag="iterations")
        self.iterations = int(self.iterations)
        if not 0 <= self.iterations <= 500:
            raise ProfileError(f"iterations must be in 0..500, got {self.iterations}", tag="iterations")
        try:
            self.pass_band = float(self.pass_band)
        except (TypeError, ValueError):
            raise ProfileError(f"pass_band must be a number, got {self.pass_band!r}", tag="pass_band") from None
        if not (0.0 < self.pass_band < 1.0):
            raise ProfileError(f"pass_band must be in (0, 1), got {self.pass_band}", tag="pass_band")
        if self.decimate is not None:
            if isinstance(self.decimate, bool):
                raise ProfileError(f"decimate must be a fraction, got {self.decimate!r}", tag="decimate")
            try:
                self.decimate = float(self.decimate)
            except (TypeError, ValueError):
                raise ProfileError(f"decimate must be a fraction, got {self.decimate!r}", tag="decimate") from None
            if not (0.0 < self.decimate <= 1.0) or math.isnan(self.decimate):
                raise ProfileError(
                    f"decimate is the fraction of triangles to keep, in (0, 1], got {self.decimate}",
                    tag="decimate",
                )
        if self.max_triangles is not None:
            if isinstance(self.max_triangles, bool) or not isinstance(self.max_triangles, (int, np.integer)):
                raise ProfileError(
                    f"max_triangles must be an integer, got {self.max_triangles!r}", tag="max_triangles"
                )
            self.max_triangles = int(self.max_triangles)
            if self.max_triangles < 4:
                raise ProfileError(f"max_triangles must be >= 4, got {self.max_triangles}", tag="max_triangles")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "MeshOptions":
        """Build options from a mapping (e.g. a profile section); unknown keys are an error.

        ``None`` values mean "default" for ``smoothing``/``iterations``/``pass_band`` and
        "off" for ``decimate``/``max_triangles``.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ProfileError(f"mesh options must be a mapping, got {type(data).__name__}", tag="mesh")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProfileError(
                f"unknown mesh option(s) {', '.join(map(str, unknown))}; expected {', '.join(sorted(names))}",
                tag="mesh",
            )
        kwargs = {k: v for k, v in data.items() if v is not None or k in ("decimate", "max_triangles")}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (inverse of :meth:`from_dict`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(eq=False)
class Mesh:
    """A triangle mesh in patient coordinates (LPS mm), faces wound outward.

    Attributes:
        vertices: ``(n, 3)`` float64 LPS mm.
        faces: ``(m, 3)`` int64 vertex indices, counter-clockwise seen from outside.
    """

    vertices: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.float64))
    faces: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    decimated_from: dict[str, int] | None = None
    """Set when the mesh was decimated: ``triangles`` and surface ``components`` of the smoothed
    surface before decimation (a decimator reaches its target by collapsing the smallest
    components first, so a drop in components is what it removed)."""
    known_topology: Topology | None = field(default=None, repr=False)
    """``topology(faces, len(vertices))`` when the mesher computed it already (the decimation
    checks its result with it), so a caller need not compute it again."""

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(np.asarray(self.vertices, dtype=np.float64).reshape(-1, 3))
        self.faces = np.ascontiguousarray(np.asarray(self.faces, dtype=np.int64).reshape(-1, 3))

    @property
    def triangles(self) -> int:
        """Number of triangles."""
        return int(self.faces.shape[0])

    @property
    def is_empty(self) -> bool:
        """True when the mesh has no triangles."""
        return self.faces.shape[0] == 0

    @property
    def signed_volume_mm3(self) -> float:
        """Signed enclosed volume in mm^3 (positive for outward winding)."""
        return signed_volume(self.vertices, self.faces)

    @property
    def volume_ml(self) -> float:
        """Signed enclosed volume in millilitres (mm^3 / 1000)."""
        return self.signed_volume_mm3 / 1000.0

    @property
    def centroid(self) -> np.ndarray:
        """Centre of the enclosed volume (LPS mm); vertex mean for a flat/empty mesh."""
        return volume_centroid(self.vertices, self.faces)

    @property
    def is_watertight(self) -> bool:
        """Every edge shared by exactly two faces, with opposite directions (consistent winding)."""
        return topology(self.faces, self.vertices.shape[0]).watertight

    @property
    def is_manifold(self) -> bool:
        """Watertight, consistently wound, one fan per vertex, no degenerate (repeated-index) faces."""
        return topology(self.faces, self.vertices.shape[0]).manifold

    def coincident_vertices(self) -> int:
        """Number of distinct vertices that share their float32 coordinates with another one."""
        if self.vertices.shape[0] == 0:
            return 0
        return int(self.vertices.shape[0] - float32_unique_count(self.vertices))
