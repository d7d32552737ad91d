"""VTK glue: its threaded SMP backend switched on once, and numpy <-> ``vtkPolyData``."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


_SMP_READY = False
_SMP_LOCK = threading.Lock()


def vtk_smp() -> None:
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


def to_vtk_polydata(vertices: np.ndarray, faces: np.ndarray) -> Any:
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


def from_vtk_polydata(poly: Any) -> tuple[np.ndarray, np.ndarray]:
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
