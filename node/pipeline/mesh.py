"""Surface meshes from tissue masks, in patient coordinates (DICOM LPS millimetres).

Pipeline for one mask (see :func:`mesh_from_mask`):

1. crop the mask to its bounding box plus one voxel of zero padding, so the surface is
   closed even where the mask touches the edge of the volume;
2. ``vtkDiscreteFlyingEdges3D`` in index space (as 3D Slicer does), then the *full*
   affine, direction matrix included, maps the vertices to LPS mm (a pipeline that only
   applies origin and spacing, as VTK's contour filter on a ``vtkImageData`` does,
   misplaces meshes of non-axial series);
3. smoothing in mm: windowed sinc (default, VTK), Taubin or plain Laplacian (numpy /
   scipy sparse), or none;
4. optional decimation: ``fast_simplification`` followed by a ``manifold3d`` round trip;
5. winding made outward (positive signed volume; flipped when the affine has a negative
   determinant), and float32-coincident distinct vertices pulled apart, so that the
   mesh *as written to a float32 STL and re-read by any reader* is still watertight and
   manifold.

Masks are indexed ``[k, j, i]``; the affine maps ``(i, j, k, 1)`` to LPS mm (see
:mod:`node.pipeline.volume`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping

import numpy as np

from node.errors import ProfileError
from node.pipeline.box import bounding_box

log = logging.getLogger(__name__)

Smoothing = Literal["windowed_sinc", "taubin", "laplacian", "none"]
SMOOTHING_METHODS: tuple[str, ...] = ("windowed_sinc", "taubin", "laplacian", "none")

#: distance (mm) by which float32-coincident distinct vertices are moved apart.
SEPARATION_MM = 1e-4


# --------------------------------------------------------------------------- options


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


# --------------------------------------------------------------------------- mesh


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


# --------------------------------------------------------------------------- geometry/topology helpers


#: faces per block in the per-face loops: the block's temporaries stay in the CPU cache.
_BLOCK = 1 << 14


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume (mm^3) enclosed by a triangle mesh, by the divergence theorem."""
    if len(faces) == 0:
        return 0.0
    v = np.asarray(vertices, dtype=np.float64)
    # translate for numerical stability (volume is translation invariant for closed meshes)
    vc = v - v.mean(axis=0)
    f = np.asarray(faces)
    total = 0.0
    for s in range(0, len(f), _BLOCK):  # blocks: ~3x faster than whole-array temporaries
        fs = f[s : s + _BLOCK]
        total += float(np.einsum("ij,ij->", vc[fs[:, 0]], np.cross(vc[fs[:, 1]], vc[fs[:, 2]])))
    return total / 6.0


def volume_centroid(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Centroid of the volume enclosed by a closed mesh (vertex mean when the volume is ~0)."""
    v = np.asarray(vertices, dtype=np.float64)
    if len(v) == 0:
        return np.full(3, np.nan)
    c = v.mean(axis=0)
    if len(faces) == 0:
        return c
    a, b, d = v[faces[:, 0]] - c, v[faces[:, 1]] - c, v[faces[:, 2]] - c
    vol6 = np.einsum("ij,ij->i", a, np.cross(b, d))
    total = vol6.sum()
    if abs(total) < 1e-12:
        return c
    return c + ((a + b + d) * vol6[:, None]).sum(axis=0) / (4.0 * total)


def face_normals(vertices: np.ndarray, faces: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Per-face normals (unit length unless ``normalize=False``; zero for degenerate faces)."""
    v = np.asarray(vertices, dtype=np.float64)
    n = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    if normalize:
        normalize_rows(n)
    return n


def normalize_rows(n: np.ndarray) -> np.ndarray:
    """Scale the rows of a float ``(m, 3)`` array to unit length in place (zero rows stay zero)."""
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    np.divide(n, ln, out=n, where=ln > 0)
    n[ln[:, 0] == 0] = 0.0
    return n


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (zero for isolated vertices)."""
    fn = face_normals(vertices, faces, normalize=False)
    vn = np.zeros((len(vertices), 3))
    for c in range(3):
        _bincount_add(vn, faces[:, c], fn)
    ln = np.linalg.norm(vn, axis=1, keepdims=True)
    np.divide(vn, ln, out=vn, where=ln > 0)
    return vn


def _bincount_add(acc: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> None:
    n = acc.shape[0]
    for d in range(acc.shape[1]):
        acc[:, d] += np.bincount(idx, weights=vals[:, d], minlength=n)


def _float32_keys(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(k1, k2)``: the x, y float32 bits as one uint64 and the z bits (``-0.0`` as ``+0.0``)."""
    v32 = np.ascontiguousarray(np.asarray(vertices, dtype=np.float32) + np.float32(0.0))
    u = v32.view(np.uint32).reshape(-1, 3)
    k1 = (u[:, 0].astype(np.uint64) << np.uint64(32)) | u[:, 1].astype(np.uint64)
    return k1, u[:, 2]


def _hash_groups(k1: np.ndarray, k2: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Group equal ``(k1, k2)`` by sorting one 64-bit mix of both keys.

    Returns ``(order, start)`` (the sort order and where each group starts in it), or
    ``None`` when two different keys share a mix value (then the caller sorts both keys).
    """
    h = (k1 * np.uint64(0x9E3779B97F4A7C15)) ^ k2.astype(np.uint64)
    order = np.argsort(h)
    hs = h[order]
    start = np.empty(len(h), dtype=bool)
    start[0] = True
    np.not_equal(hs[1:], hs[:-1], out=start[1:])
    del hs
    s1, s2 = k1[order], k2[order]
    same = ~start[1:]
    if np.any(same & ((s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1]))):
        return None  # pragma: no cover - a 64-bit collision between distinct coordinates
    return order, start


def float32_unique_count(vertices: np.ndarray) -> int:
    """Number of distinct float32 coordinate triples (``-0.0`` equal to ``+0.0``)."""
    n = len(vertices)
    if n == 0:
        return 0
    k1, k2 = _float32_keys(vertices)
    res = _hash_groups(k1, k2)
    if res is None:  # pragma: no cover
        return float32_groups(vertices)[1]
    return int(np.count_nonzero(res[1]))


def float32_groups(vertices: np.ndarray) -> tuple[np.ndarray, int]:
    """Group vertices by their exact float32 coordinates (as an STL reader would merge them).

    Returns ``(inverse, n_unique)``: ``inverse[i]`` is the group of vertex ``i``; groups
    are numbered in lexicographic order of their ``(x, y, z)`` float32 bit patterns.
    ``-0.0`` and ``+0.0`` fall in the same group.
    """
    n = np.asarray(vertices).reshape(-1, 3).shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    k1, k2 = _float32_keys(vertices)
    res = _hash_groups(k1, k2)
    if res is not None:
        order, start = res
        gid_sorted = np.cumsum(start) - 1
        n_unique = int(gid_sorted[-1]) + 1
        if n_unique < n // 2:
            # number the groups as a sort of both keys would: sort the representatives only
            first = order[start]
            rank = np.empty(n_unique, dtype=np.int64)
            rank[np.lexsort((k2[first], k1[first]))] = np.arange(n_unique)
            inverse = np.empty(n, dtype=np.int64)
            inverse[order] = rank[gid_sorted]
            return inverse, n_unique
    order = np.lexsort((k2, k1))
    s1, s2 = k1[order], k2[order]
    new = np.empty(n, dtype=bool)
    new[0] = True
    new[1:] = (s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1])
    gid_sorted = np.cumsum(new) - 1
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = gid_sorted
    return inverse, int(gid_sorted[-1]) + 1


@dataclass
class Topology:
    """Edge/vertex topology of a triangle mesh (see :func:`topology`)."""

    triangles: int
    edges: int
    boundary_edges: int
    """Undirected edges used by exactly one face."""
    nonmanifold_edges: int
    """Undirected edges used by three or more faces."""
    inconsistent_edges: int
    """Undirected edges used twice but in the same direction (winding flips)."""
    degenerate_faces: int
    """Faces with a repeated vertex index."""
    nonmanifold_vertices: int
    """Vertices whose faces form more than one fan (pinch points)."""
    components: int
    """Connected components (by shared vertices)."""

    @property
    def watertight(self) -> bool:
        """Every edge in exactly two faces with opposite directions."""
        return (
            self.triangles > 0
            and self.boundary_edges == 0
            and self.nonmanifold_edges == 0
            and self.inconsistent_edges == 0
            and self.degenerate_faces == 0
        )

    @property
    def manifold(self) -> bool:
        """Watertight and every vertex a single fan of faces."""
        return self.watertight and self.nonmanifold_vertices == 0


def _sorted_edge_keys(ukey: np.ndarray, key_bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, ukey[order])`` for non-negative int64 keys below ``key_bound``; consumes ``ukey``.

    When key and position fit in 64 bits together, one in-place value sort of
    ``key << s | pos`` replaces the argsort (about twice as fast: numpy's SIMD sort covers
    plain sorts of 64-bit integers better than argsorts), and ``order`` is int32 where
    positions fit.  Equal keys may come in any order, as with the argsort; no caller
    depends on that order.
    """
    n = len(ukey)
    shift = max(int(n - 1).bit_length(), 1)
    if key_bound > 1 << (64 - shift) or ukey.dtype != np.int64:
        order = np.argsort(ukey)
        return order, ukey[order]
    packed = ukey.view(np.uint64)  # in place: the keys are not needed afterwards
    packed <<= np.uint64(shift)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    if shift <= 31 and sys.byteorder == "little":
        # positions are in the low 32-bit word of each packed value
        order = np.bitwise_and(packed.view(np.uint32)[0::2], np.uint32((1 << shift) - 1)).view(np.int32)
    else:  # pragma: no cover - over 2**31 corners or a big-endian machine
        order = (packed & np.uint64((1 << shift) - 1)).astype(np.intp)
    packed >>= np.uint64(shift)
    return order, packed


def _components(indices: np.ndarray, row_len: int, n: int) -> tuple[int, np.ndarray]:
    """Connected components of a graph on ``n`` nodes, ``row_len`` neighbours per node.

    ``indices[row_len * i : row_len * (i + 1)]`` are the neighbours of node ``i``.  The
    graph must be symmetric (or a permutation), so its strong components are its
    connected components: that saves scipy the transpose a weak/undirected search needs.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    idx_t = np.int32 if n * row_len < 2**31 else np.int64
    graph = csr_matrix(
        (np.ones(n * row_len, dtype=np.float64), indices.astype(idx_t, copy=False),
         np.arange(0, n * row_len + 1, row_len, dtype=idx_t)),
        shape=(n, n),
    )
    rows = graph.indices.reshape(n, row_len)
    repeats = any(np.any(rows[:, i] == rows[:, j]) for i in range(row_len) for j in range(i))
    # scipy's strong search never returns on a row with a repeated entry (scipy 1.17, e.g. a
    # triangle glued to its reverse); the weak search copes with them
    n_comp, lab = connected_components(graph, directed=True, connection="weak" if repeats else "strong")
    return int(n_comp), lab


def topology(faces: np.ndarray, n_vertices: int | None = None) -> Topology:
    """Edge counts, winding consistency and vertex fans of a triangle mesh, in numpy/scipy.

    One sort of the undirected edge keys gives the edge counts, the winding check and,
    for a closed consistently wound mesh (every edge used twice, once per direction),
    each half-edge's twin directly (the two uses are adjacent in sorted order).  Other
    meshes look their twins up by binary search.  When every vertex is one fan, faces
    that share a vertex also share a chain of edges, so the components come from the
    (smaller) face adjacency graph instead of the vertex graph.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    m = f.shape[0]
    if m == 0:
        return Topology(0, 0, 0, 0, 0, 0, 0, 0)
    nv = int(n_vertices) if n_vertices is not None else int(f.max()) + 1
    degenerate = int(np.count_nonzero((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])))
    a = f.ravel()  # corner c = 3*face + slot, vertex a[c]
    b = np.empty_like(f)  # directed half-edge a -> b belongs to corner c
    b[:, :2] = f[:, 1:]
    b[:, 2] = f[:, 0]
    b = b.ravel()
    n3 = len(a)
    fwd = a < b  # direction of the half-edge along its undirected edge
    ukey = np.minimum(a, b)
    ukey *= nv
    ukey += np.maximum(a, b)
    if int(f.min()) >= 0 and int(f.max()) < nv:
        order, sk = _sorted_edge_keys(ukey, nv * nv)
    else:  # out-of-range indices: keys may be negative; let the graph code below raise
        order = np.argsort(ukey)
        sk = ukey[order]
    del ukey
    # every undirected edge used exactly twice <=> sorted keys come in equal pairs
    paired = n3 % 2 == 0 and bool(np.array_equal(sk[0::2], sk[1::2])) and not bool(np.any(sk[2::2] == sk[1:-1:2]))
    if paired:
        del sk
        n_edges = n3 // 2
        boundary = nonmanifold = 0
        # Two uses in the same direction -> inconsistent winding.
        inconsistent = int(np.count_nonzero(fwd[order[0::2]] == fwd[order[1::2]]))
    else:
        start = np.empty(n3, dtype=bool)
        start[0] = True
        np.not_equal(sk[1:], sk[:-1], out=start[1:])
        starts = np.flatnonzero(start)
        del start, sk
        counts = np.diff(np.append(starts, n3))
        n_edges = len(starts)
        boundary = int(np.count_nonzero(counts == 1))
        nonmanifold = int(np.count_nonzero(counts > 2))
        fwd_count = np.add.reduceat(fwd[order].astype(np.int64), starts)
        inconsistent = int(np.count_nonzero((counts == 2) & (fwd_count != 1)))
    del fwd

    # vertex fans: corner c (vertex a[c], outgoing edge a->b) is linked to the corner of the
    # twin half-edge's face at the same vertex: twin is b->a in face g; at vertex a in g the
    # corner is the one whose *incoming* edge is b->a, i.e. the next corner after the twin.
    closed = paired and inconsistent == 0
    face_adj: np.ndarray | None = None
    if closed:
        # every edge: two half-edges in opposite directions, adjacent in ``order``
        idx_t = np.int32 if n3 < 2**31 else np.int64
        pairs = order.reshape(-1, 2)
        twin = np.empty(n3, dtype=idx_t)
        twin[pairs[:, 0]] = pairs[:, 1]
        twin[pairs[:, 1]] = pairs[:, 0]
        del pairs, order
        face_adj = twin // 3  # the face across each corner's outgoing edge
        last = twin - 3 * face_adj == 2  # (integer // by a constant is fast in numpy, % is not)
        nxt = twin
        nxt += 1
        np.subtract(nxt, 3, out=nxt, where=last)  # corner after the twin in its face: a permutation
        del last
        # nxt is a permutation: its cycles (the fans) are its strong components
        n_comp, lab = _components(nxt, 1, n3)
        del nxt
    else:
        dkey = a * nv + b
        dorder = np.argsort(dkey, kind="stable")
        dsk = dkey[dorder]
        tkey = b * nv + a
        pos = np.searchsorted(dsk, tkey)
        pos_c = np.minimum(pos, len(dsk) - 1)
        found = dsk[pos_c] == tkey
        c_idx = np.nonzero(found)[0]
        twin = dorder[pos_c[found]]
        nxt = (twin // 3) * 3 + (twin % 3 + 1) % 3  # corner at vertex a in the twin's face
        graph = coo_matrix((np.ones(len(c_idx), dtype=np.int8), (c_idx, nxt)), shape=(n3, n3))
        n_comp, lab = connected_components(graph, directed=False)
    # every fan (component of the corner graph) lies at one vertex: count fans per vertex
    used = np.bincount(a, minlength=nv) > 0
    if n_comp == int(np.count_nonzero(used)):
        nonmanifold_vertices = 0  # one fan per used vertex (each has at least one)
    else:
        fan_vertex = np.empty(n_comp, dtype=np.int64)
        fan_vertex[lab] = a
        fans = np.bincount(fan_vertex, minlength=nv)
        nonmanifold_vertices = int(np.count_nonzero(fans > 1))
    del lab

    # connected components by shared vertices
    if face_adj is not None and nonmanifold_vertices == 0:
        # one fan per vertex: faces sharing a vertex are joined through the fan's edges
        n_components, _ = _components(face_adj, 3, m)
    else:
        n_components = surface_components(f, nv)
    return Topology(
        triangles=m,
        edges=n_edges,
        boundary_edges=boundary,
        nonmanifold_edges=nonmanifold,
        inconsistent_edges=inconsistent,
        degenerate_faces=degenerate,
        nonmanifold_vertices=nonmanifold_vertices,
        components=int(n_components),
    )


# --------------------------------------------------------------------------- VTK glue

_SMP_READY = False
_SMP_LOCK = threading.Lock()


def _vtk_smp() -> None:
    """Use VTK's STDThread SMP backend when VTK is still on the sequential one (once).

    Thread safe: run_pipeline meshes two tissues at a time, and no filter may start
    while another thread is still switching the backend, so the flag is set only once
    the switch is done, under a lock.
    """
    global _SMP_READY
    if _SMP_READY:
        return
    with _SMP_LOCK:
        if _SMP_READY:
            return
        try:
            from vtkmodules.vtkCommonCore import vtkSMPTools

            if vtkSMPTools.GetBackend() == "Sequential":
                vtkSMPTools.SetBackend("STDThread")
        except Exception:  # pragma: no cover - backend not compiled in
            log.debug("VTK STDThread SMP backend unavailable", exc_info=True)
        _SMP_READY = True


def _to_vtk_polydata(vertices: np.ndarray, faces: np.ndarray) -> Any:
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData

    pts = vtkPoints()
    pts.SetData(ns.numpy_to_vtk(np.ascontiguousarray(vertices, dtype=np.float64), deep=True))
    conn = np.ascontiguousarray(faces, dtype=np.int64).ravel()
    offsets = np.arange(0, conn.size + 1, 3, dtype=np.int64)
    cells = vtkCellArray()
    cells.SetData(ns.numpy_to_vtkIdTypeArray(offsets, deep=True), ns.numpy_to_vtkIdTypeArray(conn, deep=True))
    poly = vtkPolyData()
    poly.SetPoints(pts)
    poly.SetPolys(cells)
    return poly


def _from_vtk_polydata(poly: Any) -> tuple[np.ndarray, np.ndarray]:
    from vtkmodules.util import numpy_support as ns

    if poly.GetPoints() is None or poly.GetNumberOfPolys() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    v = ns.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64, copy=True).reshape(-1, 3)
    polys = poly.GetPolys()
    conn = ns.vtk_to_numpy(polys.GetConnectivityArray()).astype(np.int64, copy=True)
    offs = ns.vtk_to_numpy(polys.GetOffsetsArray())
    if not np.all(np.diff(offs) == 3):
        raise RuntimeError("VTK produced non-triangle polygons")
    return v, conn.reshape(-1, 3)


def _flying_edges(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Discrete flying edges on a uint8 ``[k, j, i]`` array; vertices in (i, j, k) index units."""
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D

    _vtk_smp()
    nk, nj, ni = padded.shape
    img = vtkImageData()
    img.SetDimensions(ni, nj, nk)
    img.SetSpacing(1.0, 1.0, 1.0)
    img.SetOrigin(0.0, 0.0, 0.0)
    flat = np.ascontiguousarray(padded, dtype=np.uint8).ravel()
    scalars = ns.numpy_to_vtk(flat, deep=False)
    scalars.SetName("mask")
    img.GetPointData().SetScalars(scalars)
    fe = vtkDiscreteFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 1)
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.ComputeScalarsOff()
    fe.Update()
    v, f = _from_vtk_polydata(fe.GetOutput())
    del flat  # kept alive until here: the VTK array shares its memory
    return v, f


def _windowed_sinc(vertices: np.ndarray, faces: np.ndarray, iterations: int, pass_band: float) -> np.ndarray:
    from vtkmodules.vtkFiltersCore import vtkWindowedSincPolyDataFilter

    _vtk_smp()
    poly = _to_vtk_polydata(vertices, faces)
    ws = vtkWindowedSincPolyDataFilter()
    ws.SetInputData(poly)
    ws.SetNumberOfIterations(iterations)
    ws.SetPassBand(pass_band)
    ws.BoundarySmoothingOff()
    ws.FeatureEdgeSmoothingOff()
    ws.NonManifoldSmoothingOn()
    ws.NormalizeCoordinatesOn()
    ws.Update()
    v, f = _from_vtk_polydata(ws.GetOutput())
    if f.shape != faces.shape or not np.array_equal(f, faces):  # pragma: no cover - VTK keeps topology
        raise RuntimeError("windowed sinc changed the mesh topology")
    return v


def _umbrella(faces: np.ndarray, n: int) -> Any:
    """Row-normalised vertex adjacency (sparse ``n x n``): ``W @ v`` = mean of the neighbours."""
    from scipy.sparse import coo_matrix, diags

    a = faces.ravel()
    b = faces[:, [1, 2, 0]].ravel()
    w = coo_matrix((np.ones(2 * a.size), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(n, n)).tocsr()
    w.data[:] = 1.0  # each undirected edge appears twice (once per face): binarise
    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = np.zeros_like(deg)
    np.divide(1.0, deg, out=inv, where=deg > 0)
    return diags(inv) @ w


def _taubin(vertices: np.ndarray, faces: np.ndarray, iterations: int, pass_band: float) -> np.ndarray:
    """Taubin lambda/mu smoothing; ``mu`` from ``k_pb = 1/lambda + 1/mu`` with lambda = 0.5."""
    lam = 0.5
    mu = 1.0 / (pass_band - 1.0 / lam)
    w = _umbrella(faces, len(vertices))
    v = vertices.copy()
    for _ in range(iterations):
        v += lam * (w @ v - v)
        v += mu * (w @ v - v)
    return v


def _laplacian(vertices: np.ndarray, faces: np.ndarray, iterations: int) -> np.ndarray:
    """Plain umbrella Laplacian (lambda = 0.5); shrinks the surface."""
    w = _umbrella(faces, len(vertices))
    v = vertices.copy()
    for _ in range(iterations):
        v += 0.5 * (w @ v - v)
    return v


def _smooth(vertices: np.ndarray, faces: np.ndarray, options: MeshOptions) -> np.ndarray:
    if options.smoothing == "none" or options.iterations == 0 or len(faces) == 0:
        return vertices
    if options.smoothing == "windowed_sinc":
        return _windowed_sinc(vertices, faces, options.iterations, options.pass_band)
    if options.smoothing == "taubin":
        return _taubin(vertices, faces, options.iterations, options.pass_band)
    return _laplacian(vertices, faces, options.iterations)


# --------------------------------------------------------------------------- decimation and repair


def _target_triangles(n: int, options: MeshOptions) -> int | None:
    target = n
    if options.decimate is not None:
        target = min(target, int(round(n * options.decimate)))
    if options.max_triangles is not None:
        target = min(target, options.max_triangles)
    return target if target < n else None


def surface_components(faces: np.ndarray, n_vertices: int) -> int:
    """Connected components of a triangle mesh by shared vertices (unused vertices not counted).

    Two edges per face join its three corners: a weak search over that directed graph (no
    symmetric copy); ~1 s for 6.7 M faces.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    f = np.asarray(faces)
    if len(f) == 0:
        return 0
    itype = np.int32 if n_vertices < 2**31 else np.int64  # half the graph's memory
    rows = np.concatenate([f[:, 0], f[:, 1]]).astype(itype, copy=False)
    cols = np.concatenate([f[:, 1], f[:, 2]]).astype(itype, copy=False)
    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_vertices, n_vertices))
    n_comp, _ = connected_components(graph, directed=True, connection="weak")
    unused = n_vertices - int(np.count_nonzero(np.bincount(f.ravel(), minlength=n_vertices)))
    return int(n_comp) - unused  # each unused vertex is a component of its own


def _manifold_roundtrip(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Pass a mesh through manifold3d (collapses degenerate triangles); ``None`` if it refuses."""
    import manifold3d

    if hasattr(manifold3d, "Mesh64"):  # manifold3d >= 3.1: keep float64 positions
        src = manifold3d.Mesh64(
            vert_properties=np.ascontiguousarray(vertices, dtype=np.float64),
            tri_verts=np.ascontiguousarray(faces, dtype=np.uint64),
        )
    else:  # pragma: no cover - older manifold3d
        src = manifold3d.Mesh(
            vert_properties=np.ascontiguousarray(vertices, dtype=np.float32),
            tri_verts=np.ascontiguousarray(faces, dtype=np.uint32),
        )
    m = manifold3d.Manifold(src)
    if m.status() != manifold3d.Error.NoError or m.is_empty():
        return None
    out = m.to_mesh64() if hasattr(m, "to_mesh64") else m.to_mesh()
    v = np.asarray(out.vert_properties, dtype=np.float64)[:, :3]
    f = np.asarray(out.tri_verts, dtype=np.int64)
    return np.ascontiguousarray(v), np.ascontiguousarray(f)


def _simplify_in_process(vertices: np.ndarray, faces: np.ndarray, target: int, agg: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    import fast_simplification

    v2, f2 = fast_simplification.simplify(vertices, faces, target_count=target, agg=agg)
    return np.asarray(v2, dtype=np.float64), np.asarray(f2, dtype=np.int64)


def simplify_isolated(vertices: np.ndarray, faces: np.ndarray, target: int, agg: float,
                      meanwhile: Callable[[], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``fast_simplification.simplify`` in a forked child process; the result comes back
    through shared memory (the returned arrays are views of it).  ``meanwhile``, when given,
    is called in this process while the child works (a core of its own, no shared GIL).

    fast_simplification keeps its working copy of the mesh in global C++ vectors that are
    never freed (``clear()`` keeps their capacity): ~160 bytes per input triangle, 3.4 GB
    after the lungs surface (13.4 M triangles), held for the life of the process, so the
    manifold3d round trip and every later step of the job ran on top of it.  In a child the
    memory goes back to the system when it exits.  The child sees the input copy-on-write
    (nothing is pickled or copied).  Where ``os.fork`` is missing the call runs in process.
    """
    import mmap

    import fast_simplification  # noqa: F401 - imported here, not first in the child

    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
        if meanwhile is not None:
            meanwhile()
        return _simplify_in_process(vertices, faces, target, agg)
    v = np.ascontiguousarray(vertices, dtype=np.float64)
    f = np.ascontiguousarray(faces)
    nv, nf = len(v), len(f)  # a simplification never adds vertices or faces
    size = 16 + nv * 24 + nf * 24
    buf = mmap.mmap(-1, size)  # anonymous and shared with the child
    ok = False
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork in a threaded process; the child runs only the
            # decimator's own C++ code and numpy copies, and leaves by os._exit
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: no logging, no Python-level exit handlers
            code = 1
            try:
                v2, f2 = _simplify_in_process(v, f, target, agg)
                head = np.frombuffer(buf, dtype=np.int64, count=2)
                head[:] = (len(v2), len(f2))
                np.frombuffer(buf, dtype=np.float64, count=v2.size, offset=16)[:] = v2.ravel()
                np.frombuffer(buf, dtype=np.int64, count=f2.size, offset=16 + nv * 24)[:] = f2.ravel()
                code = 0
            except BaseException:  # noqa: BLE001 - said on stderr; the parent raises
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
            how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit code {os.WEXITSTATUS(status)}")
            raise RuntimeError(f"fast_simplification failed in its process ({how})")
        n_v2, n_f2 = (int(x) for x in np.frombuffer(buf, dtype=np.int64, count=2))
        # views, not copies: the mapping lives as long as the arrays
        v2 = np.frombuffer(buf, dtype=np.float64, count=n_v2 * 3, offset=16).reshape(-1, 3)
        f2 = np.frombuffer(buf, dtype=np.int64, count=n_f2 * 3, offset=16 + nv * 24).reshape(-1, 3)
        ok = True
        return v2, f2
    finally:
        if not ok:
            buf.close()


def _decimate(vertices: np.ndarray, faces: np.ndarray, target: int,
              meanwhile: Callable[[], object] | None = None) -> tuple[np.ndarray, np.ndarray, Topology | None]:
    """Decimate to about ``target`` triangles, keeping the mesh watertight and manifold.

    fast_simplification (in a child process: :func:`simplify_isolated`, ``meanwhile``
    called here while the first try runs), then a manifold3d round trip; if the result is
    not a closed 2-manifold, retry less aggressively, and as a last resort keep the input
    mesh.  Returns vertices, faces and the topology of the result (``None`` for the kept
    input).
    """
    for agg in (7.0, 3.0, 1.0):
        v2, f2 = simplify_isolated(vertices, faces, max(int(target), 4), agg, meanwhile)
        meanwhile = None
        res = _manifold_roundtrip(np.asarray(v2, dtype=np.float64), f2)
        if res is not None:
            topo = topology(res[1], len(res[0]))
            if topo.manifold:
                return res[0], res[1], topo
        log.debug("decimation to %d triangles (agg=%s) was not manifold; retrying", target, agg)
    log.warning("decimation could not keep the mesh manifold; keeping %d triangles", len(faces))
    return vertices, faces, None


def vertex_normals_of(vertices: np.ndarray, faces: np.ndarray, which: np.ndarray) -> np.ndarray:
    """:func:`vertex_normals` of the vertices ``which`` only (the same sums in the same order,
    so the same values), from the faces that touch them: for a few vertices of a large mesh."""
    which = np.asarray(which, dtype=np.int64)
    pos = np.full(len(vertices), -1, dtype=np.int64)
    pos[which] = np.arange(len(which))
    f = faces[np.any(pos[faces] >= 0, axis=1)]
    fn = face_normals(vertices, f, normalize=False)
    vn = np.zeros((len(which), 3))
    for c in range(3):
        at = pos[f[:, c]]
        hit = at >= 0
        part = np.zeros_like(vn)  # summed from zero, then added, as vertex_normals' bincount does
        np.add.at(part, at[hit], fn[hit])
        vn += part
    ln = np.linalg.norm(vn, axis=1, keepdims=True)
    np.divide(vn, ln, out=vn, where=ln > 0)
    return vn


def _coincident_ranks(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(dup, rank)``: the vertices that share their float32 triple with a vertex of lower
    index, and their rank ``1..g-1`` by index within their group of ``g``.  Empty arrays when
    all triples are distinct (one hash pass over the mesh; only the groups are sorted)."""
    k1, k2 = _float32_keys(vertices)
    res = _hash_groups(k1, k2)
    if res is None:  # pragma: no cover - a 64-bit collision: group by sorting both keys
        inv = float32_groups(vertices)[0]
        order = np.argsort(inv, kind="stable")
        start = np.r_[True, inv[order][1:] != inv[order][:-1]]
    else:
        order, start = res
    if start.all():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    gid = np.cumsum(start) - 1
    in_group = ~start  # every member of a group of two or more, the first one included
    in_group[:-1] |= ~start[1:]
    idx, g = order[in_group], gid[in_group]
    s = np.lexsort((idx, g))
    idx, g = idx[s], g[s]
    first = np.r_[True, g[1:] != g[:-1]]
    rank = np.arange(len(idx)) - np.maximum.accumulate(np.where(first, np.arange(len(idx)), 0))
    return idx[rank > 0], rank[rank > 0]


def separate_coincident(
    vertices: np.ndarray, faces: np.ndarray, *, step_mm: float = SEPARATION_MM, max_rounds: int = 8
) -> tuple[np.ndarray, int]:
    """Move distinct vertices that round to the same float32 triple apart along their normals.

    In a group of ``g`` coincident vertices the ``r``-th by index (``r = 1..g-1``) moves by
    ``r * step_mm`` (doubling every round that still finds coincidences) along its own
    area-weighted normal (outward), or along +x when it has none.  Returns the new
    vertices and the number of vertices moved.  Costs one hash pass over the vertices per
    round; normals are computed for the moved vertices only (a lungs surface of 3.3 M
    vertices has a few dozen to move).
    """
    v = np.array(vertices, dtype=np.float64, copy=True)
    moved = 0
    step = step_mm
    for _ in range(max_rounds):
        dup, rank = _coincident_ranks(v)
        if len(dup) == 0:  # the usual case: nothing to separate
            return v, moved
        r = rank.astype(np.float64)
        vn = vertex_normals_of(v, faces, dup)
        none = ~np.any(vn != 0, axis=1)
        vn[none] = (1.0, 0.0, 0.0)
        # at least a few float32 ULPs of the coordinate magnitude
        ulp = np.spacing(np.abs(v[dup]).max(axis=1).astype(np.float32)).astype(np.float64) * 4
        d = np.maximum(step * r, ulp * r)
        v[dup] += vn * d[:, None]
        moved += len(dup)
        step *= 2
    n_unique = float32_unique_count(v)
    if n_unique != len(v):
        log.warning("%d vertices still float32-coincident after separation", len(v) - n_unique)
    return v, moved


# --------------------------------------------------------------------------- public entry points


def _check_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError("affine must be finite and invertible")
    return a


def _mesh_crop(crop: np.ndarray, offset_kji: tuple[int, int, int], affine: np.ndarray, options: MeshOptions) -> Mesh:
    """Mesh a cropped boolean block whose voxel ``[0, 0, 0]`` is ``offset_kji`` in the full grid."""
    padded = np.zeros(tuple(s + 2 for s in crop.shape), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = crop
    v_idx, faces = _flying_edges(padded)
    if len(faces) == 0:
        return Mesh()
    # padded index (i, j, k) -> full-grid index: + offset - 1
    k0, j0, i0 = offset_kji
    v_idx += np.array([i0 - 1, j0 - 1, k0 - 1], dtype=np.float64)
    # einsum, not ``@``: a BLAS matmul this size wakes OpenBLAS's threads, which then spin for
    # ~0.1 s of CPU on the other core (measured); the 3x3 product needs no BLAS
    verts = np.einsum("ij,kj->ik", v_idx, affine[:3, :3])
    verts += affine[:3, 3]
    # outward winding: flying edges winds outward in index space for a right-handed grid;
    # a negative-determinant affine mirrors, so flip there.  Verified on the result below.
    if np.linalg.det(affine[:3, :3]) < 0:
        faces = faces[:, ::-1].copy()
    if signed_volume(verts, faces) < 0:
        faces = faces[:, ::-1].copy()

    verts = _smooth(verts, faces, options)

    target = _target_triangles(len(faces), options)
    decimated_from = None
    known = None
    if target is not None:
        # counted while the decimator's child process runs (13 M faces: ~2-3.5 s; on a
        # thread beside an in-process decimator both ran slower)
        decimated_from = {"triangles": len(faces)}
        n_before, faces_before = len(verts), faces

        def count() -> None:
            decimated_from["components"] = surface_components(faces_before, n_before)

        verts, faces, known = _decimate(verts, faces, target, meanwhile=count)
        if signed_volume(verts, faces) < 0:
            faces = faces[:, ::-1].copy()
            known = None  # the same counts, but recomputed rather than argued

    verts, moved = separate_coincident(verts, faces)
    if moved:
        log.debug("separated %d float32-coincident vertices", moved)
    # separate_coincident moves vertices only: the faces' topology is the decimation's
    return Mesh(verts, faces, decimated_from=decimated_from, known_topology=known)


def mesh_from_mask(mask: np.ndarray, affine: np.ndarray, options: MeshOptions | None = None) -> Mesh:
    """Surface mesh (LPS mm, outward winding) of a boolean ``[k, j, i]`` mask.

    The mask is cropped to its bounding box with one voxel of zero padding, so the
    surface is closed even where the mask touches the volume edge; the result is
    watertight and manifold, also as written to a float32 STL.

    Args:
        mask: boolean (or 0/1) array ``[slice, row, column]``.
        affine: 4x4 mapping ``(i, j, k, 1)`` to LPS mm (direction matrix included).
        options: smoothing/decimation; defaults to :class:`MeshOptions()`.

    Returns:
        The mesh; an empty :class:`Mesh` for an empty mask.
    """
    options = options or MeshOptions()
    a = _check_affine(affine)
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3-D [k, j, i], got shape {m.shape}")
    if m.dtype != bool:
        m = m != 0
    box = bounding_box(m)
    if box is None:
        return Mesh()
    return _mesh_crop(m[box], (box[0].start, box[1].start, box[2].start), a, options)


def mesh_labels(
    labels: np.ndarray,
    affine: np.ndarray,
    options_by_label: Mapping[int, MeshOptions | None],
) -> dict[int, Mesh]:
    """One mesh per label of an integer label map ``[k, j, i]``.

    Each label is cropped to its own bounding box (plus one voxel of padding) and meshed
    alone.  Labels absent from the map get an empty :class:`Mesh`.

    Args:
        labels: integer array ``[slice, row, column]`` (0 = background).
        affine: 4x4 mapping ``(i, j, k, 1)`` to LPS mm.
        options_by_label: the labels to mesh and their options (``None`` = defaults).

    Returns:
        ``{label: Mesh}`` in the order of ``options_by_label``.
    """
    from scipy import ndimage

    a = _check_affine(affine)
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be 3-D [k, j, i], got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {lab.dtype}")
    wanted = [int(x) for x in options_by_label]
    boxes: dict[int, tuple[slice, ...] | None] = {}
    positive = [x for x in wanted if x > 0]
    if positive and max(positive) <= 65535 and lab.min(initial=0) >= 0:
        objs = ndimage.find_objects(lab, max_label=max(positive))
        for x in positive:
            boxes[x] = objs[x - 1]
    out: dict[int, Mesh] = {}
    for x in wanted:
        box = boxes[x] if x in boxes else bounding_box(lab == x)
        opts = options_by_label[x] or MeshOptions()
        if box is None:
            out[x] = Mesh()
            continue
        crop = lab[box] == x
        out[x] = _mesh_crop(crop, (box[0].start, box[1].start, box[2].start), a, opts)
    return out
