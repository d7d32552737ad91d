"""Mesh files: binary STL (``SPACE=LPS`` in its header, as 3D Slicer writes it) and colored PLY
writers (atomic), their readers, and the on-disk check: a file re-read and its vertices merged
by exact float32 coordinate, as any STL reader does, before testing watertightness and
manifoldness.  Coordinates are patient LPS mm, the space of the DICOM SEG.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from node.durable import atomic_open
from node.pipeline.mesh.coincident import float32_groups, float32_unique_count
from node.pipeline.mesh.geometry import normalize_rows, signed_volume
from node.pipeline.mesh.model import Mesh
from node.pipeline.mesh.topology import Topology, topology

DEFAULT_STL_HEADER = "SPACE=LPS; units=mm; dicom-seg-node"

_STL_RECORD = np.dtype(
    [("normal", "<f4", (3,)), ("v", "<f4", (3, 3)), ("attr", "<u2")]
)  # 50 bytes, packed


#: triangles per block when writing/comparing STL records (~0.8 MB of records).
_BLOCK = 1 << 14


def _iter_chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


# --------------------------------------------------------------------------- STL


def _stl_header(header: str) -> bytes:
    raw = header.encode("ascii", errors="replace")
    if raw[:5].lower() == b"solid":
        raise ValueError("a binary STL header must not start with 'solid' (readers take it for ASCII STL)")
    if len(raw) > 80:
        raise ValueError(f"STL header is {len(raw)} bytes; at most 80 fit")
    return raw.ljust(80, b" ")


def write_stl(mesh: Mesh, path: str | os.PathLike[str], *, header: str = DEFAULT_STL_HEADER) -> Path:
    """Write a binary little-endian STL (float32, per-face unit normals), atomically.

    Args:
        mesh: the mesh (LPS mm); written as is, faces in their stored winding.
        path: destination; its folder is created when missing.
        header: ASCII text for the 80-byte header (padded with spaces); must not start
            with ``solid``.

    Returns:
        The path written.
    """
    head = _stl_header(header)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    verts32 = np.asarray(mesh.vertices, dtype=np.float32)
    n = len(faces)
    path = Path(path)
    # one cache-sized record buffer, filled block by block and written without a copy
    rec = np.zeros(min(n, _BLOCK), dtype=_STL_RECORD)
    with atomic_open(path) as fh:
        fh.write(head)
        fh.write(np.uint32(n).astype("<u4").tobytes())
        for sl in _iter_chunks(n, _BLOCK):
            r = rec[: sl.stop - sl.start]
            tri = verts32[faces[sl]]  # (c, 3, 3) float32 exactly as stored
            r["v"] = tri
            t = tri.astype(np.float64)  # normals from the stored float32 corners, in float64
            r["normal"] = normalize_rows(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]))
            fh.write(r.data.cast("B"))
    return path


_ASCII_VERTEX = re.compile(rb"vertex\s+(\S+)\s+(\S+)\s+(\S+)")


def read_stl(path: str | os.PathLike[str]) -> tuple[np.ndarray, str]:
    """Read an STL file (binary or ASCII) as triangle soup.

    Returns:
        ``(triangles, header)``: float32 array ``(m, 3, 3)`` and the header text (binary
        80-byte header with trailing spaces/NULs stripped, or the ASCII ``solid`` line).
    """
    data = Path(path).read_bytes()
    if len(data) >= 84:
        n = int(np.frombuffer(data, dtype="<u4", count=1, offset=80)[0])
        if len(data) == 84 + 50 * n:
            rec = np.frombuffer(data, dtype=_STL_RECORD, count=n, offset=84)
            header = data[:80].rstrip(b"\x00 ").decode("ascii", errors="replace")
            return np.array(rec["v"], dtype=np.float32), header
    if data.lstrip()[:5].lower() == b"solid":
        first = data.lstrip().split(b"\n", 1)[0].strip().decode("ascii", errors="replace")
        vals = np.array(_ASCII_VERTEX.findall(data), dtype=np.float32).reshape(-1, 3)
        if len(vals) % 3:
            raise ValueError(f"{path}: ASCII STL with {len(vals)} vertices (not a multiple of 3)")
        return vals.reshape(-1, 3, 3), first
    raise ValueError(f"{path}: not a binary STL (size mismatch) nor an ASCII STL")


def load_stl(path: str | os.PathLike[str]) -> Mesh:
    """Read an STL and merge vertices by exact float32 coordinate (as STL readers do)."""
    tris, _ = read_stl(path)
    return _merge_soup(tris)


def _merge_soup(tris: np.ndarray) -> Mesh:
    corners = tris.reshape(-1, 3)
    if len(corners) == 0:
        return Mesh()
    verts, group = _merge_float32(corners)
    return Mesh(verts, group.reshape(-1, 3))


def _merge_float32(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(merged, group)``: vertices of equal float32 coordinates merged (float64), and the
    merged index of each input vertex (remap faces with ``group[faces]``).

    Groups are numbered in key order (:func:`float32_groups`), so the same set of
    coordinates gives the same numbering whether it comes as triangle corners or as
    indexed vertices.
    """
    inv, n_unique = float32_groups(vertices)
    merged = np.zeros((n_unique, 3), dtype=np.float64)
    merged[inv] = vertices
    return merged, inv


@dataclass
class MeshCheck:
    """What a mesh file looks like to a reader (vertices merged by exact float32 coordinate)."""

    path: Path
    triangles: int
    vertices: int
    """Distinct vertices after merging by exact coordinate."""
    watertight: bool
    """Every edge shared by exactly two faces, in opposite directions (closed, consistently wound)."""
    manifold: bool
    """Watertight and every vertex a single fan of faces (no pinch points)."""
    volume_ml: float
    """Signed enclosed volume; positive when the normals point outward."""
    boundary_edges: int
    nonmanifold_edges: int
    inconsistent_edges: int
    degenerate_faces: int
    """Faces with two corners at the same coordinates."""
    nonmanifold_vertices: int
    components: int
    header: str

    @property
    def outward(self) -> bool:
        """Positive signed volume (outward normals)."""
        return self.volume_ml > 0

    @property
    def printable(self) -> bool:
        """Watertight, manifold and wound outward: fit for a 3D printer."""
        return self.watertight and self.manifold and self.outward


def _check_soup(tris: np.ndarray, path: str | os.PathLike[str], header: str) -> MeshCheck:
    merged = _merge_soup(tris)
    return _mesh_check(path, merged.vertices, merged.faces, header)


def _mesh_check(
    path: str | os.PathLike[str], vertices: np.ndarray, faces: np.ndarray, header: str, topo: Topology | None = None
) -> MeshCheck:
    """The :class:`MeshCheck` of a mesh whose vertices are already merged as a reader merges them
    (``topo``: ``topology(faces, len(vertices))`` when the caller has it already)."""
    if topo is None:
        topo = topology(faces, len(vertices))
    return MeshCheck(
        path=Path(path),
        triangles=topo.triangles,
        vertices=len(vertices),
        watertight=topo.watertight,
        manifold=topo.manifold,
        volume_ml=signed_volume(vertices, faces) / 1000.0,
        boundary_edges=topo.boundary_edges,
        nonmanifold_edges=topo.nonmanifold_edges,
        inconsistent_edges=topo.inconsistent_edges,
        degenerate_faces=topo.degenerate_faces,
        nonmanifold_vertices=topo.nonmanifold_vertices,
        components=topo.components,
        header=header,
    )


def check_mesh(mesh: Mesh) -> MeshCheck:
    """Check an in-memory mesh as it would read back from a float32 file (no disk I/O)."""
    return _check_soup(np.asarray(mesh.vertices, dtype=np.float32)[mesh.faces], "", "")


def check_stl(path: str | os.PathLike[str]) -> MeshCheck:
    """Re-read an STL from disk and check it as any reader would see it.

    Vertices are merged by exact float32 coordinate, so distinct vertices that became
    coincident in float32 show up as non-manifold edges, pinch points or degenerate faces.
    """
    tris, header = read_stl(path)
    return _check_soup(tris, path, header)


def check_written_stl(
    path: str | os.PathLike[str],
    mesh: Mesh,
    *,
    header: str | None = DEFAULT_STL_HEADER,
    mesh_topology: Callable[[], Topology] | None = None,
) -> MeshCheck:
    """:func:`check_stl` for a file that :func:`write_stl` wrote from ``mesh``, much cheaper.

    The file is read back and must hold exactly what :func:`write_stl` writes for
    ``mesh``: the header (unless ``header`` is ``None``), the triangle count, every
    stored corner bit for bit equal to ``float32(mesh.vertices)[mesh.faces]``, finite
    normals and zero attribute words.  Then merging the 3 x T stored corners by float32
    coordinate, as :func:`check_stl` does, is the same as merging the mesh's (used)
    vertices by float32 coordinate, and the file's topology is that of the faces
    remapped through that merge: V rows to group instead of 3 x T, and no remapping at all
    when no two vertices share their float32 coordinates (what :func:`mesh_from_mask`
    ensures).  Whenever any byte differs, the result is the full :func:`check_stl`.

    The fields equal :func:`check_stl`'s; ``volume_ml`` up to float rounding (summation
    order).

    ``mesh_topology``, when given, returns ``topology(mesh.faces, len(mesh.vertices))``
    (e.g. the result of a thread started as soon as the mesh was made, so that it runs
    while the files are written); it is called only where that is the file's topology:
    every vertex used and no two sharing their float32 coordinates.
    """
    path = Path(path)
    data = path.read_bytes()
    faces = np.asarray(mesh.faces, dtype=np.int64)
    n, nv = len(faces), len(mesh.vertices)
    head = data[:80]
    if (
        n == 0
        or len(data) != 84 + 50 * n
        or int(np.frombuffer(data, dtype="<u4", count=1, offset=80)[0]) != n
        or (header is not None and head != _stl_header(header))
        or int(faces.min()) < 0
        or int(faces.max()) >= nv
    ):
        return check_stl(path)
    rec = np.frombuffer(data, dtype=_STL_RECORD, count=n, offset=84)
    verts32 = np.asarray(mesh.vertices, dtype=np.float32)
    for sl in _iter_chunks(n, _BLOCK):
        r = rec[sl]
        stored = r["v"].view(np.uint32)  # bits: NaN == NaN, -0.0 != +0.0, like the bytes
        if (
            not np.array_equal(stored, verts32[faces[sl]].view(np.uint32))
            or not np.all(np.isfinite(r["normal"]))
            or np.any(r["attr"])
        ):
            return check_stl(path)

    # the file's corners are float32(vertices)[faces]: merge the vertices, not the corners
    used = np.bincount(faces.ravel(), minlength=nv) > 0
    if np.all(used):
        v_used, f_used = verts32, faces
    else:  # unused vertices are not in the file
        remap = np.cumsum(used) - 1
        v_used, f_used = verts32[used], remap[faces]
    topo = None
    if float32_unique_count(v_used) == len(v_used):
        merged_v, merged_f = v_used.astype(np.float64), f_used
        if mesh_topology is not None and v_used is verts32:  # the file's faces are the mesh's
            topo = mesh_topology()
    else:  # groups numbered in key order, as check_stl numbers the same set of keys
        merged_v, group = _merge_float32(v_used)
        merged_f = group[f_used]
    return _mesh_check(path, merged_v, merged_f, head.rstrip(b"\x00 ").decode("ascii", errors="replace"), topo)


# --------------------------------------------------------------------------- PLY


def write_ply(
    mesh: Mesh,
    path: str | os.PathLike[str],
    color: tuple[int, int, int] = (255, 255, 255),
    *,
    comment: str = "SPACE=LPS units=mm",
) -> Path:
    """Write a binary little-endian PLY with per-vertex uchar colour, atomically.

    Vertices are ``float x, y, z`` (LPS mm) plus ``uchar red, green, blue``; faces are
    ``list uchar int vertex_indices``.

    Args:
        mesh: the mesh.
        path: destination; its folder is created when missing.
        color: ``(r, g, b)``, each 0..255, applied to every vertex.
        comment: one header comment line (no newlines).
    """
    rgb = tuple(int(c) for c in color)
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"color must be three integers 0..255, got {color!r}")
    if "\n" in comment or "\r" in comment:
        raise ValueError("PLY comment must be a single line")
    nv, nf = len(mesh.vertices), len(mesh.faces)
    if nv and int(np.max(mesh.faces, initial=0)) >= 2**31:
        raise ValueError("too many vertices for int32 PLY indices")
    head = (
        "ply\nformat binary_little_endian 1.0\n"
        + (f"comment {comment}\n" if comment else "")
        + f"element vertex {nv}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {nf}\n"
        "property list uchar int vertex_indices\n"
        "end_header\n"
    ).encode("ascii")
    vdt = np.dtype([("xyz", "<f4", (3,)), ("rgb", "u1", (3,))])
    fdt = np.dtype([("n", "u1"), ("idx", "<i4", (3,))])
    vrec = np.empty(nv, dtype=vdt)
    vrec["xyz"] = np.asarray(mesh.vertices, dtype=np.float32)
    vrec["rgb"] = rgb
    frec = np.empty(nf, dtype=fdt)
    frec["n"] = 3
    frec["idx"] = np.asarray(mesh.faces, dtype=np.int32)
    path = Path(path)
    with atomic_open(path) as fh:
        fh.write(head)
        fh.write(vrec.data.cast("B"))  # the records' bytes, without a copy
        fh.write(frec.data.cast("B"))
    return path


def read_ply(path: str | os.PathLike[str]) -> tuple[Mesh, np.ndarray]:
    """Read a PLY written by :func:`write_ply` (binary little-endian, xyz float, rgb uchar).

    Returns:
        ``(mesh, colors)`` with ``colors`` an ``(n, 3)`` uint8 array.
    """
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    lines = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise ValueError(f"{path}: only binary_little_endian PLY is supported")
    counts = {ln.split()[1]: int(ln.split()[2]) for ln in lines if ln.startswith("element ")}
    props = [ln for ln in lines if ln.startswith("property ")]
    expected = [
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue",
        "property list uchar int vertex_indices",
    ]
    if props != expected:
        raise ValueError(f"{path}: unsupported PLY layout {props}")
    nv, nf = counts.get("vertex", 0), counts.get("face", 0)
    vdt = np.dtype([("xyz", "<f4", (3,)), ("rgb", "u1", (3,))])
    fdt = np.dtype([("n", "u1"), ("idx", "<i4", (3,))])
    off = end + len(b"end_header\n")
    vrec = np.frombuffer(data, dtype=vdt, count=nv, offset=off)
    frec = np.frombuffer(data, dtype=fdt, count=nf, offset=off + nv * vdt.itemsize)
    if nf and not np.all(frec["n"] == 3):
        raise ValueError(f"{path}: non-triangle faces")
    return Mesh(vrec["xyz"].astype(np.float64), frec["idx"].astype(np.int64)), np.array(vrec["rgb"])
