"""One pipeline run: DICOM files -> volume -> tissue masks -> meshes, DICOM SEG and ``report.json``.

What the offline command (``dicom-node run``) and the node's job processes call; it never
touches the network.  It chains the steps (``node.pipeline.series``, the backend,
``node.pipeline.stages``), runs meshing and the SEG beside the segmentation, and times each.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydicom import Dataset

from node import __version__
from node.durable import makedirs_durable
from node.backend_registry import backend_spec
from node.errors import BackendUnavailable
from node.pipeline.backends import check_profile, get_backend
from node.pipeline.hu.heap import RetainFreed, fix_mmap_threshold, working_set_budget
from node.pipeline.outputs import OutputOptions
from node.pipeline.outputs.write import WrittenOutputs, write_outputs
from node.pipeline.seg import warm_up
from node.pipeline.series.find import select_series
from node.pipeline.series.load import load_series
from node.pipeline.stages import quality
from node.pipeline.stages.qc import QCResult, write_qc
from node.pipeline.stages.mesh import MeshQueue
from node.pipeline.stages.report import build_report, grid_report, working_grid_report, write_report
from node.pipeline.stages.seg import write_tissue_seg
from node.pipeline.stages.segment import check_masks, segment, voxel_report
from node.pipeline.volume import Volume
from node.profiles import Profile, load_profile

log = logging.getLogger(__name__)

#: ``progress(stage, message)`` callback; stages: load, segment, mesh, seg, report
Progress = Callable[[str, str], None]


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
    backend_run: dict[str, Any] = field(default_factory=dict)  #: the backend's run_info() after segmenting


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
    outputs: OutputOptions | None = None,
    qc: bool = True,
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
        outputs: result objects beside the SEG (SR, overlay, Encapsulated STL), written once the
            SEG and meshes are (:func:`node.pipeline.outputs.write_outputs`); default: none.
        qc: write the QC pictures (``qc/``, :mod:`node.pipeline.stages.qc`); a failure there is a
            warning in ``report.json`` (``qc.error``), never the run's.

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
    backend_entry = backend_spec(model_type)
    if not backend_entry.runs_model:
        # the HU backend's many freed arrays of a few MB go back to the OS (measured there,
        # see node.pipeline.hu.heap); an AI backend's process keeps its library's defaults
        fix_mmap_threshold()
    out = Path(output_dir)
    makedirs_durable(out)  # with the node's folder mode (patient data)
    stages = _Stages(progress)

    # the heap window (see below) is closed on every way out, errors included
    with contextlib.ExitStack() as scope:
        # load
        headers: dict[Path, Any] = {}  # parsed once while grouping, reused by the loader
        files = select_series(inputs, series_uid, headers)
        volume: Volume = stages.run(
            "load",
            f"reading {len(files)} files",
            lambda: load_series(
                files, fill_missing_uids=fill_missing_uids, require_modality=prof.modality, decode_workers=decode_workers,
                header_cache=headers,
                # HU thresholds on the radiologist's own pixels; models on dcm2niix's grid
                grid="orthogonal" if backend_entry.runs_model else "exact",
            ),
        )
        headers.clear()  # headers of other series in the input
        native = grid_report(volume)

        # working grid
        grid = prof.working_grid_mm if working_grid_mm is None else (working_grid_mm or None)
        # the overlay shows the source pixels, not the working grid (kept only for it)
        native_volume = volume if outputs is not None and "overlay" in outputs.kinds else None
        working: dict[str, Any] | None = None
        if grid:
            factors = volume.grid_factors(grid)
            if factors != (1, 1, 1):
                volume = stages.run(
                    "resample", f"working grid ~{grid} mm (blocks {factors[2]}x{factors[1]}x{factors[0]})",
                    lambda: volume.downsampled(factors),
                )
                working = working_grid_report(grid, factors, volume)

        # backend and heap window
        seg_backend = get_backend(model_type)
        heap_window: RetainFreed | None = None
        if not backend_entry.runs_model:
            # from here on freed arrays are reused instead of faulted in and zeroed afresh by
            # the kernel, as long as the process stays below about what segmenting this grid
            # needs at its peak anyway (see node.pipeline.hu.heap)
            heap_window = scope.enter_context(RetainFreed(working_set_budget(int(np.prod(volume.shape)))))
        chosen_phase = prof.resolve_phase(volume.info.contrast_applied, phase)
        voxel_ml = volume.voxel_volume_ml
        # landmark tissues (output: false) guide later ones and stay out of the SEG, meshes and report
        result_tissues = prof.result_tissues
        result_names = {t.name for t in result_tissues}
        tissues: dict[str, dict[str, Any]] = {}
        mesh_paths: list[Path] = []

        # segment, meshing each tissue as soon as the backend hands it over
        # (a streaming backend does so as soon as it is final); outputs stay in profile order
        meshes = MeshQueue(prof, volume.affine, out) if write_meshes else None

        def _tissue_done(name: str, mask: np.ndarray) -> None:
            if name not in result_names:
                return  # a landmark for later tissues, not a result
            tissues[name] = voxel_report(mask, voxel_ml)
            if meshes is not None and (not seg_first or not write_segmentation):
                meshes.submit(name, mask)

        if write_segmentation:
            # highdicom's standard tables load while the series is segmented (mostly ITK and
            # numpy outside the GIL), not while it is read (header parsing needs the GIL)
            threading.Thread(target=warm_up, name="seg-warm-up", daemon=True).start()
        try:
            with meshes.permits if meshes is not None else contextlib.nullcontext():
                masks: dict[str, np.ndarray] = stages.run(
                    "segment", f"{model_type} segmentation, profile {prof.name}, {chosen_phase} phase",
                    lambda: segment(seg_backend, volume, prof, chosen_phase, _tissue_done),
                )
            backend_run = seg_backend.run_info()
            check_masks(masks, prof, model_type)
            for t in result_tissues:
                if t.name not in tissues:  # a backend that hands over all masks at the end
                    _tissue_done(t.name, masks[t.name])
            tissues = {t.name: tissues[t.name] for t in result_tissues}  # profile order in the report
            # sanity checks (volumes against anatomy, left/right balance): a failed one is a
            # warning on the result, which is still delivered
            checks = quality.assess(prof, masks, volume.affine, voxel_ml, volume.array)
            for w in checks["warnings"]:
                log.warning("quality check: %s", w)
            for t in result_tissues:
                if tissues[t.name]["voxels"] == 0:
                    log.warning("tissue %s of profile %s is empty", t.name, prof.name)
        except BaseException:
            if meshes is not None:
                meshes.cancel()
            raise

        # meshes and SEG
        def _meshes() -> None:
            assert meshes is not None
            for name, made in meshes.results().items():
                tissues[name].update(made.report())
                mesh_paths.extend(made.paths)

        seg_path: Path | None = out / f"{prof.name}_seg.dcm" if write_segmentation else None
        seg_uid: str | None = None
        seg_ds: Dataset | None = None  # for the outputs that reference the SEG's segments

        def _seg() -> None:
            nonlocal seg_uid, seg_ds
            assert seg_path is not None
            seg_ds = write_tissue_seg(volume, prof, masks, seg_path, model_type=model_type,
                                      seg_series_uid=seg_series_uid)
            seg_uid = str(seg_ds.SeriesInstanceUID)
            if on_seg is not None:
                on_seg(seg_path, seg_uid)

        # Meshing is mostly VTK/numpy (releases the GIL), the SEG mostly Python (highdicom):
        # running them side by side uses both cores.  Each stage keeps its own timing.
        if seg_first and write_segmentation:
            stages.run("seg", "writing DICOM SEG", _seg)
            if meshes is not None:
                for t in result_tissues:  # now the meshes
                    meshes.submit(t.name, masks[t.name])
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="outputs") as pool:
            futures = []
            if write_meshes:
                # "mesh" is what meshing still takes once segmentation is over; "mesh_span"
                # (below) runs from the first mesh started to the last one finished
                futures.append(pool.submit(stages.run, "mesh", f"meshing {len(result_tissues)} tissues", _meshes))
            if write_segmentation and not seg_first:
                futures.append(pool.submit(stages.run, "seg", "writing DICOM SEG", _seg))
            for f in futures:
                f.result()
        span = meshes.span_s if meshes is not None else None
        if span is not None:
            stages.timings["mesh_span"] = span
        # the rule's other result objects (SR, overlay, Encapsulated STL): none unless it asks
        written: WrittenOutputs | None = None
        pixels = native_volume if native_volume is not volume else None  # the source grid, if not the working one
        del native_volume
        if outputs is not None and outputs.extra:
            written = stages.run("outputs", f"writing {', '.join(outputs.extra)}", functools.partial(
                write_outputs, volume, masks, prof, outputs, out, seg=seg_ds, report_tissues=tissues, pixels=pixels,
                backend=model_type, backend_display_name=backend_entry.display_name, software_version=__version__))
        del pixels  # the native volume is held only for the overlay

        # QC pictures: for a person checking the result; they never fail the run
        qc_result: QCResult | None = None
        qc_error: str | None = None
        if qc:
            stls = {n: out / str(t["stl"]) for n, t in tissues.items() if t.get("stl")}
            t_qc = time.perf_counter()
            try:
                qc_result = stages.run("qc", "QC pictures", functools.partial(
                    write_qc, volume.array, volume.affine, masks, prof, out, phase=chosen_phase, stl_paths=stls))
            except Exception as exc:  # QC pictures never fail a run (see the docstring)
                qc_error = f"{type(exc).__name__}: {exc}"
                stages.timings["qc"] = round(time.perf_counter() - t_qc, 3)
                log.warning("QC pictures failed (the result stands): %s", qc_error, exc_info=True)
            if qc_result is not None:
                for w in qc_result.warnings:
                    log.warning("QC picture: %s", w)

    # report
    report = build_report(
        volume=volume, files=len(files), native=native, working=working, profile=prof, model_type=model_type,
        phase=chosen_phase, tissues=tissues, seg_path=seg_path, seg_uid=seg_uid, mesh_paths=mesh_paths,
        timings_s=stages.timings, peak_rss_mb=stages.peak_rss_mb, heap_window=heap_window,
    )
    report["quality"] = checks
    if written is not None:
        report["outputs"].update(written.report_entry(out))
    if qc:
        report["qc"] = qc_result.report() if qc_result is not None else {"pictures": [], "error": qc_error}
        report["outputs"]["qc"] = [p["file"] for p in report["qc"]["pictures"]]
    report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    if progress:
        progress("report", "writing report.json")
    report_path = write_report(out, report)
    return RunResult(out, report, seg_path, mesh_paths, report_path, volume, masks, backend_run)
