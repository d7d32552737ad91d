"""The report step: what a run read, did and wrote, as ``report.json`` beside its outputs."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

from node import __version__
from node.durable import atomic_write
from node.pipeline.hu.heap import RetainFreed
from node.pipeline.volume import Volume
from node.profiles import Profile


def grid_report(volume: Volume) -> dict[str, Any]:
    """The series' own grid, as read."""
    return {
        "shape_kji": list(volume.shape),
        "spacing_mm_ijk": [round(x, 4) for x in volume.spacing],
        "resampled": volume.resampled,
    }


def working_grid_report(grid_mm: float, factors: tuple[int, int, int], volume: Volume) -> dict[str, Any]:
    """The working grid the series was block-averaged to (``volume``: the result)."""
    return {
        "grid_mm": grid_mm,
        "factors_kji": list(factors),
        "shape_kji": list(volume.shape),
        "spacing_mm_ijk": [round(x, 4) for x in volume.spacing],
    }


def build_report(
    *,
    volume: Volume,
    files: int,
    native: dict[str, Any],
    working: dict[str, Any] | None,
    profile: Profile,
    model_type: str,
    phase: str,
    tissues: dict[str, dict[str, Any]],
    seg_path: Path | None,
    seg_uid: str | None,
    mesh_paths: list[Path],
    timings_s: dict[str, float],
    peak_rss_mb: dict[str, float],
    heap_window: RetainFreed | None,
) -> dict[str, Any]:
    """The report of a run (``timings_s`` is taken as it is: the caller adds the total)."""
    return {
        "software": {"name": "dicom-node", "version": __version__},
        "input": {
            "series_instance_uid": volume.info.series_instance_uid,
            "study_instance_uid": volume.info.study_instance_uid,
            "series_description": volume.info.series_description,
            "files": files,
            **native,
            "working_grid": working,
            "contrast_applied": volume.info.contrast_applied,
            "warnings": list(volume.warnings),
        },
        "profile": {"name": profile.name, "source": profile.source, "model_type": model_type, "phase": phase},
        "tissues": tissues,
        "outputs": {
            "seg": seg_path.name if seg_path else None,
            "seg_series_instance_uid": seg_uid,
            "meshes": [p.name for p in mesh_paths],
        },
        "timings_s": timings_s,
        "peak_rss_mb": peak_rss_mb,
        # the largest child process this one waited for: decoder pools, the decimator
        # (mesh.decimate.simplify_isolated); its pages shared with this process count in both
        "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1),
        "heap": None if heap_window is None else {
            "retained_below_mb": round(heap_window.budget / 2**20, 1),
            "applied": heap_window.applied,
            "trims": heap_window.trims,
            "suspended": heap_window.suspended,
            "trimmed_mb": round(heap_window.trimmed_bytes / 2**20, 1),
        },
    }


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write ``<out>/report.json`` atomically."""
    report_path = out / "report.json"
    atomic_write(report_path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return report_path
