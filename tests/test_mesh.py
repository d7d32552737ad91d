"""Tests for node.pipeline.mesh (the mesher and its STL/PLY files)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.errors import ProfileError
from node.pipeline.mesh.coincident import float32_groups, separate_coincident
from node.pipeline.mesh.decimate import simplify_isolated
from node.pipeline.mesh.extract import mesh_from_mask, mesh_labels
from node.pipeline.mesh.files import check_mesh, check_stl, load_stl, read_ply, read_stl, write_ply, write_stl
from node.pipeline.mesh.geometry import vertex_normals, vertex_normals_of
from node.pipeline.mesh.model import Mesh, MeshOptions
from node.pipeline.mesh.topology import surface_components, topology

# ---------------------------------------------------------------------- fixtures


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, j, i = np.indices(shape, dtype=np.float64)
    return i, j, k


def sphere_mask(shape=(48, 48, 48), radius_vox=(15.0, 15.0, 15.0), center=None) -> np.ndarray:
    """Ellipsoid in index space, radii given along (i, j, k)."""
    i, j, k = _grid(shape)
    c = center if center is not None else [(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2]
    return ((i - c[0]) / radius_vox[0]) ** 2 + ((j - c[1]) / radius_vox[1]) ** 2 + ((k - c[2]) / radius_vox[2]) ** 2 <= 1


def torus_mask(shape=(28, 56, 56), big=16.0, small=6.0) -> np.ndarray:
    i, j, k = _grid(shape)
    ci, cj, ck = (shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2
    q = np.hypot(i - ci, j - cj) - big
    return q**2 + (k - ck) ** 2 <= small**2


def diagonal_cubes_mask() -> np.ndarray:
    """Two cubes touching along an edge, plus a third touching the second at a corner."""
    m = np.zeros((20, 20, 20), dtype=bool)
    m[2:8, 2:8, 2:8] = True  # [k, j, i]
    m[2:8, 8:14, 8:14] = True  # shares the edge (j=8, i=8) with the first, along k
    m[8:14, 14:18, 14:18] = True  # shares only a corner with the second
    return m


def noisy_blob_mask(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((44, 44, 44)), 2.0)
    m = field > 0.02
    m[:, :, :2] = m[:, :, -2:] = False
    # add salt so there are single voxels and thin bridges
    m |= rng.random(m.shape) > 0.995
    return m


def spacing_affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.diag(spacing)
    a[:3, 3] = origin
    return a


def oblique_affine(spacing=(0.7, 0.9, 1.6), origin=(-120.0, 35.5, 410.25)) -> np.ndarray:
    """Rotated direction matrix, anisotropic spacing, negative determinant."""
    def rot(axis: int, ang: float) -> np.ndarray:
        c, s = math.cos(ang), math.sin(ang)
        r = np.eye(3)
        a, b = [x for x in range(3) if x != axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r

    d = rot(2, 0.6) @ rot(0, -0.45) @ rot(1, 0.3)
    d[:, 2] *= -1.0  # left-handed: slices run against row x column
    a = np.eye(4)
    a[:3, :3] = d * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


def assert_printable_on_disk(mesh: Mesh, tmp_path: Path, name: str = "m.stl") -> None:
    assert mesh.triangles > 0
    assert mesh.is_watertight and mesh.is_manifold
    assert mesh.coincident_vertices() == 0
    path = write_stl(mesh, tmp_path / name)
    chk = check_stl(path)
    assert chk.triangles == mesh.triangles
    assert chk.watertight, chk
    assert chk.manifold, chk
    assert chk.vertices == len(mesh.vertices), "float32-coincident vertices merged on re-read"
    assert chk.volume_ml > 0 and chk.outward and chk.printable
    assert chk.volume_ml == pytest.approx(mesh.volume_ml, rel=1e-4)


# ---------------------------------------------------------------------- options


def test_options_defaults_and_from_dict():
    o = MeshOptions()
    assert (o.smoothing, o.iterations, o.pass_band, o.decimate, o.max_triangles) == (
        "windowed_sinc", 20, 0.03, None, None,
    )
    o2 = MeshOptions.from_dict({"smoothing": "taubin", "iterations": 10, "decimate": 0.5, "max_triangles": 1000})
    assert o2 == MeshOptions("taubin", 10, 0.03, 0.5, 1000)
    assert MeshOptions.from_dict(o2.to_dict()) == o2
    assert MeshOptions.from_dict(None) == MeshOptions()
    assert MeshOptions.from_dict({"iterations": None}) == MeshOptions()


@pytest.mark.parametrize(
    "bad",
    [
        {"smoothing": "gaussian"},
        {"iterations": -1},
        {"iterations": 2.5},
        {"iterations": True},
        {"pass_band": 0},
        {"pass_band": 1.5},
        {"decimate": 0},
        {"decimate": 1.2},
        {"decimate": "half"},
        {"max_triangles": 2},
        {"max_triangles": 10.5},
        {"colour": "red"},
    ],
)
def test_options_validation(bad):
    with pytest.raises(ProfileError):
        MeshOptions.from_dict(bad)


# ---------------------------------------------------------------------- volume


SPHERE_SPACING = (0.8, 0.8, 1.25)
SPHERE_RADIUS_MM = 14.0


def _sphere_mm() -> tuple[np.ndarray, np.ndarray]:
    rv = tuple(SPHERE_RADIUS_MM / s for s in SPHERE_SPACING)
    shape = tuple(int(2 * r + 6) for r in rv[::-1])
    return sphere_mask(shape, rv), spacing_affine(SPHERE_SPACING, (10.0, -20.0, 30.0))


@pytest.mark.parametrize(
    "opts",
    [
        MeshOptions("windowed_sinc"),
        MeshOptions("taubin"),
        MeshOptions("windowed_sinc", decimate=0.3),
        MeshOptions("taubin", decimate=0.3),
        MeshOptions("none"),
    ],
    ids=["windowed_sinc", "taubin", "wsinc+decimate0.3", "taubin+decimate0.3", "none"],
)
def test_sphere_volume(opts, tmp_path):
    mask, aff = _sphere_mm()
    mesh = mesh_from_mask(mask, aff, opts)
    analytic_ml = 4.0 / 3.0 * math.pi * SPHERE_RADIUS_MM**3 / 1000.0
    assert mesh.volume_ml == pytest.approx(analytic_ml, rel=0.03)
    if opts.decimate:
        full = mesh_from_mask(mask, aff, MeshOptions(opts.smoothing))
        assert mesh.triangles <= 0.31 * full.triangles
        assert mesh.triangles >= 0.25 * full.triangles
    assert_printable_on_disk(mesh, tmp_path)


def test_laplacian_shrinks_but_stays_closed(tmp_path):
    mask, aff = _sphere_mm()
    wsinc = mesh_from_mask(mask, aff, MeshOptions("windowed_sinc"))
    lap = mesh_from_mask(mask, aff, MeshOptions("laplacian"))
    assert lap.volume_ml < wsinc.volume_ml
    assert_printable_on_disk(lap, tmp_path)


def test_max_triangles(tmp_path):
    mask, aff = _sphere_mm()
    mesh = mesh_from_mask(mask, aff, MeshOptions(max_triangles=800))
    assert 600 <= mesh.triangles <= 800
    assert_printable_on_disk(mesh, tmp_path)
    both = mesh_from_mask(mask, aff, MeshOptions(decimate=0.9, max_triangles=800))
    assert both.triangles <= 800


def _cube_and_islands() -> tuple[np.ndarray, int]:
    """A 12-voxel cube and single-voxel islands around it (none touching another)."""
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[14:26, 14:26, 14:26] = True
    islands = np.zeros_like(mask)
    islands[1:-1:3, 1:-1:3, 1:-1:3] = True
    islands[12:28, 12:28, 12:28] = False  # clear of the cube
    return mask | islands, int(np.count_nonzero(islands))


def test_surface_components_counts_islands_and_cavities():
    mask, n_islands = _cube_and_islands()
    plain = mesh_from_mask(mask, np.eye(4), MeshOptions(smoothing="none"))
    assert plain.decimated_from is None
    assert surface_components(plain.faces, len(plain.vertices)) == 1 + n_islands
    hollow = np.zeros((12, 12, 12), dtype=bool)
    hollow[1:11, 1:11, 1:11] = True
    hollow[4:8, 4:8, 4:8] = False  # a cavity: an inner surface of its own
    m = mesh_from_mask(hollow, np.eye(4), MeshOptions(smoothing="none"))
    assert surface_components(m.faces, len(m.vertices)) == 2
    # unused vertices are no components
    assert surface_components(m.faces, len(m.vertices) + 5) == 2
    assert surface_components(np.zeros((0, 3), dtype=np.int64), 3) == 0


def test_decimation_records_the_components_it_removed(tmp_path):
    # a decimator meets its target by collapsing the smallest components first: the islands go,
    # the cube stays; the mesh says what it was before, so the report can say what was removed
    mask, n_islands = _cube_and_islands()
    mesh = mesh_from_mask(mask, np.eye(4), MeshOptions(max_triangles=3000))
    assert mesh.triangles <= 3000 and mesh.decimated_from is not None
    assert mesh.decimated_from["components"] == 1 + n_islands
    assert mesh.decimated_from["triangles"] > 3000
    after = check_mesh(mesh)
    assert after.printable and after.components < mesh.decimated_from["components"]
    # the decimation's check of its result is the mesh's topology (separation moved vertices only)
    assert mesh.known_topology == topology(mesh.faces, len(mesh.vertices))
    assert mesh_from_mask(mask, np.eye(4), MeshOptions()).known_topology is None
    assert abs(after.volume_ml - 1.728) < 0.05 * 1.728  # the cube (12 mm)^3 is kept


def test_simplify_isolated_gives_what_fast_simplification_gives_in_process():
    import node.pipeline.mesh.decimate as decimate_mod

    mesh = mesh_from_mask(sphere_mask((30, 30, 30), (10, 11, 9)), np.eye(4), MeshOptions())
    target = len(mesh.faces) // 3
    here: list[int] = []
    v1, f1 = simplify_isolated(mesh.vertices, mesh.faces, target, 7.0, meanwhile=lambda: here.append(os.getpid()))
    assert here == [os.getpid()]  # the work given for meanwhile ran once, in this process
    v0, f0 = decimate_mod._simplify_in_process(mesh.vertices, mesh.faces, target, 7.0)
    assert len(f1) <= target and np.array_equal(v0, v1) and np.array_equal(f0, f1)


def test_simplify_isolated_reaps_its_child_when_meanwhile_fails():
    import psutil

    mesh = mesh_from_mask(sphere_mask((30, 30, 30), (10, 11, 9)), np.eye(4), MeshOptions())

    def fails() -> None:
        raise ValueError("meanwhile failed")

    before = {c.pid for c in psutil.Process().children()}
    with pytest.raises(ValueError, match="meanwhile failed"):
        simplify_isolated(mesh.vertices, mesh.faces, len(mesh.faces) // 3, 7.0, meanwhile=fails)
    assert {c.pid for c in psutil.Process().children()} == before  # waited for: neither running nor a zombie


def test_simplify_isolated_reports_a_failed_child(capfd):
    with pytest.raises(RuntimeError, match=r"fast_simplification failed in its process \(exit code 1\)"):
        simplify_isolated(np.random.default_rng(0).random((10, 3)), np.zeros((4, 4), dtype=np.int64), 2, 7.0)
    assert "Expected ``triangles`` array to be (n, 3)" in capfd.readouterr().err  # the child's traceback


_SIMPLIFY_MEMORY = r"""
import gc
import numpy as np
import node.pipeline.mesh.decimate as M
from node.pipeline.hu.heap import process_rss
from node.pipeline.mesh.extract import mesh_from_mask
from node.pipeline.mesh.model import MeshOptions

r = 110
z, y, x = np.ogrid[:240, :240, :240]
mesh = mesh_from_mask((z - 120) ** 2 + (y - 120) ** 2 + (x - 120) ** 2 < r * r, np.eye(4), MeshOptions("none"))
target = len(mesh.faces) // 2

def grown(call):
    gc.collect()
    before = process_rss()
    out = call(mesh.vertices, mesh.faces, target, 7.0)
    del out
    gc.collect()
    return (process_rss() - before) / 2**20

isolated = grown(M.simplify_isolated)
in_process = grown(M._simplify_in_process)
print(len(mesh.faces), round(isolated, 1), round(in_process, 1))
"""


def test_simplify_isolated_leaves_no_memory_behind():
    # fast_simplification keeps its copy of the mesh (~160 B per triangle) in global vectors
    # for the life of the process; run in a child, the process keeps none of it
    out = subprocess.run([sys.executable, "-c", _SIMPLIFY_MEMORY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    faces, isolated, in_process = out.stdout.split()[-3:]
    assert int(faces) > 400_000
    assert float(isolated) < 20, out.stdout  # MB kept by this process after the isolated call
    assert float(in_process) > 0.5 * int(faces) * 160 / 2**20, out.stdout  # the in-process call keeps its copy


# ---------------------------------------------------------------------- watertight / manifold on disk


SHAPES = {
    "sphere": lambda: sphere_mask((40, 40, 40), (13.0, 13.0, 13.0)),
    "torus": torus_mask,
    "diagonal_cubes": diagonal_cubes_mask,
    "noisy_blob": noisy_blob_mask,
}
PIPELINES = {
    "default": MeshOptions(),
    "none": MeshOptions("none"),
    "taubin": MeshOptions("taubin"),
    "decimate0.3": MeshOptions(decimate=0.3),
    "wsinc60": MeshOptions(iterations=60),
    "wsinc60+decimate0.2": MeshOptions(iterations=60, decimate=0.2),
}


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_watertight_on_disk(shape, pipeline, tmp_path):
    mask = SHAPES[shape]()
    aff = spacing_affine((0.6, 0.6, 1.0), (-50.0, 20.0, 100.0))
    mesh = mesh_from_mask(mask, aff, PIPELINES[pipeline])
    assert_printable_on_disk(mesh, tmp_path)


def test_torus_genus_and_diagonal_components():
    torus = mesh_from_mask(torus_mask(), np.eye(4), MeshOptions())
    # Euler characteristic V - E + F = 2 - 2g = 0 for a torus
    topo = topology(torus.faces, len(torus.vertices))
    assert len(torus.vertices) - topo.edges + topo.triangles == 0
    assert topo.components == 1


def test_mask_touching_volume_edge_is_closed(tmp_path):
    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[:, :6, :] = True  # touches five faces of the volume
    mesh = mesh_from_mask(mask, spacing_affine((1.0, 2.0, 3.0)), MeshOptions())
    assert_printable_on_disk(mesh, tmp_path)
    # box of 14 x 6 x 10 voxels = 14 * 12 * 30 mm^3, a bit less after rounding the corners
    assert 0.85 * 5.04 < mesh.volume_ml < 5.04


def test_hollow_sphere_cavity_wound_inward(tmp_path):
    shape = (40, 40, 40)
    shell = sphere_mask(shape, (15, 15, 15)) & ~sphere_mask(shape, (9, 9, 9))
    for aff in (spacing_affine((1.0, 1.0, 1.0)), oblique_affine((1.0, 1.0, 1.0))):
        mesh = mesh_from_mask(shell, aff, MeshOptions())
        expected_ml = 4 / 3 * math.pi * (15**3 - 9**3) / 1000
        assert mesh.volume_ml == pytest.approx(expected_ml, rel=0.04)
        assert topology(mesh.faces, len(mesh.vertices)).components == 2
        assert_printable_on_disk(mesh, tmp_path)


# ---------------------------------------------------------------------- position (oblique affine)


def test_oblique_affine_position(tmp_path):
    aff = oblique_affine()
    assert np.linalg.det(aff[:3, :3]) < 0
    shape = (30, 52, 60)  # [k, j, i]
    center_ijk = np.array([31.3, 24.6, 13.2])
    target_lps = aff[:3, :3] @ center_ijk + aff[:3, 3]
    radius_mm = 9.0
    i, j, k = _grid(shape)
    ijk = np.stack([i, j, k], axis=-1)
    lps = ijk @ aff[:3, :3].T + aff[:3, 3]
    mask = np.linalg.norm(lps - target_lps, axis=-1) <= radius_mm

    mesh = mesh_from_mask(mask, aff, MeshOptions())
    half_voxel = 0.5 * min(np.linalg.norm(aff[:3, :3], axis=0))
    assert np.linalg.norm(mesh.centroid - target_lps) < half_voxel
    assert mesh.volume_ml > 0  # outward in spite of the negative determinant
    assert mesh.volume_ml == pytest.approx(4 / 3 * math.pi * radius_mm**3 / 1000, rel=0.05)
    assert_printable_on_disk(mesh, tmp_path)
    # the file holds the same LPS positions
    disk = load_stl(tmp_path / "m.stl")
    assert np.linalg.norm(disk.centroid - target_lps) < half_voxel

    # a dicom2stl-style pipeline (origin + spacing, direction ignored) lands elsewhere
    naive = spacing_affine(np.linalg.norm(aff[:3, :3], axis=0), aff[:3, 3])
    wrong = mesh_from_mask(mask, naive, MeshOptions())
    assert np.linalg.norm(wrong.centroid - target_lps) > 10 * half_voxel


def test_mesh_labels_crops_match_full_masks():
    lab = np.zeros((36, 40, 44), dtype=np.int16)
    lab[sphere_mask(lab.shape, (8, 8, 8), center=(12, 12, 12))] = 3
    lab[sphere_mask(lab.shape, (6, 9, 7), center=(30, 26, 22))] = 7
    aff = oblique_affine()
    opts = MeshOptions()
    out = mesh_labels(lab, aff, {3: opts, 7: MeshOptions("taubin"), 9: None})
    assert list(out) == [3, 7, 9]
    ref3 = mesh_from_mask(lab == 3, aff, opts)
    np.testing.assert_allclose(out[3].vertices, ref3.vertices, atol=1e-9)
    np.testing.assert_array_equal(out[3].faces, ref3.faces)
    assert out[7].triangles > 0 and out[7].is_watertight and out[7].volume_ml > 0
    assert out[9].is_empty


# ---------------------------------------------------------------------- files


def test_stl_header_and_layout(tmp_path):
    mesh = mesh_from_mask(sphere_mask((20, 20, 20), (6, 6, 6)), np.eye(4), MeshOptions())
    path = write_stl(mesh, tmp_path / "sub" / "s.stl")
    raw = path.read_bytes()
    assert raw.startswith(b"SPACE=LPS")
    assert len(raw) == 84 + 50 * mesh.triangles
    tris, header = read_stl(path)
    assert header.startswith("SPACE=LPS")
    np.testing.assert_array_equal(tris, mesh.vertices.astype(np.float32)[mesh.faces])
    # normals are unit and point outward (same side as the winding)
    normals = np.frombuffer(raw, dtype="<f4", count=mesh.triangles * 12 + 0, offset=84)
    rec = np.frombuffer(raw[84:], dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]))
    np.testing.assert_allclose(np.linalg.norm(rec["n"], axis=1), 1.0, atol=1e-5)
    outward = np.einsum("ij,ij->i", rec["n"], rec["v"].mean(axis=1) - mesh.centroid)
    assert np.all(outward > 0)
    del normals
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["s.stl"]  # no temp file left
    with pytest.raises(ValueError):
        write_stl(mesh, tmp_path / "bad.stl", header="solid looks like ascii")


def test_stl_readable_by_trimesh(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    mesh = mesh_from_mask(torus_mask(), spacing_affine((0.5, 0.5, 0.8)), MeshOptions(decimate=0.5))
    path = write_stl(mesh, tmp_path / "t.stl")
    tm = trimesh.load(path, force="mesh")
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(mesh.volume_ml * 1000, rel=1e-4)


def test_ply_colors_round_trip(tmp_path):
    mesh = mesh_from_mask(sphere_mask((20, 20, 20), (6, 6, 6)), spacing_affine((0.5, 0.5, 0.5)), MeshOptions())
    path = write_ply(mesh, tmp_path / "s.ply", color=(230, 41, 7))
    raw = path.read_bytes()
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\n")
    back, colors = read_ply(path)
    assert colors.shape == (len(mesh.vertices), 3)
    assert np.all(colors == (230, 41, 7))
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-5)
    trimesh = pytest.importorskip("trimesh")
    tm = trimesh.load(path, process=False)
    assert np.all(np.asarray(tm.visual.vertex_colors)[:, :3] == (230, 41, 7))
    assert len(tm.faces) == mesh.triangles
    with pytest.raises(ValueError):
        write_ply(mesh, tmp_path / "bad.ply", color=(256, 0, 0))


def test_check_stl_detects_float32_coincident_vertices(tmp_path):
    # two tetrahedra whose apexes are distinct in float64 but equal in float32: in memory
    # everything is fine, on disk the apexes merge into a pinch vertex.
    base = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float64)
    apex = np.array([0.3, 0.3, 1.0])
    v = np.vstack([base, [apex], base + [0, 0, 2.0], [apex + [0, 0, 1e-9]]])
    tet = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    lower = tet
    # upper tetra mirrored in z so its apex points down onto the lower apex
    upper = tet[:, ::-1] + 4
    mesh = Mesh(v, np.vstack([lower, upper]))
    mesh.vertices[4:7, 2] = 2.0
    assert mesh.is_watertight and mesh.is_manifold
    assert mesh.coincident_vertices() == 1
    write_stl(mesh, tmp_path / "pinch.stl")
    chk = check_stl(tmp_path / "pinch.stl")
    assert chk.watertight and not chk.manifold and chk.nonmanifold_vertices == 1
    assert not check_mesh(mesh).manifold

    fixed_v, moved = separate_coincident(mesh.vertices, mesh.faces)
    assert moved == 1
    _, n_unique = float32_groups(fixed_v)
    assert n_unique == len(fixed_v)
    assert np.abs(fixed_v - mesh.vertices).max() < 1e-3
    write_stl(Mesh(fixed_v, mesh.faces), tmp_path / "fixed.stl")
    assert check_stl(tmp_path / "fixed.stl").manifold


def test_vertex_normals_of_some_vertices_equal_all_normals():
    mesh = mesh_from_mask(sphere_mask((20, 20, 20), (6, 7, 5)), np.eye(4), MeshOptions())
    rng = np.random.default_rng(3)
    every = vertex_normals(mesh.vertices, mesh.faces)
    for size in (1, 17, len(mesh.vertices)):
        which = rng.choice(len(mesh.vertices), size=size, replace=False)
        assert np.array_equal(vertex_normals_of(mesh.vertices, mesh.faces, which), every[which])


def test_separate_coincident_moves_the_later_members_of_each_group_by_rank():
    # a sphere whose vertices are copied into groups of 2 and 3 (the copies in scattered places,
    # each with a face of its own so it has a normal): the lowest index of a group stays, the
    # r-th by index moves r * step along its own normal; one hash pass finds them all
    mesh = mesh_from_mask(sphere_mask((20, 20, 20), (6, 7, 5)), np.eye(4), MeshOptions())
    v, f = mesh.vertices.copy(), mesh.faces.copy()
    n = len(v)
    rng = np.random.default_rng(5)
    src = rng.choice(n, size=40, replace=False)
    copies = np.r_[src, src[:10]]  # 40 groups of two, 10 of them of three
    v2 = np.vstack([v, v[copies]])
    extra = []
    for i, s in enumerate(copies):  # the copy stands in for s in one of s's faces (same orientation)
        row = f[np.any(f == s, axis=1)][0]
        extra.append(np.where(row == s, n + i, row))
    f2 = np.vstack([f, np.array(extra)])
    perm = rng.permutation(len(v2))  # the copies are not at the end: ranks follow the index
    inv = np.argsort(perm)
    v3, f3 = v2[perm], inv[f2]
    normals = vertex_normals(v3, f3)
    out, moved = separate_coincident(v3, f3, step_mm=1e-3)
    assert moved == 50
    shift = np.linalg.norm(out - v3, axis=1)
    for s in src:
        members = np.sort(inv[np.r_[s, n + np.flatnonzero(copies == s)]])
        assert shift[members[0]] == 0
        for r, m in enumerate(members[1:], start=1):
            assert np.allclose(out[m] - v3[m], normals[m] * r * 1e-3)
    assert np.count_nonzero(shift) == 50
    assert separate_coincident(out, f3)[1] == 0


def test_check_stl_detects_open_and_flipped(tmp_path):
    mesh = mesh_from_mask(sphere_mask((16, 16, 16), (5, 5, 5)), np.eye(4), MeshOptions())
    write_stl(Mesh(mesh.vertices, mesh.faces[1:]), tmp_path / "open.stl")
    chk = check_stl(tmp_path / "open.stl")
    assert not chk.watertight and chk.boundary_edges == 3
    flipped = mesh.faces.copy()
    flipped[0] = flipped[0, ::-1]
    write_stl(Mesh(mesh.vertices, flipped), tmp_path / "flip.stl")
    chk = check_stl(tmp_path / "flip.stl")
    assert not chk.watertight and chk.inconsistent_edges == 3
    write_stl(Mesh(mesh.vertices, mesh.faces[:, ::-1]), tmp_path / "inside_out.stl")
    chk = check_stl(tmp_path / "inside_out.stl")
    assert chk.watertight and chk.volume_ml < 0 and not chk.printable


# ---------------------------------------------------------------------- empty


def test_empty_mask(tmp_path):
    mesh = mesh_from_mask(np.zeros((5, 6, 7), dtype=bool), oblique_affine(), MeshOptions(decimate=0.5))
    assert mesh.is_empty and mesh.triangles == 0 and mesh.volume_ml == 0.0
    assert mesh.vertices.shape == (0, 3) and mesh.faces.shape == (0, 3)
    assert not mesh.is_watertight
    path = write_stl(mesh, tmp_path / "empty.stl")
    assert path.stat().st_size == 84
    chk = check_stl(path)
    assert chk.triangles == 0 and not chk.watertight
    write_ply(mesh, tmp_path / "empty.ply")
    back, colors = read_ply(tmp_path / "empty.ply")
    assert back.is_empty and colors.shape == (0, 3)
    assert mesh_labels(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4), {1: None})[1].is_empty


def test_single_voxel(tmp_path):
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1, 1, 1] = True
    for opts in (MeshOptions(), MeshOptions(decimate=0.5), MeshOptions("taubin", iterations=60)):
        mesh = mesh_from_mask(mask, spacing_affine((0.5, 0.5, 0.5)), opts)
        assert_printable_on_disk(mesh, tmp_path)


def test_decimation_falls_back_to_undecimated_when_not_manifold(monkeypatch, tmp_path, caplog):
    import node.pipeline.mesh.decimate as decimate_mod

    monkeypatch.setattr(decimate_mod, "_manifold_roundtrip", lambda v, f: None)
    mask = sphere_mask((24, 24, 24), (8, 8, 8))
    full = mesh_from_mask(mask, np.eye(4), MeshOptions())
    with caplog.at_level("WARNING", logger="node.pipeline.mesh.decimate"):
        mesh = mesh_from_mask(mask, np.eye(4), MeshOptions(decimate=0.3))
    assert mesh.triangles == full.triangles
    assert "could not keep the mesh manifold" in caplog.text
    assert_printable_on_disk(mesh, tmp_path)
