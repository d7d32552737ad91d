"""Write a run's outputs beside the SEG (see :mod:`node.pipeline.outputs`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.pipeline.outputs.common import FrameMasks, derived_uid
from node.pipeline.outputs.encapsulated_stl import MeshObject, write_encapsulated_stl
from node.pipeline.outputs.options import OutputOptions
from node.pipeline.outputs.overlay import OverlayTissue, write_overlay_series
from node.pipeline.outputs.sr import tissue_measurements, write_measurement_sr
from node.pipeline.volume import Volume

log = logging.getLogger(__name__)


@dataclass
class WrittenOutputs:
    """What :func:`write_outputs` wrote (paths inside the output folder)."""

    sr: Path | None = None
    overlay: list[Path] = field(default_factory=list)
    stl: list[Path] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def report_entry(self, out_dir: Path) -> dict[str, Any]:
        """``report["outputs"]`` keys: file names relative to the output folder."""
        def rel(p: Path) -> str:
            return p.relative_to(out_dir).as_posix()

        return {"sr": rel(self.sr) if self.sr else None,
                "overlay": [rel(p) for p in self.overlay],
                "encapsulated_stl": [rel(p) for p in self.stl]}


def write_outputs(
    volume: Volume,
    masks: dict[str, np.ndarray],
    profile: Any,
    options: OutputOptions,
    out_dir: Path,
    *,
    seg: Dataset | None,
    report_tissues: dict[str, dict[str, Any]],
    pixels: Volume | None = None,
    backend: str,
    backend_display_name: str,
    software_version: str,
) -> WrittenOutputs:
    """Write the ``sr``, ``overlay`` and ``stl`` outputs of ``options`` into ``out_dir``.

    Args:
        volume / masks: the volume the tissues were segmented on and their masks.
        profile: the :class:`~node.profiles.Profile` (tissue names, colours, codes).
        seg: the run's SEG (the SR references its segments; its series UID seeds the other
            objects' UIDs, so a re-run writes the same instances).  Required for ``sr``.
        report_tissues: ``report["tissues"]`` (volumes from voxels and meshes, STL names).
        pixels: the volume on the source frames when ``volume`` is a coarser working grid.
    """
    out_dir = Path(out_dir)
    written = WrittenOutputs()
    if not options.extra:
        return written
    base = str(seg.SeriesInstanceUID) if seg is not None else derived_uid()
    names = [t.name for t in profile.result_tissues]
    frame_masks: FrameMasks | None = None
    if "sr" in options.kinds or "overlay" in options.kinds:
        t0 = time.perf_counter()
        frame_masks = FrameMasks.of(volume, masks, names)
        written.timings_s["frame_masks"] = round(time.perf_counter() - t0, 3)
    if "sr" in options.kinds:
        if seg is None:
            raise ValueError("the sr output references the SEG's segments: the SEG must be written")
        t0 = time.perf_counter()
        measurements = tissue_measurements(volume, masks, profile, report_tissues, seg)
        path = out_dir / f"{profile.name}_sr.dcm"
        write_measurement_sr(volume, measurements, seg, path, frame_masks=frame_masks, profile_name=profile.name,
                             backend=backend, backend_display_name=backend_display_name,
                             software_version=software_version,
                             series_instance_uid=derived_uid(base, "SR series"))
        written.sr = path
        written.timings_s["sr"] = round(time.perf_counter() - t0, 3)
    if "overlay" in options.kinds:
        assert frame_masks is not None
        t0 = time.perf_counter()
        written.overlay = write_overlay_series(
            volume, frame_masks, [OverlayTissue(t.name, tuple(t.color), f"{profile.name} {t.name}") for t in profile.result_tissues],
            out_dir / f"{profile.name}_overlay", pixels=pixels, style=options.overlay,
            series_instance_uid=derived_uid(base, "overlay series"),
            series_description=options.overlay_series_description, profile_name=profile.name,
            software_version=software_version,
        )
        written.timings_s["overlay"] = round(time.perf_counter() - t0, 3)
    if "stl" in options.kinds:
        t0 = time.perf_counter()
        meshes = [MeshObject(out_dir / str(report_tissues[t.name]["stl"]), f"{profile.name} {t.name}")
                  for t in profile.result_tissues if (report_tissues.get(t.name) or {}).get("stl")]
        if not meshes:
            log.warning("stl output: no mesh was written (meshes off or every tissue empty)")
        else:
            written.stl = write_encapsulated_stl(
                volume, meshes, out_dir, series_instance_uid=derived_uid(base, "STL series"),
                series_description=f"STL {profile.name} {volume.info.series_description or ''}".strip(),
                software_version=software_version, name_prefix=f"{profile.name}_stl_",
            )
        written.timings_s["stl"] = round(time.perf_counter() - t0, 3)
    return written
