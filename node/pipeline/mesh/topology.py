"""Topology of a triangle mesh: edge counts, winding, vertex fans and connected components."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np


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
    ``key << s | pos`` replaces the argsort (faster: numpy's SIMD sort covers plain sorts of
    64-bit integers better than argsorts), and ``order`` is int32 where
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
    b: np.ndarray = np.empty_like(f)  # directed half-edge a -> b belongs to corner c
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
        twin: np.ndarray = np.empty(n3, dtype=idx_t)
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


def surface_components(faces: np.ndarray, n_vertices: int) -> int:
    """Connected components of a triangle mesh by shared vertices (unused vertices not counted).

    Two edges per face join its three corners: a weak search over that directed graph (no
    symmetric copy).
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
