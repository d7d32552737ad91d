"""Mesh smoothing in mm: windowed sinc (VTK), Taubin and plain Laplacian (scipy sparse)."""

from __future__ import annotations

from typing import Any

import numpy as np

from node.pipeline.mesh.model import MeshOptions
from node.pipeline.mesh.vtk_glue import from_vtk_polydata, to_vtk_polydata, vtk_smp


def _windowed_sinc(vertices: np.ndarray, faces: np.ndarray, iterations: int, pass_band: float) -> np.ndarray:
    from vtkmodules.vtkFiltersCore import vtkWindowedSincPolyDataFilter

    vtk_smp()
    poly = to_vtk_polydata(vertices, faces)
    ws = vtkWindowedSincPolyDataFilter()
    ws.SetInputData(poly)
    ws.SetNumberOfIterations(iterations)
    ws.SetPassBand(pass_band)
    ws.BoundarySmoothingOff()
    ws.FeatureEdgeSmoothingOff()
    ws.NonManifoldSmoothingOn()
    ws.NormalizeCoordinatesOn()
    ws.Update()
    v, f = from_vtk_polydata(ws.GetOutput())
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


def smooth(vertices: np.ndarray, faces: np.ndarray, options: MeshOptions) -> np.ndarray:
    if options.smoothing == "none" or options.iterations == 0 or len(faces) == 0:
        return vertices
    if options.smoothing == "windowed_sinc":
        return _windowed_sinc(vertices, faces, options.iterations, options.pass_band)
    if options.smoothing == "taubin":
        return _taubin(vertices, faces, options.iterations, options.pass_band)
    return _laplacian(vertices, faces, options.iterations)
