"""Result objects beside the SEG, chosen per rule (``outputs:``): which exist, their options, and
writing them from a finished segmentation.

* ``seg``: the DICOM SEG (:mod:`node.pipeline.seg`), as before; the default.
* ``sr``: measurements report, TID 1500 Comprehensive 3D SR (:mod:`.sr`).
* ``overlay``: the source slices with the tissues burned in, Secondary Capture (:mod:`.overlay`).
* ``stl``: each mesh as an Encapsulated STL instance (:mod:`.encapsulated_stl`).

:func:`write_outputs` is a function of the run's volume, masks, profile, SEG and report: whatever
assembles a run calls it once the SEG and the meshes are written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.pipeline.outputs.common import FrameMasks, derived_uid
from node.pipeline.outputs.encapsulated_stl import MeshObject, write_encapsulated_stl
from node.pipeline.outputs.overlay import OverlayStyle, OverlayTissue, write_overlay_series
from node.pipeline.outputs.sr import tissue_measurements, write_measurement_sr
from node.pipeline.volume import Volume

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("seg", "sr", "overlay", "stl")
DEFAULT_OUTPUTS = ("seg",)
OVERLAY_MODES = ("fill", "outline")
DEFAULT_OVERLAY_DESCRIPTION = "OVERLAY {profile} {SeriesDescription}"


@dataclass(frozen=True)
class OutputOptions:
    """What a job returns (the rule's ``outputs:`` and ``overlay:``)."""

    kinds: tuple[str, ...] = DEFAULT_OUTPUTS
    overlay: OverlayStyle = OverlayStyle()
    overlay_series_description: str = DEFAULT_OVERLAY_DESCRIPTION

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in OUTPUT_KINDS]
        if bad:
            raise ValueError(f"unknown output(s) {bad}; allowed: {', '.join(OUTPUT_KINDS)}")

    @property
    def extra(self) -> tuple[str, ...]:
        """The kinds beside the SEG."""
        return tuple(k for k in self.kinds if k != "seg")

    def to_params(self) -> dict[str, Any]:
        """JSON for the job's params (what the router records and the job process reads)."""
        return {"outputs": list(self.kinds),
                "overlay": {"mode": self.overlay.mode, "opacity": self.overlay.opacity,
                            "window": list(self.overlay.window) if self.overlay.window else None,
                            "jpeg": self.overlay.jpeg, "series_description": self.overlay_series_description}}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> "OutputOptions":
        """From :meth:`to_params`'s JSON; a job recorded before outputs existed gets the default."""
        p = params or {}
        kinds = tuple(p.get("outputs") or DEFAULT_OUTPUTS)
        ov = p.get("overlay") or {}
        window = ov.get("window")
        style = OverlayStyle(
            mode=ov.get("mode", "fill"), opacity=float(ov.get("opacity", 0.4)),
            window=(float(window[0]), float(window[1])) if window else None, jpeg=bool(ov.get("jpeg", True)),
        )
        return cls(kinds, style, str(ov.get("series_description") or DEFAULT_OVERLAY_DESCRIPTION))


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


def dicom_objects(report: dict[str, Any]) -> list[str]:
    """The DICOM files beside the SEG that a run wrote (relative to its folder), from report.json."""
    o = report.get("outputs") or {}
    return [*([o["sr"]] if o.get("sr") else []), *(o.get("encapsulated_stl") or []), *(o.get("overlay") or [])]


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
    import time

    out_dir = Path(out_dir)
    written = WrittenOutputs()
    if not options.extra:
        return written
    base = str(seg.SeriesInstanceUID) if seg is not None else derived_uid()
    names = [t.name for t in profile.tissues]
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
            volume, frame_masks, [OverlayTissue(t.name, tuple(t.color), f"{profile.name} {t.name}") for t in profile.tissues],
            out_dir / f"{profile.name}_overlay", pixels=pixels, style=options.overlay,
            series_instance_uid=derived_uid(base, "overlay series"),
            series_description=options.overlay_series_description, profile_name=profile.name,
            software_version=software_version,
        )
        written.timings_s["overlay"] = round(time.perf_counter() - t0, 3)
    if "stl" in options.kinds:
        t0 = time.perf_counter()
        meshes = [MeshObject(out_dir / str(report_tissues[t.name]["stl"]), f"{profile.name} {t.name}")
                  for t in profile.tissues if (report_tissues.get(t.name) or {}).get("stl")]
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
