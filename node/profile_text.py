"""A profile told in words: what each tissue is and what each step does, with its values in
millimetres and HU (``dicom-node profiles show NAME``)."""

from __future__ import annotations

from typing import Any

from node.profiles import Inside, PhaseRanges, Profile, Tissue

PHASE_WORDS = {"non_contrast": "without contrast", "contrast": "with contrast"}


def _hu(r: tuple[float, float]) -> str:
    return f"{r[0]:g}..{r[1]:g} HU"


def _mm(v: float) -> str:
    return f"{v:g} mm"


def explain_step(step: Any) -> str:
    """One line saying what a morphology step does, with its values."""
    op = step.op
    if op == "closing":
        return f"close gaps and dents narrower than {_mm(2 * step.radius_mm)} (closing, ball radius {_mm(step.radius_mm)})"
    if op == "opening":
        return (f"cut bridges and drop specks thinner than {_mm(2 * step.radius_mm)} "
                f"(opening, ball radius {_mm(step.radius_mm)})")
    if op == "dilation":
        return f"grow by {_mm(step.radius_mm)} (dilation)"
    if op == "erosion":
        return f"shrink by {_mm(step.radius_mm)} (erosion)"
    if op == "median":
        return f"smooth the outline: majority of the voxels within {_mm(step.radius_mm)} (binary median)"
    if op == "fill_holes":
        where = "in each slice" if step.mode == "slice" else "in 3D"
        limit = f", holes up to {step.max_area_mm2:g} mm^2" if step.max_area_mm2 else ""
        return f"fill the holes enclosed by the tissue {where}{limit}"
    if op == "keep_largest":
        return f"keep the {step.n} largest connected part(s)"
    if op == "remove_small":
        return f"drop connected parts smaller than {step.min_ml:g} mL"
    if op == "grow":
        reach = f", at most {_mm(step.max_mm)} away" if step.max_mm else ""
        return f"add the {_hu(step.hu)} voxels connected to the tissue{reach} (hysteresis)"
    if op == "remove_thick":
        return (f"drop the parts a ball of radius {_mm(step.radius_mm)} fits into (organs, filled vessels); "
                "thin structures stay")
    if op == "connected_to":
        rim = f", without its {_mm(step.margin_mm)} rim" if step.margin_mm else ""
        return f"keep the parts attached to {step.tissue}{rim}"
    if op == "edge_grow":
        avoid = f", never into {', '.join(step.avoid)}" if step.avoid else ""
        return (f"grow up to {_mm(step.max_mm)} ({'in-plane' if step.mode == 'slice' else '3D'}) to the local edge: "
                f"{step.level:g} of the way from the darkest HU within {_mm(step.background_mm)} "
                f"(not below {step.floor_hu:g} HU) to the tissue's own{avoid}")
    if op == "slice_valleys":
        without = f"; {', '.join(step.without)} left out of the parts" if step.without else ""
        return (f"remove the per-slice parts (>= {step.min_area_mm2:g} mm^2) whose median HU {_mm(step.core_mm)} "
                f"inside is below {step.ratio:g} x the brightest parts within {_mm(step.window_mm)} above and "
                f"below (discs between vertebrae){without}")
    if op == "select":
        return _explain_select(step)
    if op == "adapt_hu":
        within = f", within {_mm(step.grow_mm)} of the tissue so far" if step.grow_mm is not None else ""
        limits = f", never outside {_hu(step.limits)}" if step.limits else ""
        return (f"re-threshold at this organ's own density: the median +- {step.sd:g} robust SD of the HU at least "
                f"{_mm(step.core_mm)} inside it{within}{limits}; keep what is connected to that core")
    if op == "drop_gas":
        return (f"drop the parts that are gas: {step.fraction:.0%} or more of their voxels {_mm(step.core_mm)} "
                f"inside are below {step.air_hu:g} HU (air; lung parenchyma is about -850 HU)")
    if op == "subtract":
        grown = f" grown by {_mm(step.margin_mm)}" if step.margin_mm else ""
        return f"remove {', '.join(step.tissues)}{grown} before the next steps"
    if op == "trachea":
        return (f"keep the trachea: a lumen of {step.min_area_mm2:g}-{step.max_area_mm2:g} mm^2 within "
                f"{_mm(step.midline_mm)} of the midline in the top slice, ringed by soft tissue, followed down "
                f"until its branches meet the lungs, main bronchi at most {_mm(step.bronchi_mm)} below the carina; "
                f"none if shorter than {_mm(step.min_length_mm)}")
    return op


def _explain_select(step: Any) -> str:
    parts = []
    if step.split_mm:
        parts.append(f"cut at necks narrower than {_mm(2 * step.split_mm)}")
    where = {"any": "", "left": " on the patient's left", "right": " on the patient's right",
             "both": " on each side"}[step.side]
    parts.append(f"keep the {step.n} largest part(s){where}")
    if step.lateral_mm:
        parts.append(f"centre {step.lateral_mm[0]:g}-{step.lateral_mm[1]:g} mm from the midline")
    if step.anterior_mm:
        lo, hi = step.anterior_mm
        parts.append(f"{lo:g} to {hi:g} mm in front of the spine's centre")
    if step.min_ml or step.max_ml:
        hi = f"{step.max_ml:g}" if step.max_ml else "any"
        parts.append(f"{step.min_ml:g}-{hi} mL")
    if step.max_split_mm and step.max_ml:
        parts.append(f"parts over {step.max_ml:g} mL cut again at wider necks, up to {_mm(2 * step.max_split_mm)}")
    return "; ".join(parts)


def _envelope(kind: str, e: Inside) -> str:
    closed = f"closed by {_mm(e.closing_mm)}, " if e.closing_mm else ""
    return f"{kind} {e.tissue} ({closed}{'filled in each slice' if e.fill == 'slice' else 'filled in 3D'})"


def describe_tissue(t: Tissue) -> list[str]:
    role = "" if t.output else "  [landmark for later tissues: not in the SEG, meshes or report]"
    lines = [f"  {t.name}: {t.description}{role}"]
    if isinstance(t.hu, PhaseRanges):
        lines.append("    HU: " + ", ".join(f"{PHASE_WORDS[p]} {_hu(getattr(t.hu, p))}" for p in PHASE_WORDS))
    elif t.hu is not None:
        lines.append(f"    HU: {_hu(t.hu)}")
    if t.structures or t.labels:
        lines.append("    model labels: " + ", ".join([*t.structures, *map(str, t.labels)]))
    if t.smooth_mm:
        lines.append(f"    CT values smoothed first (Gaussian, sigma {_mm(t.smooth_mm)})")
    if t.inside:
        lines.append("    only " + _envelope("inside", t.inside))
    for n, step in enumerate(t.morphology, 1):
        lines.append(f"    {n}. {step.op}: {explain_step(step)}")
    if t.exclude:
        lines.append(f"    then without {', '.join(t.exclude)}")
    if t.outside:
        lines.append("    then never " + _envelope("inside", t.outside))
    if t.expect is not None:
        e = t.expect
        bits = []
        if e.volume_ml:
            bits.append(f"{e.volume_ml[0]:g}-{e.volume_ml[1]:g} mL{' each side' if e.paired else ''}")
        if e.paired:
            bits.append(f"left/right within {e.max_side_ratio:g}x")
        lines.append("    checked in every result: " + ", ".join(bits) + " (a warning when not)")
    return lines


def describe(profile: Profile) -> str:
    """The whole profile in words."""
    head = [f"{profile.name}: {profile.description}",
            f"  backend {profile.model_type}, phase {profile.phase}"
            + (f", working grid {_mm(profile.working_grid_mm)}" if profile.working_grid_mm else "")]
    if profile.refuse_without_backend:
        head.append(f"  without {profile.model_type}: refused ({profile.refuse_without_backend.strip()})")
    if profile.model:
        head.append("  model: " + ", ".join(f"{k}={v}" for k, v in profile.model.items()))
    if profile.model_type == "hu_based" and profile.body_mask.enabled:
        b = profile.body_mask
        head.append(f"  body: above {b.threshold_hu:g} HU, opened by {_mm(b.opening_mm)}, parts of at least "
                    f"{b.min_component_ml:g} mL, holes filled per slice (no table, no air around the patient)")
    out = head
    for t in profile.tissues:
        out.extend(describe_tissue(t))
    return "\n".join(out) + "\n"
