"""The anatomy steps (node/pipeline/hu/anatomy.py) on synthetic scenes, and the lungs profile on a
synthetic thorax: trachea and main bronchi apart, no bowel gas, any array orientation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from thorax_phantom import thorax

from node.errors import ProfileError
from node.pipeline.hu import anatomy, morphology
from node.pipeline.hu.backend import HUBackend
from node.pipeline.stages.quality import split_sides
from node.pipeline.volume import Volume
from node.profiles import load_profile, parse_profile


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _ctx(hu: np.ndarray, spacing=(1.5, 1.5, 3.0), origin=(-180.0, -130.0, 0.0)) -> anatomy.Context:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return anatomy.Context(hu, np.ones(hu.shape, dtype=bool), spacing, affine)


def _scene(shape=(40, 173, 240), spacing=(1.5, 1.5, 3.0)):
    """An abdomen in LPS: a spine on the midline behind, blobs around it; returns (hu, x, y, z)."""
    nz, ny, nx = shape
    z = (np.arange(nz) * spacing[2])[:, None, None]
    y = (np.arange(ny) * spacing[1] - 130)[None, :, None]
    x = (np.arange(nx) * spacing[0] - 180)[None, None, :]
    hu = np.full(shape, -100.0)  # fat
    hu[np.broadcast_to((x ** 2 + (y - 70) ** 2) <= 18 ** 2, shape)] = 500  # spine
    return hu, x, y, z


def test_split_parts_cuts_narrow_necks_only():
    hu, x, y, z = _scene()
    a = ((x + 60) ** 2 + y ** 2 + (z - 60) ** 2) <= 25 ** 2
    b = ((x - 60) ** 2 + y ** 2 + (z - 60) ** 2) <= 25 ** 2
    bridge = (np.abs(y) <= 4) & (np.abs(z - 60) <= 4) & (np.abs(x) <= 60)  # 8 mm thick
    mask = np.broadcast_to(a | b | bridge, hu.shape).copy()
    lab, _ = anatomy.split_parts(mask, (1.5, 1.5, 3.0), 6)  # necks under 12 mm are cut
    parts = [p for p in np.unique(lab) if p]
    assert len(parts) == 2
    assert len(np.unique(lab[a & mask])) == 1 and len(np.unique(lab[b & mask])) == 1
    assert not lab[bridge & (np.abs(x) < 20)].any()  # the bridge's middle belongs to no part
    lab, _ = anatomy.split_parts(mask, (1.5, 1.5, 3.0), 3)  # necks under 6 mm: the 8 mm bridge holds
    assert len([p for p in np.unique(lab) if p]) == 1


def test_split_parts_keeps_an_organ_thicker_than_the_series():
    """A 24 mm slab (8 slices of 3 mm) through a big organ: the scan's edges do not open it away."""
    hu, x, y, _ = _scene(shape=(8, 173, 240))
    organ = np.broadcast_to(((x - 60) ** 2 + y ** 2) <= 70 ** 2, hu.shape).copy()
    lab, n = anatomy.split_parts(organ, (1.5, 1.5, 3.0), 20)
    assert n == 1 and (lab[organ] > 0).mean() > 0.99


def test_select_keeps_paired_organs_beside_the_spine():
    hu, x, y, z = _scene()
    kid_l = ((x - 65) / 28) ** 2 + ((y - 60) / 22) ** 2 + ((z - 60) / 45) ** 2 <= 1  # patient left (+x)
    kid_r = ((x + 65) / 28) ** 2 + ((y - 60) / 22) ** 2 + ((z - 60) / 45) ** 2 <= 1
    spleen = ((x - 130) / 25) ** 2 + ((y - 30) / 40) ** 2 + ((z - 60) / 40) ** 2 <= 1  # too far out
    bowel = ((x + 20) / 30) ** 2 + ((y + 70) / 25) ** 2 + ((z - 60) / 30) ** 2 <= 1  # in front
    muscle = ((x - 45) / 15) ** 2 + ((y - 105) / 10) ** 2 <= 1  # behind the spine, a long column
    mask = np.broadcast_to(kid_l | kid_r | spleen | bowel, hu.shape) | np.broadcast_to(muscle, hu.shape)
    ctx = _ctx(hu)
    out = anatomy.select(mask, ctx, split_mm=6, side="both", n=1, lateral_mm=(35, 90), anterior_mm=(-25, 60),
                         min_ml=10, max_ml=400)
    assert dice(out, np.broadcast_to(kid_l | kid_r, hu.shape)) > 0.97
    right = anatomy.select(mask, ctx, split_mm=6, side="right", n=1, lateral_mm=(35, 90))
    assert right[np.broadcast_to(kid_r, hu.shape)].all() and not right[np.broadcast_to(kid_l, hu.shape)].any()


def test_select_cuts_oversized_parts_again():
    """A kidney merged with a big neighbour through a neck wider than the first split: parts
    larger than max_ml are cut again at wider necks."""
    hu, x, y, z = _scene()
    kid = ((x - 65) / 28) ** 2 + ((y - 60) / 22) ** 2 + ((z - 60) / 45) ** 2 <= 1
    liver = ((x - 90) / 60) ** 2 + ((y + 30) / 60) ** 2 + ((z - 60) / 60) ** 2 <= 1
    neck = (np.abs(x - 75) <= 9) & (np.abs(y - 15) <= 25) & (np.abs(z - 60) <= 9)  # 18 mm thick
    mask = np.broadcast_to(kid | liver | neck, hu.shape).copy()
    ctx = _ctx(hu)
    once = anatomy.select(mask, ctx, split_mm=6, side="left", lateral_mm=(35, 90), max_ml=400)
    assert not once.any()  # one 1 L+ part: no kidney
    again = anatomy.select(mask, ctx, split_mm=6, side="left", lateral_mm=(35, 90), max_ml=400, max_split_mm=15)
    assert dice(again, np.broadcast_to(kid, hu.shape)) > 0.9


def test_adapt_hu_follows_the_organs_own_density():
    """The same organ 15 HU brighter or darker (another scanner, kV, patient) is found the same,
    and a neighbour 20 HU below it is cut off along their broad contact (the liver profile's
    chain: seed, own range, median, split)."""
    rng = np.random.default_rng(0)
    hu0, x, y, z = _scene()
    organ = np.broadcast_to(((x + 60) / 60) ** 2 + (y / 60) ** 2 + ((z - 60) / 50) ** 2 <= 1, hu0.shape)
    neighbour = np.broadcast_to(((x - 45) / 45) ** 2 + (y / 45) ** 2 + ((z - 60) / 40) ** 2 <= 1, hu0.shape) & ~organ
    for shift in (-15, 0, 15):
        hu = hu0.copy()
        hu[organ] = 50 + shift
        hu[neighbour] = 30 + shift
        hu += rng.normal(0, 4, hu.shape)
        ctx = _ctx(hu)
        broad = (hu > -30) & (hu < 200) & (hu < 400)
        seed = anatomy.select(broad, ctx, split_mm=20, side="right")
        out = anatomy.adapt_hu(seed, hu, ctx, core_mm=10, sd=2, grow_mm=20)
        out = anatomy.select(morphology.median(out, 1.5, ctx.spacing), ctx, split_mm=5, side="right")
        assert dice(out, organ) > 0.95, shift
        assert (out & neighbour).sum() < 0.05 * neighbour.sum(), shift


def test_drop_gas_keeps_lung_drops_bowel_gas():
    rng = np.random.default_rng(1)
    hu, x, y, z = _scene()
    lung = np.broadcast_to(((x - 70) / 50) ** 2 + (y / 60) ** 2 <= 1, hu.shape) & (np.broadcast_to(z, hu.shape) > 40)
    gas = np.broadcast_to(((x + 70) / 30) ** 2 + (y / 30) ** 2 + ((z - 50) / 30) ** 2 <= 1, hu.shape)
    for lung_hu in (-850, -930):  # normal and emphysematous lung
        h = hu.copy()
        h[lung] = lung_hu
        h[gas] = -1000
        h += rng.normal(0, 15, h.shape)
        out = anatomy.drop_gas((h < -400), _ctx(h))
        assert out[lung].mean() > 0.99 and not out[gas].any(), lung_hu


def _lungs(volume: Volume) -> dict[str, np.ndarray]:
    return HUBackend().segment(volume, load_profile("lungs"), phase="non_contrast")


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 3.0), (1.0, 1.0, 2.0)])
def test_lungs_profile_separates_airways_and_leaves_out_bowel_gas(spacing):
    volume, truth = thorax(spacing)
    m = _lungs(volume)
    lungs = truth["lung_left"] | truth["lung_right"]
    assert dice(m["lungs"], lungs) > 0.97
    assert dice(m["airways"], truth["airways"]) > 0.85
    assert not (m["lungs"] & truth["gas"]).any() and not (m["airways"] & truth["gas"]).any()
    assert not (m["lungs"] & m["airways"]).any()
    assert m["lungs"][truth["airways"]].mean() < 0.1, "the trachea and main bronchi are not lung"
    sides = split_sides(m["lungs"], volume.affine, volume.voxel_volume_ml)
    left, right = (float(truth[n].sum()) * volume.voxel_volume_ml for n in ("lung_left", "lung_right"))
    assert sides["left"] == pytest.approx(left, rel=0.05) and sides["right"] == pytest.approx(right, rel=0.05)


def test_lungs_profile_in_any_array_orientation():
    """Slices stored feet-first and columns running to the patient's right: the same result."""
    volume, truth = thorax()
    flipped = volume.array[::-1, :, ::-1].copy()
    affine = volume.affine.copy()
    n = np.array(volume.shape)
    affine[:3, 3] = volume.affine[:3, :3] @ [n[2] - 1, 0, n[0] - 1] + volume.affine[:3, 3]
    affine[:3, 0] *= -1
    affine[:3, 2] *= -1
    m = _lungs(Volume(flipped, affine, volume.info, []))
    lungs = (truth["lung_left"] | truth["lung_right"])[::-1, :, ::-1]
    assert dice(m["lungs"], lungs) > 0.97
    assert dice(m["airways"], truth["airways"][::-1, :, ::-1]) > 0.85
    sides = split_sides(m["lungs"], affine, volume.voxel_volume_ml)
    assert sides["left"] == pytest.approx(float(truth["lung_left"].sum()) * volume.voxel_volume_ml, rel=0.05)


def test_no_trachea_in_a_scan_that_starts_below_the_carina():
    volume, truth = thorax()
    low = int(190 / 3.0)  # slices up to 190 mm: below the carina (220 mm), bronchi inside the lungs
    cut = Volume(volume.array[:low].copy(), volume.affine, volume.info, [])
    m = _lungs(cut)
    lungs = (truth["lung_left"] | truth["lung_right"])[:low]
    assert m["airways"].sum() * volume.voxel_volume_ml < 5
    assert dice(m["lungs"], lungs) > 0.97


def test_schema_of_the_anatomy_steps():
    base: dict[str, Any] = {"name": "a", "description": "d", "tissues": [
        {"name": "liver", "description": "l", "color": [1, 2, 3], "hu": [-30, 100], "output": False,
         "category": {"value": "1", "meaning": "x"}, "type": {"value": "2", "meaning": "y"}},
        {"name": "kid", "description": "k", "color": [1, 2, 3], "hu": [-30, 80],
         "morphology": [{"op": "subtract", "tissues": ["liver"]},
                        {"op": "select", "split_mm": 6, "side": "both", "lateral_mm": [35, 90]},
                        {"op": "adapt_hu", "core_mm": 10, "sd": 2}, {"op": "drop_gas"}, {"op": "trachea"}],
         "expect": {"volume_ml": [80, 300], "paired": True},
         "category": {"value": "1", "meaning": "x"}, "type": {"value": "2", "meaning": "y"}},
    ]}
    p = parse_profile(base, "a.yaml")
    assert [t.name for t in p.result_tissues] == ["kid"]
    bad = {**base, "tissues": [dict(base["tissues"][1], morphology=[{"op": "subtract", "tissues": ["nope"]}])]}
    with pytest.raises(ProfileError, match="not an earlier tissue"):
        parse_profile(bad, "a.yaml")
    bad = {**base, "tissues": [dict(base["tissues"][1], morphology=[{"op": "select", "side": "up"}])]}
    with pytest.raises(ProfileError, match="side: 'up' is not allowed"):
        parse_profile(bad, "a.yaml")
    bad = {**base, "tissues": [dict(base["tissues"][0])]}
    with pytest.raises(ProfileError, match="at least one tissue must be an output"):
        parse_profile(bad, "a.yaml")
    bad = {**base, "tissues": [dict(base["tissues"][1], morphology=[], expect={"volume_ml": [300, 80]})]}
    with pytest.raises(ProfileError, match="volume range"):
        parse_profile(bad, "a.yaml")


def test_body_mask_keeps_the_inside_of_the_first_and_last_slice():
    """On the coarse body grid (sub-2 mm pixels) the lungs in the first and last slices stay in
    the body: the body goes on beyond the series, the edge slices are not its surface."""
    from node.pipeline.hu.body import body_mask

    volume, truth = thorax((1.0, 1.0, 2.0))
    body = body_mask(volume.array, volume.spacing)
    lungs = truth["lung_left"] | truth["lung_right"]
    for k in (0, -1):
        assert body[k][lungs[k]].all()


def test_anatomy_steps_on_an_empty_mask():
    hu = np.zeros((0, 0, 0), dtype=np.int16)
    ctx = _ctx(hu)
    empty = np.zeros(hu.shape, dtype=bool)
    assert not anatomy.select(empty, ctx, split_mm=6, side="both").any()
    assert not anatomy.drop_gas(empty, ctx).any()
    assert not anatomy.adapt_hu(empty, hu, ctx, core_mm=10, sd=2).any()
    assert not anatomy.trachea(empty, ctx).any()
    hu = np.zeros((4, 10, 10), dtype=np.int16)
    ctx = _ctx(hu)
    assert not anatomy.select(np.zeros(hu.shape, dtype=bool), ctx, split_mm=6, side="both").any()
