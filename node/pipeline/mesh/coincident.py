"""Vertices that coincide once stored as float32 (as in STL and PLY files): counted, grouped as
an STL reader merges them, and moved apart so that the written mesh stays manifold.
"""

from __future__ import annotations

import logging

import numpy as np

from node.pipeline.mesh.geometry import vertex_normals_of

log = logging.getLogger(__name__)


#: distance (mm) by which float32-coincident distinct vertices are moved apart.
SEPARATION_MM = 1e-4


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
    round; normals are computed for the moved vertices only (a large surface has a few dozen
    to move).
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
