"""The mesh step: a tissue mask -> its STL and colored PLY files, checked as written; tissues
are meshed two at a time, while later tissues are still being segmented.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from node.pipeline.mesh.extract import mesh_from_mask
from node.pipeline.mesh.files import check_written_stl, write_ply, write_stl
from node.pipeline.mesh.model import MeshOptions
from node.pipeline.mesh.topology import Topology, topology
from node.profiles import Profile, Tissue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decimation:
    """What decimating a tissue's surface did (decimators collapse the smallest components first)."""

    triangles_before: int
    components_before: int
    components_removed: int


@dataclass(frozen=True)
class TissueMesh:
    """What meshing one tissue produced: its files and its entries in ``report.json``."""

    triangles: int
    volume_ml_mesh: float
    watertight: bool | None
    manifold: bool | None
    components: int
    stl: Path | None
    ply: Path | None
    decimation: Decimation | None = None

    @property
    def paths(self) -> list[Path]:
        """The files written: STL then PLY (none for an empty mesh)."""
        return [p for p in (self.stl, self.ply) if p is not None]

    def report(self) -> dict[str, Any]:
        """The tissue's mesh entries in ``report.json``."""
        out: dict[str, Any] = {
            "triangles": self.triangles, "volume_ml_mesh": self.volume_ml_mesh, "watertight": self.watertight,
            "manifold": self.manifold, "components": self.components,
            "stl": self.stl.name if self.stl else None, "ply": self.ply.name if self.ply else None,
        }
        if self.decimation is not None:
            d = self.decimation
            out["decimation"] = {"triangles_before": d.triangles_before, "components_before": d.components_before,
                                 "components_removed": d.components_removed}
        return out


def mesh_tissue(tissue: Tissue, mask: np.ndarray, affine: np.ndarray, out: Path, profile_name: str) -> TissueMesh:
    """Mesh one tissue's mask (``affine``: its grid to LPS mm) into
    ``<out>/<profile>_<tissue>.stl`` and ``..._colored.ply`` and check the STL as written."""
    opts = MeshOptions.from_dict(tissue.mesh.model_dump(exclude={"enabled"}))
    mesh = mesh_from_mask(mask, affine, opts)
    if mesh.is_empty:
        return TissueMesh(mesh.triangles, 0.0, None, None, 0, None, None)
    # the mesh's topology (most of the check's work) is computed while the files are
    # written: numpy/scipy release the GIL, and the file writes wait on the disk
    # (a decimated mesh comes with it: the decimation checked its result)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-topology") as helper:
        known = mesh.known_topology
        topo_of: Callable[[], Topology] = ((lambda: known) if known is not None else
                                           helper.submit(topology, mesh.faces, len(mesh.vertices)).result)
        stl = write_stl(mesh, out / f"{profile_name}_{tissue.name}.stl")
        ply = write_ply(mesh, out / f"{profile_name}_{tissue.name}_colored.ply", tissue.color)
        # as any reader sees the file, not the in-memory mesh (re-read, compared with the mesh)
        check = check_written_stl(stl, mesh, mesh_topology=topo_of)
    decimation = None
    if mesh.decimated_from is not None:
        before = mesh.decimated_from
        removed = max(0, before["components"] - check.components)  # net: a split would offset a removal
        decimation = Decimation(before["triangles"], before["components"], removed)
        if removed:
            log.warning("mesh %s: decimation to %d triangles removed %d of its %d surface components "
                        "(the smallest islands and cavities collapse first)",
                        stl.name, mesh.triangles, removed, before["components"])
    if not check.printable:
        log.warning("mesh %s is not printable: %s", stl.name, check)
    return TissueMesh(mesh.triangles, round(check.volume_ml, 3), check.watertight, check.manifold,
                      check.components, stl, ply, decimation)


class MeshQueue:
    """Meshes tissues in the background, two at a time, as they are handed over.

    Meshing is VTK and numpy, which release the GIL, so it fills the core that the
    segmentation's single-threaded steps leave idle.  While the segmentation runs it holds
    one of the two permits (:meth:`segmenting`): one mesh at a time beside it (it has its
    own threads and its peak memory), two once it is over.
    """

    def __init__(self, profile: Profile, affine: np.ndarray, out: Path) -> None:
        self._profile = profile
        self._affine = affine
        self._out = out
        self._by_name = {t.name: t for t in profile.result_tissues}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mesh")
        self._jobs: dict[str, Future[TissueMesh]] = {}
        self._span: list[float] = []  # start of the first and end of the last mesh
        self.permits = threading.BoundedSemaphore(2)

    def submit(self, name: str, mask: np.ndarray) -> None:
        """Mesh tissue ``name`` (unless its profile switches meshing off)."""
        t = self._by_name.get(name)
        if t is not None and t.mesh.enabled:
            self._jobs[name] = self._pool.submit(self._timed, t, mask)

    def _timed(self, tissue: Tissue, mask: np.ndarray) -> TissueMesh:
        with self.permits:
            if not self._span:
                self._span.append(time.perf_counter())
            return mesh_tissue(tissue, mask, self._affine, self._out, self._profile.name)

    def results(self) -> dict[str, TissueMesh]:
        """Wait for every mesh: ``{tissue: TissueMesh}`` in profile order."""
        done: dict[str, TissueMesh] = {}
        try:
            for t in self._profile.result_tissues:
                if t.name in self._jobs:
                    done[t.name] = self._jobs[t.name].result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._span:
            self._span.append(time.perf_counter())
        return done

    def cancel(self) -> None:
        """Drop the meshes not started yet and wait for the running ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def span_s(self) -> float | None:
        """From the first mesh started to the last one finished, once :meth:`results` returned."""
        return round(self._span[1] - self._span[0], 3) if len(self._span) == 2 else None
