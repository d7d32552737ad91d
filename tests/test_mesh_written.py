"""Tests for the cheap on-disk check of a freshly written STL (check_written_stl), the
block-wise STL writer and signed volume, against check_stl and the former code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import node.pipeline.mesh.files as mesh_io
import node.pipeline.mesh.geometry as geometry_mod
import node.pipeline.mesh.topology as topology_mod
from node.pipeline.mesh.extract import mesh_from_mask
from node.pipeline.mesh.files import DEFAULT_STL_HEADER, check_stl, check_written_stl, write_stl
from node.pipeline.mesh.geometry import face_normals, signed_volume
from node.pipeline.mesh.model import Mesh, MeshOptions
from test_mesh import noisy_blob_mask, oblique_affine, sphere_mask, torus_mask


def former_write_stl_bytes(mesh: Mesh, header: str = DEFAULT_STL_HEADER) -> bytes:
    """What write_stl wrote before it worked block-wise (commit b460776)."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    verts32 = np.asarray(mesh.vertices, dtype=np.float32)
    rec = np.zeros(len(faces), dtype=mesh_io._STL_RECORD)
    tri = verts32[faces]
    rec["v"] = tri
    rec["normal"] = face_normals(tri.reshape(-1, 3).astype(np.float64), np.arange(3 * len(faces)).reshape(-1, 3))
    return header.encode("ascii").ljust(80, b" ") + np.uint32(len(faces)).astype("<u4").tobytes() + rec.tobytes()


def pinch_mesh() -> Mesh:
    """Two tetrahedra whose apexes differ in float64 but not in float32 (a pinch on disk)."""
    base = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float64)
    apex = np.array([0.3, 0.3, 1.0])
    v = np.vstack([base, [apex], base + [0, 0, 2.0], [apex + [0, 0, 1e-9]]])
    tet = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    return Mesh(v, np.vstack([tet, tet[:, ::-1] + 4]))


@pytest.fixture(scope="module")
def meshes() -> dict[str, Mesh]:
    return {
        "sphere": mesh_from_mask(sphere_mask((24, 24, 24), (8, 8, 8)), np.eye(4), MeshOptions()),
        "torus": mesh_from_mask(torus_mask(), oblique_affine(), MeshOptions()),
        "blob_decimated": mesh_from_mask(noisy_blob_mask(), oblique_affine(), MeshOptions(decimate=0.3)),
        "pinch": pinch_mesh(),
    }


@pytest.fixture
def full_checks(monkeypatch) -> list[Path]:
    """Records every fall back of check_written_stl to the full check_stl."""
    calls: list[Path] = []
    real = mesh_io.check_stl

    def spy(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(mesh_io, "check_stl", spy)
    return calls


def same_check(fast, full) -> None:
    a, b = dataclasses.asdict(fast), dataclasses.asdict(full)
    va, vb = a.pop("volume_ml"), b.pop("volume_ml")
    assert a == b
    assert va == pytest.approx(vb, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------- write_stl


@pytest.mark.parametrize("name", ["sphere", "torus", "blob_decimated", "pinch"])
def test_write_stl_bytes_unchanged(name, meshes, tmp_path, monkeypatch):
    mesh = meshes[name]
    monkeypatch.setattr(mesh_io, "_BLOCK", 7)  # many blocks, a short last one
    path = write_stl(mesh, tmp_path / "m.stl")
    assert path.read_bytes() == former_write_stl_bytes(mesh)


@pytest.mark.parametrize("name", ["torus", "pinch"])
def test_write_ply_bytes_unchanged(name, meshes, tmp_path):
    """The PLY records go to the file without a tobytes() copy; the bytes are as before."""
    mesh = meshes[name]
    vdt = np.dtype([("xyz", "<f4", (3,)), ("rgb", "u1", (3,))])
    fdt = np.dtype([("n", "u1"), ("idx", "<i4", (3,))])
    vrec = np.empty(len(mesh.vertices), dtype=vdt)
    vrec["xyz"], vrec["rgb"] = mesh.vertices.astype(np.float32), (1, 2, 3)
    frec = np.empty(len(mesh.faces), dtype=fdt)
    frec["n"], frec["idx"] = 3, mesh.faces.astype(np.int32)
    raw = mesh_io.write_ply(mesh, tmp_path / "m.ply", (1, 2, 3)).read_bytes()
    assert raw.endswith(vrec.tobytes() + frec.tobytes())
    assert raw.index(b"end_header\n") + len(b"end_header\n") == len(raw) - len(vrec.tobytes() + frec.tobytes())


def test_write_stl_bytes_unchanged_degenerate_and_empty(tmp_path):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], dtype=float)
    flat = Mesh(v, np.array([[0, 1, 2], [0, 1, 3], [1, 1, 2]]))  # a collinear and a repeated-index face: zero normals
    assert write_stl(flat, tmp_path / "flat.stl").read_bytes() == former_write_stl_bytes(flat)
    assert write_stl(Mesh(), tmp_path / "empty.stl").read_bytes() == former_write_stl_bytes(Mesh())


def test_signed_volume_blocks_match_whole_array(meshes, monkeypatch):
    for mesh in meshes.values():
        v, f = mesh.vertices, mesh.faces
        c = v.mean(axis=0)
        whole = float(np.einsum("ij,ij->", v[f[:, 0]] - c, np.cross(v[f[:, 1]] - c, v[f[:, 2]] - c)) / 6.0)
        monkeypatch.setattr(geometry_mod, "_BLOCK", 5)
        assert signed_volume(v, f) == pytest.approx(whole, rel=1e-12, abs=1e-12)
        monkeypatch.undo()
        assert signed_volume(v, f) == pytest.approx(whole, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------- check_written_stl


@pytest.mark.parametrize("name", ["sphere", "torus", "blob_decimated"])
def test_check_written_agrees_with_check_stl(name, meshes, tmp_path, full_checks, monkeypatch):
    mesh = meshes[name]
    path = write_stl(mesh, tmp_path / "m.stl")
    fast = check_written_stl(path, mesh)
    assert full_checks == []  # no fall back: the file is what write_stl wrote
    same_check(fast, check_stl(path))
    assert fast.printable and fast.vertices == len(mesh.vertices)
    monkeypatch.setattr(mesh_io, "_BLOCK", 11)  # compared block by block
    same_check(check_written_stl(path, mesh), fast)


def test_check_written_sees_float32_coincident_vertices(meshes, tmp_path, full_checks):
    mesh = meshes["pinch"]
    assert mesh.is_manifold and mesh.coincident_vertices() == 1  # fine in memory
    path = write_stl(mesh, tmp_path / "pinch.stl")
    fast = check_written_stl(path, mesh)
    assert full_checks == []
    assert fast.watertight and not fast.manifold and fast.nonmanifold_vertices == 1
    assert fast.vertices == len(mesh.vertices) - 1
    same_check(fast, check_stl(path))


def test_check_written_collapsed_face_and_unused_vertex(tmp_path, full_checks):
    sphere = mesh_from_mask(sphere_mask((16, 16, 16), (5, 5, 5)), np.eye(4), MeshOptions("none"))
    v = np.vstack([sphere.vertices, [[100.0, 100.0, 100.0]]])  # an unused vertex, not in the file
    f0 = sphere.faces[0]
    v[f0[1]] = v[f0[0]] * (1 + 1e-12)  # two corners of a face: one float32 point
    mesh = Mesh(v, sphere.faces)
    path = write_stl(mesh, tmp_path / "m.stl")
    fast = check_written_stl(path, mesh)
    assert full_checks == []
    full = check_stl(path)
    same_check(fast, full)
    assert full.degenerate_faces >= 1 and not full.watertight


def test_check_written_truncated_file(meshes, tmp_path, full_checks):
    mesh = meshes["sphere"]
    path = write_stl(mesh, tmp_path / "m.stl")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a binary STL"):
        check_written_stl(path, mesh)
    assert full_checks == [path]


def test_check_written_corrupted_coordinates(meshes, tmp_path, full_checks):
    mesh = meshes["sphere"]
    path = write_stl(mesh, tmp_path / "m.stl")
    raw = bytearray(path.read_bytes())
    raw[84 + 50 * 3 + 12 + 2] ^= 0x40  # a coordinate of triangle 3's first corner
    path.write_bytes(bytes(raw))
    chk = check_written_stl(path, mesh)
    assert full_checks == [path]
    assert not chk.watertight and chk.boundary_edges > 0
    same_check(chk, check_stl(path))


@pytest.mark.parametrize("where", ["normal_nan", "attr", "count", "header"])
def test_check_written_other_corruption_falls_back(where, meshes, tmp_path, full_checks):
    mesh = meshes["sphere"]
    path = write_stl(mesh, tmp_path / "m.stl")
    raw = bytearray(path.read_bytes())
    if where == "normal_nan":
        raw[84 + 50 * 5 : 84 + 50 * 5 + 4] = np.float32(np.nan).tobytes()
    elif where == "attr":
        raw[84 + 50 * 5 + 48] = 1
    elif where == "count":  # one triangle fewer, file cut to match: a consistent but different file
        raw[80:84] = np.uint32(mesh.triangles - 1).tobytes()
        raw = raw[:-50]
    else:
        raw[0:5] = b"XXXXX"
    path.write_bytes(bytes(raw))
    chk = check_written_stl(path, mesh)
    assert full_checks == [path]
    same_check(chk, check_stl(path))
    if where == "count":
        assert not chk.watertight


def test_check_written_with_another_mesh(meshes, tmp_path, full_checks):
    """A file that holds another mesh than the one given is checked as what it holds."""
    sphere, torus = meshes["sphere"], meshes["torus"]
    path = write_stl(sphere, tmp_path / "m.stl")
    flipped = sphere.faces.copy()
    flipped[0] = flipped[0, ::-1]
    other = Mesh(sphere.vertices, flipped)  # same size, one face differs
    chk = check_written_stl(path, other)
    assert full_checks == [path]
    assert chk.printable  # the file's mesh, not `other` (which is not watertight)
    same_check(chk, check_stl(path))
    same_check(check_written_stl(path, torus), check_stl(path))
    assert len(full_checks) == 2


def test_check_written_header(meshes, tmp_path, full_checks):
    mesh = meshes["sphere"]
    path = write_stl(mesh, tmp_path / "m.stl", header="SPACE=LPS; other")
    same_check(check_written_stl(path, mesh, header="SPACE=LPS; other"), check_stl(path))
    assert full_checks == []
    same_check(check_written_stl(path, mesh, header=None), check_stl(path))
    assert full_checks == []
    same_check(check_written_stl(path, mesh), check_stl(path))  # default header expected: differs
    assert full_checks == [path]


def test_check_written_empty_mesh(tmp_path):
    path = write_stl(Mesh(), tmp_path / "e.stl")
    same_check(check_written_stl(path, Mesh()), check_stl(path))


def test_unsmoothed_vertices_are_the_affine_image_of_the_index_vertices():
    """_mesh_crop maps flying-edges vertices with einsum (no BLAS): same as the matmul up to rounding."""
    mask = noisy_blob_mask()
    aff = oblique_affine()
    mesh = mesh_from_mask(mask, aff, MeshOptions("none"))
    ident = mesh_from_mask(mask, np.eye(4), MeshOptions("none"))  # index space (winding may differ)
    expected = ident.vertices @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(mesh.vertices, expected, rtol=0, atol=1e-9)


def test_check_written_uses_the_given_mesh_topology_only_where_it_is_the_files(meshes, tmp_path):
    """``mesh_topology`` stands for the topology pass when the file's faces are the mesh's,
    and is not called where a reader merges float32-coincident vertices (pinch) or the
    file leaves vertices out."""
    calls: list[str] = []

    def given(mesh):
        def topo():
            calls.append("called")
            return topology_mod.topology(mesh.faces, len(mesh.vertices))
        return topo

    sphere = meshes["sphere"]
    path = write_stl(sphere, tmp_path / "s.stl")
    with_topo = check_written_stl(path, sphere, mesh_topology=given(sphere))
    assert calls == ["called"]
    same_check(with_topo, check_stl(path))

    calls.clear()
    pinch = meshes["pinch"]
    path = write_stl(pinch, tmp_path / "p.stl")
    chk = check_written_stl(path, pinch, mesh_topology=given(pinch))
    assert calls == [] and not chk.manifold  # the merged file's own topology
    same_check(chk, check_stl(path))

    calls.clear()
    spare = Mesh(np.vstack([sphere.vertices, [[100.0, 100.0, 100.0]]]), sphere.faces)  # one unused vertex
    path = write_stl(spare, tmp_path / "u.stl")
    chk = check_written_stl(path, spare, mesh_topology=given(spare))
    assert calls == []
    same_check(chk, check_stl(path))
