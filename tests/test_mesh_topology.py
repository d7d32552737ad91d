"""Tests for the fast paths of node.pipeline.mesh.topology.topology, against the former implementation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import node.pipeline.mesh.topology as topology_mod
from node.pipeline.mesh.coincident import separate_coincident
from node.pipeline.mesh.extract import mesh_from_mask
from node.pipeline.mesh.model import Mesh, MeshOptions
from node.pipeline.mesh.topology import Topology, topology
from test_mesh import diagonal_cubes_mask, noisy_blob_mask, oblique_affine, sphere_mask, torus_mask


def reference_topology(faces: np.ndarray, n_vertices: int | None = None) -> Topology:
    """The implementation of :func:`topology` before its fast paths (commit b460776), kept to
    compare against.

    One sort of the undirected edge keys gives the edge counts, the winding check and,
    for a closed consistently wound mesh (every edge used twice, once per direction),
    each half-edge's twin directly (the two uses are adjacent in sorted order).  Other
    meshes look their twins up by binary search.
    """
    from scipy.sparse import coo_matrix, csr_matrix
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
    fwd = a < b  # direction of the half-edge along its undirected edge
    ukey = np.where(fwd, a, b) * nv + np.where(fwd, b, a)
    order = np.argsort(ukey)
    sk = ukey[order]
    n3 = len(sk)
    start = np.empty(n3, dtype=bool)
    start[0] = True
    np.not_equal(sk[1:], sk[:-1], out=start[1:])
    starts = np.flatnonzero(start)
    del start, sk
    counts = np.diff(np.append(starts, n3))
    n_edges = len(starts)
    boundary = int(np.count_nonzero(counts == 1))
    nonmanifold = int(np.count_nonzero(counts > 2))
    # Two uses in the same direction -> inconsistent winding.
    fwd_count = np.add.reduceat(fwd[order].astype(np.int64), starts)
    inconsistent = int(np.count_nonzero((counts == 2) & (fwd_count != 1)))

    # vertex fans: corner c (vertex a[c], outgoing edge a->b) is linked to the corner of the
    # twin half-edge's face at the same vertex: twin is b->a in face g; at vertex a in g the
    # corner is the one whose *incoming* edge is b->a, i.e. the next corner after the twin.
    if boundary == 0 and nonmanifold == 0 and inconsistent == 0:
        # every edge: two half-edges in opposite directions, adjacent in ``order``
        pairs = order.reshape(-1, 2)
        twin = np.empty(n3, dtype=np.int64)
        twin[pairs[:, 0]] = pairs[:, 1]
        twin[pairs[:, 1]] = pairs[:, 0]
        del pairs
        nxt = twin - twin % 3 + (twin % 3 + 1) % 3  # a permutation of the corners
        del twin
        graph = csr_matrix(
            (np.ones(n3, dtype=np.int8), nxt, np.arange(n3 + 1, dtype=np.int64)), shape=(n3, n3)
        )
        n_comp, lab = connected_components(graph, directed=True, connection="weak")
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
    fan_vertex = np.empty(n_comp, dtype=np.int64)
    fan_vertex[lab] = a
    fans = np.bincount(fan_vertex, minlength=nv)
    nonmanifold_vertices = int(np.count_nonzero(fans > 1))
    used = fans > 0

    # connected components by shared vertices
    vg = coo_matrix((np.ones(3 * m, dtype=np.int8), (a, b)), shape=(nv, nv))
    _, vlab = connected_components(vg, directed=False)
    n_components = int(np.count_nonzero(np.bincount(vlab[used])))
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


# ---------------------------------------------------------------------- meshes to compare on


def _tetra_pair_pinch() -> tuple[np.ndarray, np.ndarray]:
    """Two tetrahedra sharing one apex vertex (closed, consistently wound, one pinch vertex)."""
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0.3, 0.3, 1.0], [0, 0, 2], [1, 0, 2], [0, 1, 2]], dtype=float)
    tet = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    upper = tet[:, ::-1] + 4
    upper[upper == 7] = 3  # the upper apex is the lower apex
    return v, np.vstack([tet, upper])


def _mesh(mask: np.ndarray, opts: MeshOptions | None = None, affine: np.ndarray | None = None) -> Mesh:
    return mesh_from_mask(mask, np.eye(4) if affine is None else affine, opts or MeshOptions())


def _cases() -> dict[str, tuple[np.ndarray, int | None]]:
    """``name -> (faces, n_vertices)``: closed, open, non-manifold and garbage meshes."""
    rng = np.random.default_rng(3)
    sphere = _mesh(sphere_mask((20, 20, 20), (6, 6, 6)))
    torus = _mesh(torus_mask())
    cubes = _mesh(diagonal_cubes_mask(), MeshOptions("none"))
    blob = _mesh(noisy_blob_mask(), MeshOptions(decimate=0.4), oblique_affine())
    pv, pf = _tetra_pair_pinch()
    f = sphere.faces
    nv = len(sphere.vertices)
    flipped = f.copy()
    flipped[5] = flipped[5, ::-1]
    inside_out = f[:, ::-1].copy()
    degenerate = f.copy()
    degenerate[7, 1] = degenerate[7, 0]
    two_spheres = np.vstack([f, f + nv])
    # the same sphere twice over the same vertices: every edge used four times
    doubled = np.vstack([f, f])
    # two spheres glued at one vertex (a pinch inside a closed mesh)
    glued = two_spheres.copy()
    glued[glued == nv + int(f[0, 0])] = int(f[0, 0])
    # a 'bowtie' of two closed fans sharing a vertex that is not closed elsewhere
    cases: dict[str, tuple[np.ndarray, int | None]] = {
        "sphere": (f, nv),
        "sphere_nv_none": (f, None),
        "sphere_unused_vertices": (f, nv + 17),
        "torus": (torus.faces, len(torus.vertices)),
        "diagonal_cubes": (cubes.faces, len(cubes.vertices)),
        "blob_decimated": (blob.faces, len(blob.vertices)),
        "open": (f[1:], nv),
        "flipped_face": (flipped, nv),
        "inside_out": (inside_out, nv),
        "degenerate_face": (degenerate, nv),
        "two_spheres": (two_spheres, 2 * nv),
        "doubled": (doubled, nv),
        "glued_pinch": (glued, 2 * nv),
        "tetra_pinch": (pf, len(pv)),
        "single_triangle": (np.array([[0, 1, 2]]), 3),
        "triangle_and_reverse": (np.array([[0, 1, 2], [0, 2, 1]]), 3),
        "self_loop_pair": (np.array([[0, 0, 1], [1, 0, 0]]), 2),
        "all_same_vertex": (np.array([[4, 4, 4], [4, 4, 4]]), 5),
    }
    for nvr in (3, 5, 9, 40):  # random soups: lots of non-manifold structure
        cases[f"random_{nvr}"] = (rng.integers(0, nvr, size=(2 * nvr + 6, 3)), nvr)
    # random relabelling of a closed mesh keeps it closed; random face order too
    perm = rng.permutation(nv)
    cases["sphere_relabelled"] = (perm[f][rng.permutation(len(f))], nv)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_topology_matches_former_implementation(name):
    faces, nv = CASES[name]
    assert dataclasses.astuple(topology(faces, nv)) == dataclasses.astuple(reference_topology(faces, nv))


def test_topology_cases_cover_every_path():
    """The cases above reach each branch: closed, closed with pinch, open, inconsistent, unpacked keys."""
    topos = {name: topology(f, nv) for name, (f, nv) in CASES.items()}
    assert topos["sphere"].manifold and topos["torus"].manifold
    assert topos["two_spheres"].components == 2 and topos["two_spheres"].manifold
    assert topos["glued_pinch"].watertight and topos["glued_pinch"].nonmanifold_vertices == 1
    assert topos["glued_pinch"].components == 1
    assert topos["tetra_pinch"].watertight and topos["tetra_pinch"].nonmanifold_vertices == 1
    assert topos["open"].boundary_edges == 3
    assert topos["flipped_face"].inconsistent_edges == 3
    assert topos["doubled"].nonmanifold_edges == topos["sphere"].edges
    assert topos["degenerate_face"].degenerate_faces == 1
    assert topos["sphere_relabelled"] == topos["sphere"]


def test_topology_on_separated_float32_mesh_matches():
    # the mesh as written: vertices separated in float32, same faces
    m = _mesh(noisy_blob_mask(), MeshOptions(iterations=60), oblique_affine())
    v, _ = separate_coincident(m.vertices, m.faces)
    assert dataclasses.astuple(topology(m.faces, len(v))) == dataclasses.astuple(reference_topology(m.faces, len(v)))


def test_sorted_edge_keys_packed_and_fallback():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 1000, size=5000).astype(np.int64)
    for bound in (1000, 2**62):  # packs; too wide to pack
        order, sk = topology_mod._sorted_edge_keys(keys.copy(), bound)  # consumes its argument
        assert np.array_equal(np.sort(order), np.arange(len(keys)))
        assert np.array_equal(keys[order], np.sort(keys))
        assert np.array_equal(np.asarray(sk, dtype=np.int64), np.sort(keys))


@pytest.mark.parametrize("name", ["sphere", "glued_pinch", "open", "doubled", "random_9"])
def test_topology_with_unpacked_keys_matches(name, monkeypatch):
    """Keys too wide to pack with their positions (huge meshes) take the argsort path."""
    packed = topology_mod._sorted_edge_keys
    monkeypatch.setattr(topology_mod, "_sorted_edge_keys", lambda ukey, bound: packed(ukey, 2**64))
    faces, nv = CASES[name]
    assert dataclasses.astuple(topology(faces, nv)) == dataclasses.astuple(reference_topology(faces, nv))


def test_closed_manifold_mesh_skips_the_vertex_graph(monkeypatch):
    """A closed manifold mesh takes its components from the face graph, not the vertex graph."""
    import scipy.sparse

    m = _mesh(torus_mask())

    def no_coo(*args, **kwargs):
        raise AssertionError("vertex graph built for a closed manifold mesh")

    monkeypatch.setattr(scipy.sparse, "coo_matrix", no_coo)
    topo = topology(m.faces, len(m.vertices))
    assert topo.manifold and topo.components == 1
