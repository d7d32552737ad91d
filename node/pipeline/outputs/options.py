"""What a rule can ask a job to return (``outputs:``, ``overlay:``): names and options only, no
writers, so the rule validator and the router import it without the imaging libraries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OverlayMode = Literal["fill", "outline"]


@dataclass(frozen=True)
class OverlayStyle:
    """How the overlay looks and is stored (the rule's ``overlay:`` options)."""

    mode: OverlayMode = "fill"
    opacity: float = 0.4  #: of the fill
    window: tuple[float, float] | None = None  #: (centre, width) HU; None: the source's, else soft tissue
    jpeg: bool = True  #: JPEG baseline (lossy); False: uncompressed RGB
    jpeg_quality: int = 90


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
    def from_params(cls, params: dict[str, Any] | None) -> OutputOptions:
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


def dicom_objects(report: dict[str, Any], kinds: tuple[str, ...] = OUTPUT_KINDS) -> list[str]:
    """The DICOM files beside the SEG that a run wrote for ``kinds`` (relative to its folder),
    from report.json: SR, Encapsulated STL, overlay slices."""
    o = report.get("outputs") or {}
    return [*([o["sr"]] if o.get("sr") and "sr" in kinds else []),
            *(o.get("encapsulated_stl") or [] if "stl" in kinds else []),
            *(o.get("overlay") or [] if "overlay" in kinds else [])]


def dispatch_kinds(outputs: OutputOptions, *, stow: bool) -> tuple[str, ...]:
    """The dispatch kinds a job's outputs need at one destination.

    C-STORE destinations: ``dicom`` for the SEG (sent as soon as it is written) and ``outputs`` for
    the SR, overlay and STL (sent when the job is done).  STOW-RS destinations: ``outputs`` only,
    which then carries the SEG too: every object of the job in one request.
    """
    if stow:
        return ("outputs",)
    return (*(("dicom",) if "seg" in outputs.kinds else ()), *(("outputs",) if outputs.extra else ()))
