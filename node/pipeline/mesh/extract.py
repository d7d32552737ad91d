"""Surface meshes from masks (:func:`mesh_from_mask`, :func:`mesh_labels`): flying edges, smoothing,
decimation and outward winding, in patient coordinates (LPS mm).
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from node.pipeline.box import bounding_box
from node.pipeline.mesh.coincident import separate_coincident
from node.pipeline.mesh.decimate import decimate, target_triangles
from node.pipeline.mesh.geometry import signed_volume
from node.pipeline.mesh.model import Mesh, MeshOptions
from node.pipeline.mesh.smooth import smooth
from node.pipeline.mesh.topology import surface_components
from node.pipeline.mesh.vtk_glue import from_vtk_polydata, vtk_smp

log = logging.getLogger(__name__)


def _check_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError("affine must be finite and invertible")
    return a


def _flying_edges(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Discrete flying edges on a uint8 ``[k, j, i]`` array (in index space, as 3D Slicer does);
    vertices in (i, j, k) index units."""
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D

    vtk_smp()
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
    v, f = from_vtk_polydata(fe.GetOutput())
    del flat  # kept alive until here: the VTK array shares its memory
    return v, f


def _mesh_crop(crop: np.ndarray, offset_kji: tuple[int, int, int], affine: np.ndarray, options: MeshOptions) -> Mesh:
    """Mesh a cropped boolean block whose voxel ``[0, 0, 0]`` is ``offset_kji`` in the full grid."""
    padded = np.zeros(tuple(s + 2 for s in crop.shape), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = crop
    v_idx, faces = _flying_edges(padded)
    if len(faces) == 0:
        return Mesh()
    # padded index (i, j, k) -> full-grid index: + offset - 1; then the full affine, direction
    # matrix included, to LPS mm (a pipeline that applies only origin and spacing, as VTK's
    # contour filter on a vtkImageData does, misplaces the meshes of non-axial series)
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

    verts = smooth(verts, faces, options)

    target = target_triangles(len(faces), options)
    decimated_from = None
    known = None
    if target is not None:
        # counted while the decimator's child process runs (13 M faces: ~2-3.5 s; on a
        # thread beside an in-process decimator both ran slower)
        decimated_from = {"triangles": len(faces)}
        n_before, faces_before = len(verts), faces

        def count() -> None:
            decimated_from["components"] = surface_components(faces_before, n_before)

        verts, faces, known = decimate(verts, faces, target, meanwhile=count)
        if signed_volume(verts, faces) < 0:
            faces = faces[:, ::-1].copy()
            known = None  # the same counts, but recomputed rather than argued

    # distinct vertices that coincide in float32 are pulled apart, so that the mesh as written
    # to a float32 STL and re-read by any reader is still watertight and manifold
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
