"""Decimation that keeps the mesh watertight and manifold: fast_simplification in a forked
child process, then a manifold3d round trip.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

import numpy as np

from node.pipeline.mesh.model import MeshOptions
from node.pipeline.mesh.topology import Topology, topology

log = logging.getLogger(__name__)


def target_triangles(n: int, options: MeshOptions) -> int | None:
    target = n
    if options.decimate is not None:
        target = min(target, int(round(n * options.decimate)))
    if options.max_triangles is not None:
        target = min(target, options.max_triangles)
    return target if target < n else None


def _manifold_roundtrip(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Pass a mesh through manifold3d (collapses degenerate triangles); ``None`` if it refuses."""
    import manifold3d

    if hasattr(manifold3d, "Mesh64"):  # manifold3d >= 3.1: keep float64 positions
        src = manifold3d.Mesh64(
            vert_properties=np.ascontiguousarray(vertices, dtype=np.float64),
            tri_verts=np.ascontiguousarray(faces, dtype=np.uint64),
        )
    else:  # pragma: no cover - older manifold3d
        src = manifold3d.Mesh(
            vert_properties=np.ascontiguousarray(vertices, dtype=np.float32),
            tri_verts=np.ascontiguousarray(faces, dtype=np.uint32),
        )
    m = manifold3d.Manifold(src)
    if m.status() != manifold3d.Error.NoError or m.is_empty():
        return None
    out = m.to_mesh64() if hasattr(m, "to_mesh64") else m.to_mesh()
    v = np.asarray(out.vert_properties, dtype=np.float64)[:, :3]
    f = np.asarray(out.tri_verts, dtype=np.int64)
    return np.ascontiguousarray(v), np.ascontiguousarray(f)


def _simplify_in_process(vertices: np.ndarray, faces: np.ndarray, target: int, agg: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    import fast_simplification

    v2, f2 = fast_simplification.simplify(vertices, faces, target_count=target, agg=agg)
    return np.asarray(v2, dtype=np.float64), np.asarray(f2, dtype=np.int64)


def simplify_isolated(vertices: np.ndarray, faces: np.ndarray, target: int, agg: float,
                      meanwhile: Callable[[], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``fast_simplification.simplify`` in a forked child process; the result comes back
    through shared memory (the returned arrays are views of it).  ``meanwhile``, when given,
    is called in this process while the child works (a core of its own, no shared GIL).

    fast_simplification keeps its working copy of the mesh in global C++ vectors that are
    never freed (``clear()`` keeps their capacity): memory in proportion to the input
    triangles, held for the life of the process (figures: bench/README.md, ``--profile
    lungs``), so the manifold3d round trip and every later step of the job ran on top of it.
    In a child the memory goes back to the system when it exits.  The child sees the input
    copy-on-write (nothing is pickled or copied).  Where ``os.fork`` is missing the call runs
    in process.
    """
    import mmap

    import fast_simplification  # noqa: F401 - imported here, not first in the child

    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
        if meanwhile is not None:
            meanwhile()
        return _simplify_in_process(vertices, faces, target, agg)
    v = np.ascontiguousarray(vertices, dtype=np.float64)
    f = np.ascontiguousarray(faces)
    nv, nf = len(v), len(f)  # a simplification never adds vertices or faces
    size = 16 + nv * 24 + nf * 24
    buf = mmap.mmap(-1, size)  # anonymous and shared with the child
    ok = False
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork in a threaded process; the child runs only the
            # decimator's own C++ code and numpy copies, and leaves by os._exit
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: no logging, no Python-level exit handlers
            code = 1
            try:
                v2, f2 = _simplify_in_process(v, f, target, agg)
                head = np.frombuffer(buf, dtype=np.int64, count=2)
                head[:] = (len(v2), len(f2))
                np.frombuffer(buf, dtype=np.float64, count=v2.size, offset=16)[:] = v2.ravel()
                np.frombuffer(buf, dtype=np.int64, count=f2.size, offset=16 + nv * 24)[:] = f2.ravel()
                code = 0
            except BaseException:  # noqa: BLE001 - said on stderr; the parent raises
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
            how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit code {os.WEXITSTATUS(status)}")
            raise RuntimeError(f"fast_simplification failed in its process ({how})")
        n_v2, n_f2 = (int(x) for x in np.frombuffer(buf, dtype=np.int64, count=2))
        # views, not copies: the mapping lives as long as the arrays
        v2 = np.frombuffer(buf, dtype=np.float64, count=n_v2 * 3, offset=16).reshape(-1, 3)
        f2 = np.frombuffer(buf, dtype=np.int64, count=n_f2 * 3, offset=16 + nv * 24).reshape(-1, 3)
        ok = True
        return v2, f2
    finally:
        if not ok:
            buf.close()


def decimate(vertices: np.ndarray, faces: np.ndarray, target: int,
              meanwhile: Callable[[], object] | None = None) -> tuple[np.ndarray, np.ndarray, Topology | None]:
    """Decimate to about ``target`` triangles, keeping the mesh watertight and manifold.

    fast_simplification (in a child process: :func:`simplify_isolated`, ``meanwhile``
    called here while the first try runs), then a manifold3d round trip; if the result is
    not a closed 2-manifold, retry less aggressively, and as a last resort keep the input
    mesh.  Returns vertices, faces and the topology of the result (``None`` for the kept
    input).
    """
    for agg in (7.0, 3.0, 1.0):
        v2, f2 = simplify_isolated(vertices, faces, max(int(target), 4), agg, meanwhile)
        meanwhile = None
        res = _manifold_roundtrip(np.asarray(v2, dtype=np.float64), f2)
        if res is not None:
            topo = topology(res[1], len(res[0]))
            if topo.manifold:
                return res[0], res[1], topo
        log.debug("decimation to %d triangles (agg=%s) was not manifold; retrying", target, agg)
    log.warning("decimation could not keep the mesh manifold; keeping %d triangles", len(faces))
    return vertices, faces, None
