"""One pipeline run: DICOM files -> volume -> tissue masks -> meshes, DICOM SEG and a report.

This is what the offline command (``dicom-node run``) and the node's workers call.
It never touches the network.  Every stage is timed and its peak memory recorded in
the JSON report written next to the outputs::

    <output>/<organ>_seg.dcm
    <output>/<organ>_<tissue>.stl
    <output>/<organ>_<tissue>_colored.ply
    <output>/report.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from node import __version__
from node.durable import atomic_write
from node.errors import BackendUnavailable, InputError, SeriesError
from node.pipeline import quality
from node.pipeline.backends import check_profile, get_backend
from node.pipeline.heap import RetainFreed, fix_mmap_threshold, working_set_budget
from node.pipeline.mesh import MeshOptions, Topology, mesh_from_mask, topology
from node.pipeline.mesh_io import check_written_stl, write_ply, write_stl
from node.pipeline.series import find_series, load_series
from node.pipeline.seg import ALGORITHM_FAMILY_AI, ALGORITHM_FAMILY_THRESHOLD, SegmentSpec, warm_up, write_seg
from node.pipeline.volume import Volume
from node.profiles import Profile, load_profile

log = logging.getLogger(__name__)

#: ``progress(stage, message)`` callback; stages: load, segment, mesh, seg, report
Progress = Callable[[str, str], None]

ALGORITHM_NAMES = {
    "hu_based": "dicom-node HU threshold",
    "totalsegmentator": "TotalSegmentator",
    "nnunet": "nnU-Net",
    "monai": "MONAI",
}


@dataclass
class RunResult:
    """What a run produced."""

    output_dir: Path
    report: dict[str, Any]
    seg_path: Path | None = None
    mesh_paths: list[Path] = field(default_factory=list)
    report_path: Path | None = None
    volume: Volume | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux; the peak of this process so far
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Stages:
    """Times each stage and records the process peak RSS after it."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    def run(self, stage: str, message: str, fn: Callable[[], Any]) -> Any:
        if self.progress:
            self.progress(stage, message)
        t0 = time.perf_counter()
        out = fn()
        self.timings[stage] = round(time.perf_counter() - t0, 3)
        self.peak_rss_mb[stage] = round(_peak_rss_mb(), 1)
        return out


def select_series(
    inputs: Sequence[str | Path], series_uid: str | None = None, header_cache: dict[Path, Any] | None = None
) -> list[Path]:
    """The files of the one series to process among ``inputs``.

    ``header_cache`` (optional) collects the headers parsed while grouping, for
    :func:`load_series` to reuse instead of parsing every file again.

    Raises :class:`SeriesError` when there is no DICOM file, when the wanted series is
    absent, or when several series are present and none was chosen.
    """
    groups = find_series(inputs, header_cache=header_cache)
    if not groups:
        raise SeriesError("no DICOM files found", path=", ".join(str(p) for p in inputs))
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesError(f"series {series_uid} not found; present: {', '.join(sorted(groups))}")
        return groups[series_uid]
    if len(groups) > 1:
        listing = "; ".join(f"{uid or '<empty SeriesInstanceUID>'} ({len(f)} files)" for uid, f in sorted(groups.items()))
        raise SeriesError(f"the input holds {len(groups)} series, choose one with --series: {listing}")
    return next(iter(groups.values()))


def _segment_specs(profile: Profile, masks: dict[str, np.ndarray]) -> list[SegmentSpec]:
    specs = []
    for t in profile.outputs:
        specs.append(
            SegmentSpec(
                label=f"{profile.name} {t.name}",
                tissue=t.name,
                description=t.description,
                color=tuple(t.color),  # type: ignore[arg-type]
                category=(t.category.value, t.category.scheme, t.category.meaning),
                type=(t.type.value, t.type.scheme, t.type.meaning),
                mask=masks[t.name],
            )
        )
    return specs


def run_pipeline(
    inputs: Sequence[str | Path],
    profile: Profile | str,
    output_dir: str | Path,
    *,
    backend: str | None = None,
    phase: str | None = None,
    series_uid: str | None = None,
    fill_missing_uids: bool = False,
    write_segmentation: bool = True,
    write_meshes: bool = True,
    seg_series_uid: str | None = None,
    decode_workers: int | None = None,
    working_grid_mm: float | None = None,
    progress: Progress | None = None,
    on_seg: Callable[[Path, str], None] | None = None,
    seg_first: bool = False,
) -> RunResult:
    """Segment one series and write the SEG, the meshes and ``report.json``.

    Args:
        inputs: folders (searched recursively) and/or files.
        profile: a :class:`Profile` or a profile name / YAML path.
        output_dir: created if needed; files are written atomically.
        backend: override of the profile's ``model_type``.
        phase: ``contrast`` / ``non_contrast`` override of the header-derived phase.
        series_uid: which series to take when the input holds several.
        fill_missing_uids: offline opt-in for files whose identifying UIDs are empty.
        write_segmentation / write_meshes: switch outputs off.
        seg_series_uid: SeriesInstanceUID for the SEG (the node passes a stable one).
        decode_workers: processes for decoding compressed pixel data.
        working_grid_mm: segment and mesh on a grid of about this voxel size (override of the
            profile's ``working_grid_mm``; 0 = the series' own grid).  The SEG still has a
            frame for every source frame.
        progress: ``progress(stage, message)`` callback.
        on_seg: ``on_seg(path, seg_series_uid)``, called (from an output thread) as soon as
            the DICOM SEG file is complete, while meshes may still be in progress: the node
            sends the SEG on before the meshes are done.
        seg_first: the SEG before any mesh: no meshing while the series is segmented, the
            SEG written alone, then the meshes (two at a time).  The SEG is ready sooner
            (the node's choice: it goes to the PACS), the meshes later; off, meshes are
            made while later tissues are segmented (shortest run overall).

    Raises:
        InputError: bad input (series, profile); the message says which file/field.
        BackendUnavailable: the backend's package or model is missing.
    """
    t_start = time.perf_counter()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    model_type = backend or prof.model_type
    if prof.refuse_without_backend:
        # no HU fallback for this organ (the profile says why): refuse before reading the series
        problem = check_profile(prof, model_type)
        if problem:
            raise BackendUnavailable(f"profile {prof.name} is refused here: {prof.refuse_without_backend.strip()} "
                                     f"It needs {model_type}: {problem}")
    if model_type == "hu_based":
        # the HU backend's many freed arrays of a few MB go back to the OS (measured there,
        # see node.pipeline.heap); an AI backend's process keeps its library's defaults
        fix_mmap_threshold()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(progress)

    # the heap window (see below) is closed on every way out, errors included
    with contextlib.ExitStack() as scope:
        headers: dict[Path, Any] = {}  # parsed once while grouping, reused by the loader
        files = select_series(inputs, series_uid, headers)
        volume: Volume = stages.run(
            "load",
            f"reading {len(files)} files",
            lambda: load_series(
                files, fill_missing_uids=fill_missing_uids, require_modality=prof.modality, decode_workers=decode_workers,
                header_cache=headers,
            ),
        )
        headers.clear()  # headers of other series in the input
        native = {
            "shape_kji": list(volume.shape),
            "spacing_mm_ijk": [round(x, 4) for x in volume.spacing],
            "resampled": volume.resampled,
        }
        grid = prof.working_grid_mm if working_grid_mm is None else (working_grid_mm or None)
        working: dict[str, Any] | None = None
        if grid:
            factors = volume.grid_factors(grid)
            if factors != (1, 1, 1):
                volume = stages.run(
                    "resample", f"working grid ~{grid} mm (blocks {factors[2]}x{factors[1]}x{factors[0]})",
                    lambda: volume.downsampled(factors),
                )
                working = {
                    "grid_mm": grid,
                    "factors_kji": list(factors),
                    "shape_kji": list(volume.shape),
                    "spacing_mm_ijk": [round(x, 4) for x in volume.spacing],
                }
        seg_backend = get_backend(model_type)
        heap_window: RetainFreed | None = None
        if model_type == "hu_based":
            # from here on freed arrays are reused instead of faulted in and zeroed afresh by
            # the kernel, as long as the process stays below about what segmenting this grid
            # needs at its peak anyway (see node.pipeline.heap)
            heap_window = scope.enter_context(RetainFreed(working_set_budget(int(np.prod(volume.shape)))))
        chosen_phase = prof.resolve_phase(volume.info.contrast_applied, phase)
        voxel_ml = volume.voxel_volume_ml
        outputs = prof.outputs  # landmark tissues (output: false) stay out of the SEG, meshes and report
        by_name = {t.name: t for t in outputs}
        tissues: dict[str, dict[str, Any]] = {}
        mesh_paths: list[Path] = []

        def _mesh_one(t, mask: np.ndarray) -> list[Path]:
            info = tissues[t.name]
            opts = MeshOptions.from_dict(t.mesh.model_dump(exclude={"enabled"}))
            mesh = mesh_from_mask(mask, volume.affine, opts)
            info["triangles"] = mesh.triangles
            if mesh.is_empty:
                info.update({"volume_ml_mesh": 0.0, "watertight": None, "manifold": None, "components": 0,
                             "stl": None, "ply": None})
                return []
            # the mesh's topology (most of the check's work) is computed while the files are
            # written: numpy/scipy release the GIL, and the file writes wait on the disk
            # (a decimated mesh comes with it: the decimation checked its result)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-topology") as helper:
                known = mesh.known_topology
                topo_of: Callable[[], Topology] = ((lambda: known) if known is not None else
                                                   helper.submit(topology, mesh.faces, len(mesh.vertices)).result)
                stl = write_stl(mesh, out / f"{prof.name}_{t.name}.stl")
                ply = write_ply(mesh, out / f"{prof.name}_{t.name}_colored.ply", tuple(t.color))
                # as any reader sees the file, not the in-memory mesh (re-read, compared with the mesh)
                check = check_written_stl(stl, mesh, mesh_topology=topo_of)
            info.update({"volume_ml_mesh": round(check.volume_ml, 3), "watertight": check.watertight,
                         "manifold": check.manifold, "components": check.components,
                         "stl": stl.name, "ply": ply.name})
            if mesh.decimated_from is not None:
                before = mesh.decimated_from
                removed = max(0, before["components"] - check.components)  # net: a split would offset a removal
                info["decimation"] = {"triangles_before": before["triangles"],
                                      "components_before": before["components"], "components_removed": removed}
                if removed:
                    log.warning("mesh %s: decimation to %d triangles removed %d of its %d surface components "
                                "(the smallest islands and cavities collapse first)",
                                stl.name, mesh.triangles, removed, before["components"])
            if not check.printable:
                log.warning("mesh %s is not printable: %s", stl.name, check)
            return [stl, ply]

        # Meshes are made while the next tissues are still being segmented (a streaming
        # backend hands each tissue over as soon as it is final): meshing is VTK and numpy,
        # which release the GIL, so it fills the core the segmentation's single-threaded
        # steps leave idle.  Two tissues at a time at most; outputs stay in profile order.
        mesh_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mesh") if write_meshes else None
        mesh_jobs: dict[str, Future] = {}
        mesh_span: list[float] = []  # start of the first and end of the last mesh

        # one mesh at a time while segmentation runs (it has its own threads and its peak
        # memory), two once it is over: the segmenting thread holds one of the two permits
        permits = threading.BoundedSemaphore(2)

        def _timed_mesh(t, mask: np.ndarray) -> list[Path]:
            with permits:
                if not mesh_span:
                    mesh_span.append(time.perf_counter())
                return _mesh_one(t, mask)

        def _tissue_done(name: str, mask: np.ndarray) -> None:
            if name not in by_name:
                return  # a landmark for later tissues, not a result
            n = int(np.count_nonzero(mask))
            tissues[name] = {"voxels": n, "volume_ml_voxels": round(n * voxel_ml, 3)}
            if not seg_first or not write_segmentation:
                _submit_mesh(name, mask)

        def _submit_mesh(name: str, mask: np.ndarray) -> None:
            t = by_name.get(name)
            if mesh_pool is not None and t is not None and t.mesh.enabled:
                mesh_jobs[name] = mesh_pool.submit(_timed_mesh, t, mask)

        if write_segmentation:
            # highdicom's standard tables load while the series is segmented (mostly ITK and
            # numpy outside the GIL), not while it is read (header parsing needs the GIL)
            threading.Thread(target=warm_up, name="seg-warm-up", daemon=True).start()
        try:
            streaming = bool(getattr(seg_backend, "streams_masks", False))

            def _segment() -> dict[str, np.ndarray]:
                if streaming:
                    return seg_backend.segment(volume, prof, phase=chosen_phase, on_mask=_tissue_done)  # type: ignore[call-arg]
                return seg_backend.segment(volume, prof, phase=chosen_phase)

            with permits:
                masks: dict[str, np.ndarray] = stages.run(
                    "segment", f"{model_type} segmentation, profile {prof.name}, {chosen_phase} phase", _segment
                )
            missing = [t.name for t in outputs if t.name not in masks]
            if missing:
                raise InputError(f"backend {model_type} returned no mask for tissue(s) {', '.join(missing)}")
            for t in outputs:
                if t.name not in tissues:  # a backend that hands over all masks at the end
                    _tissue_done(t.name, masks[t.name])
            tissues = {t.name: tissues[t.name] for t in outputs}  # profile order in the report
            checks = quality.assess(prof, masks, volume.affine, voxel_ml, volume.array)
            for w in checks["warnings"]:
                log.warning("quality check: %s", w)
            for t in outputs:
                if tissues[t.name]["voxels"] == 0:
                    log.warning("tissue %s of profile %s is empty", t.name, prof.name)
        except BaseException:
            if mesh_pool is not None:
                mesh_pool.shutdown(wait=True, cancel_futures=True)
            raise

        def _meshes() -> None:
            assert mesh_pool is not None
            try:
                for t in outputs:
                    if t.name in mesh_jobs:
                        mesh_paths.extend(mesh_jobs[t.name].result())
            finally:
                mesh_pool.shutdown(wait=True, cancel_futures=True)
            if mesh_span:
                mesh_span.append(time.perf_counter())

        seg_path: Path | None = out / f"{prof.name}_seg.dcm" if write_segmentation else None
        seg_uid: str | None = None

        def _seg() -> None:
            nonlocal seg_uid
            ds = write_seg(
                volume,
                _segment_specs(prof, masks),
                seg_path,  # type: ignore[arg-type]
                algorithm_name=ALGORITHM_NAMES.get(model_type, model_type),
                algorithm_version=__version__,
                algorithm_family=ALGORITHM_FAMILY_THRESHOLD if model_type == "hu_based" else ALGORITHM_FAMILY_AI,
                series_instance_uid=seg_series_uid,
                series_description=f"SEG {prof.name} {volume.info.series_description}".strip()[:64],
            )
            seg_uid = str(ds.SeriesInstanceUID)
            if on_seg is not None:
                on_seg(seg_path, seg_uid)  # type: ignore[arg-type]

        # Meshing is mostly VTK/numpy (releases the GIL), the SEG mostly Python (highdicom):
        # running them side by side uses both cores.  Each stage keeps its own timing.
        if seg_first and write_segmentation:
            stages.run("seg", "writing DICOM SEG", _seg)
            for t in outputs:  # now the meshes
                _submit_mesh(t.name, masks[t.name])
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="outputs") as pool:
            futures = []
            if write_meshes:
                # "mesh" is what meshing still takes once segmentation is over; "mesh_span"
                # (below) runs from the first mesh started to the last one finished
                futures.append(pool.submit(stages.run, "mesh", f"meshing {len(outputs)} tissues", _meshes))
            if write_segmentation and not seg_first:
                futures.append(pool.submit(stages.run, "seg", "writing DICOM SEG", _seg))
            for f in futures:
                f.result()
        if len(mesh_span) == 2:
            stages.timings["mesh_span"] = round(mesh_span[1] - mesh_span[0], 3)

    report = {
        "software": {"name": "dicom-node", "version": __version__},
        "input": {
            "series_instance_uid": volume.info.series_instance_uid,
            "study_instance_uid": volume.info.study_instance_uid,
            "series_description": volume.info.series_description,
            "files": len(files),
            **native,
            "working_grid": working,
            "contrast_applied": volume.info.contrast_applied,
            "warnings": list(volume.warnings),
        },
        "profile": {"name": prof.name, "source": prof.source, "model_type": model_type, "phase": chosen_phase},
        "tissues": tissues,
        "quality": checks,
        "outputs": {
            "seg": seg_path.name if seg_path else None,
            "seg_series_instance_uid": seg_uid,
            "meshes": [p.name for p in mesh_paths],
        },
        "timings_s": stages.timings,
        "peak_rss_mb": stages.peak_rss_mb,
        # the largest child process this one waited for: decoder pools, the decimator
        # (mesh.simplify_isolated); its pages shared with this process count in both
        "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1),
        "heap": None if heap_window is None else {
            "retained_below_mb": round(heap_window.budget / 2**20, 1),
            "applied": heap_window.applied,
            "trims": heap_window.trims,
            "suspended": heap_window.suspended,
            "trimmed_mb": round(heap_window.trimmed_bytes / 2**20, 1),
        },
    }
    report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    if progress:
        progress("report", "writing report.json")
    report_path = out / "report.json"
    atomic_write(report_path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return RunResult(out, report, seg_path, mesh_paths, report_path, volume, masks)
