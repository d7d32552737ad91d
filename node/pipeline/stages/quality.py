"""Sanity checks of a result against anatomy: ``report.json``'s ``quality`` block.

Each output tissue whose profile entry has ``expect`` is checked: its volume against the
range of a whole organ, and for paired organs each side's volume and the balance between
the sides (split at the midline: the emptiest column between the two organs).  A failed
check is a warning (in the report, the log and the job), never a failure: the result is
still delivered, and the operator sees why it deserves a look.

A volume only says something when the organ is wholly in the series.  A mask that touches
the first or last slice, or the edge of the image, is *cut by the scan*: its volume is a
lower bound, so only the upper limit is checked (and the side balance is not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from node.profiles import Profile, Tissue


@dataclass(frozen=True)
class TissueQuality:
    """The checks of one tissue (as written to ``report.json``)."""

    volume_ml: float
    status: str  # ok | warning | partial (cut by the scan, upper limit checked) | unchecked (no expect)
    expected_ml: tuple[float, float] | None = None
    cut_by_scan: tuple[str, ...] = ()
    sides_ml: dict[str, float] | None = None
    side_ratio: float | None = None
    warnings: tuple[str, ...] = field(default=())


def cut_by_scan(mask: np.ndarray) -> tuple[str, ...]:
    """Which edges of the series the mask touches: ``first slice``, ``last slice``, ``image edge``."""
    out = []
    if mask[0].any():
        out.append("first slice")
    if mask[-1].any():
        out.append("last slice")
    if mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any():
        out.append("image edge")
    return tuple(out)


#: the midline is searched this far either side of the body's centre, mm
MIDLINE_SEARCH_MM = 40.0


def body_centre_column(hu: np.ndarray) -> float:
    """The column (``i``) at the centre of the patient: the mean column of everything denser
    than -400 HU (body and table; both are about symmetric), on every 4th voxel."""
    counts = (hu[::4, ::4, ::4] > -400).sum(axis=(0, 1), dtype=np.int64)
    if not counts.any():
        return (hu.shape[2] - 1) / 2
    return float((np.arange(counts.size) * 4 * counts).sum() / counts.sum())


def split_sides(mask: np.ndarray, affine: np.ndarray, voxel_ml: float, centre: float | None = None) -> dict[str, float]:
    """Volume (mL) of the mask left and right of the patient's midline.

    The midline is where the mask is thinnest between its two organs: the column (``i``)
    with the fewest voxels within ``MIDLINE_SEARCH_MM`` of the body's ``centre`` column (the
    spine between the kidneys, the mediastinum between the lungs), so that a single organ is
    not cut in two.  Without ``centre``: in the middle half of the mask's extent.  Patient
    left is +x in LPS.
    """
    counts = mask.sum(axis=(0, 1), dtype=np.int64)
    cols = np.flatnonzero(counts)
    if cols.size == 0:
        return {"left": 0.0, "right": 0.0}
    if centre is not None:
        reach = round(MIDLINE_SEARCH_MM / max(float(np.linalg.norm(affine[:3, 0])), 1e-6))
        lo = int(np.clip(round(centre) - reach, 0, counts.size - 1))
        hi = int(np.clip(round(centre) + reach, 0, counts.size - 1))
        mid_at = centre - lo
    else:
        quarter = (cols[-1] - cols[0]) // 4
        lo, hi = int(cols[0] + quarter), int(cols[-1] - quarter)
        mid_at = (hi - lo) / 2
    middle = counts[lo: hi + 1]
    if middle.size:
        low = np.flatnonzero(middle == middle.min())
        # the middle of the emptiest run nearest the centre
        runs = np.split(low, np.flatnonzero(np.diff(low) > 1) + 1)
        best = min(runs, key=lambda r: abs((r[0] + r[-1]) / 2 - mid_at))
        cut = lo + round((best[0] + best[-1]) / 2)
    else:
        cut = (cols[0] + cols[-1]) // 2
    below = float(counts[:cut].sum()) * voxel_ml
    above = float(counts[cut + 1:].sum()) * voxel_ml
    middle_col = float(counts[cut]) * voxel_ml / 2
    below, above = below + middle_col, above + middle_col
    # which side is the patient's left: x (LPS) grows with i when the affine says so
    left_is_high_i = affine[0, 0] > 0
    return {"left": round(above if left_is_high_i else below, 3), "right": round(below if left_is_high_i else above, 3)}


def check_tissue(tissue: Tissue, mask: np.ndarray, affine: np.ndarray, voxel_ml: float,
                 centre: float | None = None) -> TissueQuality:
    """The sanity checks of one tissue's mask (see the module docstring); ``centre``: the
    body's centre column, near which the midline of paired organs is sought."""
    volume = round(float(np.count_nonzero(mask)) * voxel_ml, 3)
    expect = tissue.expect
    if expect is None or expect.volume_ml is None and not expect.paired:
        return TissueQuality(volume, "unchecked")
    cut = cut_by_scan(mask) if volume else ()
    name = tissue.name
    warnings: list[str] = []
    rng = expect.volume_ml
    sides = split_sides(mask, affine, voxel_ml, centre) if expect.paired and volume else None
    ratio: float | None = None
    each = " each side" if expect.paired else ""
    if volume == 0:
        want = f" (a whole one is {rng[0]:g}-{rng[1]:g} mL{each})" if rng else ""
        warnings.append(f"{name}: nothing found{want}")
    elif sides is not None:
        small, large = sorted(sides.values())
        ratio = round(large / small, 2) if small > 0 else None
        for side, ml in sides.items():
            if rng and ml > rng[1]:
                warnings.append(f"{name}: {side} side {ml:.0f} mL, more than {rng[1]:g} mL")
            elif rng and not cut and ml < rng[0]:
                warnings.append(f"{name}: {side} side {ml:.0f} mL, less than {rng[0]:g} mL"
                                + (" (nothing found on that side)" if ml == 0 else ""))
        if not cut and small > 0 and ratio is not None and ratio > expect.max_side_ratio:
            warnings.append(f"{name}: sides unbalanced, left {sides['left']:.0f} mL vs right {sides['right']:.0f} mL "
                            f"(ratio {ratio:.2f} > {expect.max_side_ratio:g})")
    elif rng:
        if volume > rng[1]:
            warnings.append(f"{name}: {volume:.0f} mL, more than {rng[1]:g} mL")
        elif not cut and volume < rng[0]:
            warnings.append(f"{name}: {volume:.0f} mL, less than {rng[0]:g} mL")
    status = "warning" if warnings else ("partial" if cut else "ok")
    return TissueQuality(volume, status, rng, cut, sides, ratio, tuple(warnings))


def assess(profile: Profile, masks: Mapping[str, np.ndarray], affine: np.ndarray, voxel_ml: float,
           hu: np.ndarray | None = None) -> dict[str, Any]:
    """``report["quality"]``: per output tissue its :class:`TissueQuality`, and all warnings
    (``hu``: the series, whose body centre guides the midline of paired organs)."""
    tissues: dict[str, Any] = {}
    warnings: list[str] = []
    paired = any(t.expect is not None and t.expect.paired for t in profile.result_tissues)
    centre = body_centre_column(hu) if hu is not None and paired else None
    for t in profile.result_tissues:
        if t.name not in masks:
            continue
        q = check_tissue(t, masks[t.name], affine, voxel_ml, centre)
        entry = {k: v for k, v in asdict(q).items() if v not in (None, (), [])}
        entry["cut_by_scan"] = list(q.cut_by_scan)
        entry.pop("warnings", None)
        if q.expected_ml is not None:
            entry["expected_ml"] = list(q.expected_ml)
        tissues[t.name] = entry
        warnings.extend(q.warnings)
    return {"tissues": tissues, "warnings": warnings}
