"""Quality floor of the HU profiles against a reference label map (real data).

The real 20-slice contrast-enhanced Siemens J2K series is segmented with the
``liver`` and ``bones`` profiles and compared, by Dice of the union of each
profile's tissue masks, with a TotalSegmentator label map of the same series
(``reference_seg_totalsegmentator.nii.gz``, label names in ``reference_labels.json``).
The bones profile is also checked on a second, non-contrast scan: the 30-slice
3 mm body CT ``ct-body-3mm-small`` with its own TotalSegmentator label map.

The reference is put on the Volume grid by composing affines, not by assuming an
axis order: Volume voxel (i, j, k) -> DICOM LPS (``Volume.affine``) -> RAS (flip x, y)
-> NIfTI voxel (inverse of the NIfTI affine), nearest neighbour.

Measured (2026-11): liver 0.964; bones 0.801 (precision 0.718, recall 0.905) on the
contrast series, 0.837 (precision 0.833, recall 0.840) on the non-contrast one.

Bones floor: the issue's 0.80.  Reached with two steps of the bones profile
(0.791 without them): ``slice_valleys`` removes the trabecular parts of the slices
through intervertebral discs (a part dimmer than the vertebral bodies above and below
it; on this series the disc slices' core medians are 0.58..0.67 of the bodies', the
cancellous bone's at least 0.75, and the Dice is 0.801 for any ratio from 0.68 to 0.74
and windows of 10 to 25 mm), and ``outside`` keeps the costal cartilage out of the
cortical envelope (otherwise it takes the disc rim the trabecular leaves).  On the
non-contrast scan neither changes anything.  What remains (see the figures printed
with ``pytest -s``):
* the reference is tight around bone and its boundary does not follow the HU edge:
  in the 1-voxel shell of the segmentation about 40 % of the voxels are in the
  reference whatever their HU relative to the local bone and soft-tissue values, so
  neither a global threshold nor a local half-maximum trim of the shell gains; even
  restricted to 3 mm around the reference, the best single HU threshold plus hole
  filling reaches only ~0.82;
* the endplate rings of the disc slices (3 mm slices at 2 mm spacing: partial volume
  150..300 HU), cortical here, only partly bone in the reference;
* aortic wall calcifications and contrast vessels attached to them (~3k voxels), and
  rib heads at the costovertebral joints that the reference leaves out;
* about a third of the costal cartilage's partial-volume rim (cartilage at 115..140 HU
  in fat) is below the global floor; the profile's ``edge_grow`` step (local
  half-maximum edge, :mod:`node.pipeline.hu.refine`) recovers it (0.786 -> 0.791).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

from node.pipeline.hu import morphology as M
from node.pipeline.box import bounding_box
from node.pipeline.hu import refine
from node.pipeline.hu.backend import HUBackend
from node.pipeline.series.load import load_series
from node.pipeline.volume import SeriesInfo, Volume
from node.errors import ProfileError
from node.profiles import EdgeGrow, load_profile, parse_profile
from node.tools.profile_quality import reference_on_grid

import nibabel as nib

DATA = Path(os.environ.get("NODE_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
CASE = DATA / "ct-abdomen-siemens-j2k"
DICOM_DIR = CASE / "dicom"
REFERENCE = CASE / "reference_seg_totalsegmentator.nii.gz"
LABELS = CASE / "reference_labels.json"

LIVER_FLOOR = 0.85
# The target; measured 0.801 on this series (see the module docstring)
BONES_TARGET = 0.80
BONES_FLOOR = 0.80
#: the non-contrast 3 mm body CT (measured 0.836; 0.704 before the phase-dependent cartilage floor)
BODY = DATA / "ct-body-3mm-small"
BODY_BONES_FLOOR = 0.82

#: reference structures that make up "bones" (names as in reference_labels.json)
BONE_PREFIXES = ("vertebrae_", "rib_", "humerus_", "scapula_", "clavicula_")
BONE_NAMES = ("sacrum", "sternum", "costal_cartilages")


def label_ids(names: dict[str, str], wanted) -> list[int]:
    return sorted(int(v) for v, n in names.items() if wanted(n))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@pytest.fixture(scope="module")
def case():
    if not (DICOM_DIR.exists() and REFERENCE.exists() and LABELS.exists()):
        pytest.skip(f"real series or reference labels missing under {CASE}")
    files = sorted(p for p in DICOM_DIR.iterdir() if p.is_file())
    volume = load_series(files)
    ref = reference_on_grid(volume, REFERENCE)
    names = json.loads(LABELS.read_text())
    return volume, ref, names


def _union(volume: Volume, profile_name: str) -> np.ndarray:
    profile = load_profile(profile_name)
    phase = profile.resolve_phase(volume.info.contrast_applied)
    masks = HUBackend().segment(volume, profile, phase=phase)
    out = np.zeros(volume.shape, dtype=bool)
    for m in masks.values():
        out |= m
    return out


def test_reference_is_mapped_onto_the_volume_grid(case):
    volume, ref, names = case
    # the NIfTI is i = column, j = row reversed, k = slice: the composed affine must say so
    img = nib.Nifti1Image.from_filename(str(REFERENCE))
    vox = np.linalg.inv(img.affine) @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    np.testing.assert_allclose(vox[:3, :3], np.diag([1.0, -1.0, 1.0]), atol=1e-3)
    # and bone labels sit on bright voxels
    bones = np.isin(ref, label_ids(names, lambda n: n.startswith("vertebrae_")))
    assert bones.sum() > 1000
    assert np.median(volume.array[bones]) > 150


def test_liver_dice(case):
    volume, ref, names = case
    reference = np.isin(ref, label_ids(names, lambda n: n == "liver"))
    d = dice(_union(volume, "liver"), reference)
    print(f"\nliver Dice {d:.3f} (floor {LIVER_FLOOR})")
    assert d >= LIVER_FLOOR, f"liver Dice {d:.3f} < {LIVER_FLOOR}"


def test_bones_dice(case):
    volume, ref, names = case
    ids = label_ids(names, lambda n: n.startswith(BONE_PREFIXES) or n in BONE_NAMES)
    # vertebrae incl. sacrum 25..50, humeri/scapulae/claviculae 69..74, ribs 92..115, sternum, cartilages
    assert ids == [*range(25, 51), *range(69, 75), *range(92, 118)]
    reference = np.isin(ref, ids)
    seg = _union(volume, "bones")
    tp = int((seg & reference).sum())
    d = dice(seg, reference)
    precision = tp / max(int(seg.sum()), 1)
    recall = tp / max(int(reference.sum()), 1)
    msg = (f"bones Dice {d:.4f} (precision {precision:.3f}, recall {recall:.3f}; "
           f"floor = issue target {BONES_TARGET})")
    print("\n" + msg)
    assert d >= BONES_FLOOR, msg


def nifti_volume(path: Path, contrast: bool) -> Volume:
    """A NIfTI CT as a Volume ([k, j, i] array, LPS affine), for scans that have no DICOM."""
    img = nib.Nifti1Image.from_filename(str(path))
    arr = np.rint(np.asarray(img.dataobj, dtype=np.float32)).astype(np.int16).transpose(2, 1, 0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    info = SeriesInfo("2.25.1", "2.25.2", None, "CT", contrast_applied=contrast)
    return Volume(np.ascontiguousarray(arr), affine, info, [])


def test_bones_dice_non_contrast_body_ct():
    """The bones profile on a second scan: non-contrast, 3 mm voxels, lumbar spine and lower ribs."""
    ct, seg, labels = BODY / "ct.nii.gz", BODY / "reference_seg_totalsegmentator.nii.gz", BODY / "reference_labels.json"
    if not (ct.exists() and seg.exists() and labels.exists()):
        pytest.skip(f"body CT or its reference missing under {BODY}")
    volume = nifti_volume(ct, contrast=False)
    names = json.loads(labels.read_text())
    ids = label_ids(names, lambda n: n.startswith(BONE_PREFIXES) or n in BONE_NAMES)
    reference = np.isin(reference_on_grid(volume, seg), ids)
    assert reference.sum() > 5000
    seg_mask = _union(volume, "bones")
    tp = int((seg_mask & reference).sum())
    d = dice(seg_mask, reference)
    msg = (f"bones Dice (non-contrast body CT) {d:.3f} (precision {tp / max(int(seg_mask.sum()), 1):.3f}, "
           f"recall {tp / int(reference.sum()):.3f}; floor {BODY_BONES_FLOOR})")
    print("\n" + msg)
    assert d >= BODY_BONES_FLOOR, msg


# --------------------------------------------------------------------------- the ops the bones profile uses
# (synthetic, always run)

SP = (1.0, 1.0, 2.0)  # (i, j, k) mm


def test_remove_thick_drops_blobs_keeps_thin_bars():
    m = np.zeros((12, 60, 60), dtype=bool)
    k, j, i = np.indices(m.shape)
    blob = ((i - 20) ** 2 + (j - 30) ** 2) <= 12**2  # 24 mm wide tube through every slice (cut by the scan)
    bar = (np.abs(j - 30) <= 2) & (i >= 40) & (i < 58)  # 5 mm thick bar
    m |= blob | bar
    out = M.remove_thick(m, 6, SP)
    core = ((i - 20) ** 2 + (j - 30) ** 2) <= 9**2
    assert out[blob].mean() < 0.2  # the tube goes (a ragged voxel rim may stay) ...
    assert not out[core].any()  # ... also on the first and last slice, which cut it
    assert out[bar & (i >= 45)].all()  # the bar stays (away from where it touches the tube)


def test_connected_to_keeps_touching_parts_without_the_margin():
    bone = np.zeros((6, 40, 40), dtype=bool)
    bone[:, 10:14, 5:15] = True
    soft = np.zeros_like(bone)
    soft[:, 10:14, 15:30] = True  # touches the bone
    soft[:, 30:34, 5:30] = True  # floats free
    out = M.connected_to(soft, bone, 1, SP)
    assert out[:, 10:14, 17:30].all()
    assert not out[:, 10:14, 15].any()  # within 1 mm of the bone: the bone's rim
    assert not out[:, 30:34].any()
    assert not out[bone].any()


def test_fill_holes_max_area_fills_small_holes_only():
    m = np.zeros((3, 60, 60), dtype=bool)
    m[:, 5:15, 5:15] = True
    m[:, 8:12, 8:12] = False  # 16 mm^2 hole
    m[:, 20:50, 20:50] = True
    m[:, 25:45, 25:45] = False  # 400 mm^2 hole
    out = M.fill_holes(m, "slice", 100, SP)
    assert out[:, 8:12, 8:12].all()
    assert not out[:, 25:45, 25:45].any()
    with pytest.raises(ValueError):
        M.fill_holes(m, "3d", 100, SP)


def _bones_dict(**extra_step):
    return {
        "name": "b", "description": "d", "model_type": "hu_based",
        "tissues": [
            {"name": "cortical", "description": "c", "color": [1, 2, 3], "hu": [300, 1500],
             "category": {"value": "1", "meaning": "x"}, "type": {"value": "2", "meaning": "y"}},
            {"name": "cartilage", "description": "c", "color": [1, 2, 3], "hu": [110, 300],
             "morphology": [extra_step],
             "category": {"value": "1", "meaning": "x"}, "type": {"value": "2", "meaning": "y"}},
        ],
    }


def test_schema_validates_the_new_steps():
    parse_profile(_bones_dict(op="connected_to", tissue="cortical", margin_mm=1), "t.yaml")
    parse_profile(_bones_dict(op="remove_thick", radius_mm=6), "t.yaml")
    parse_profile(_bones_dict(op="fill_holes", mode="slice", max_area_mm2=200), "t.yaml")
    with pytest.raises(ProfileError, match="not an earlier tissue"):
        parse_profile(_bones_dict(op="connected_to", tissue="cartilage"), "t.yaml")
    with pytest.raises(ProfileError, match="max_area_mm2 needs mode: slice"):
        parse_profile(_bones_dict(op="fill_holes", max_area_mm2=200), "t.yaml")
    with pytest.raises(ProfileError, match="radius_mm"):
        parse_profile(_bones_dict(op="remove_thick"), "t.yaml")


# --------------------------------------------------------------------------- edge_grow (local half-maximum edge)


def _bar_scene(surround: float, rim_above: float, rim_below: float) -> tuple[np.ndarray, np.ndarray]:
    """A 130 HU bar (rows 8..11) in ``surround`` HU, with one rim row of given HU above and below."""
    hu = np.full((3, 20, 30), surround, dtype=np.float32)
    hu[:, 8:12, 5:25] = 130
    hu[:, 7, 5:25] = rim_above
    hu[:, 12, 5:25] = rim_below
    mask = np.zeros(hu.shape, dtype=bool)
    mask[:, 8:12, 5:25] = True
    return hu, mask


def test_edge_grow_stops_at_the_half_maximum_in_fat():
    # bar 130 HU in fat -100 HU: the half-maximum is 15 HU
    hu, mask = _bar_scene(-100, rim_above=20, rim_below=0)
    out = refine.edge_grow(mask, hu, SP, max_mm=1, background_mm=2)
    assert out[:, 7, 6:24].all()  # 20 HU >= 15: the partial-volume rim joins
    assert not out[:, 12].any()  # 0 HU < 15 stays out
    assert not out[:, :, 25:].any() and not out[:, :, :5].any()  # fat at the bar's ends stays out
    assert (out & ~mask).sum() == out[:, 7].sum()
    # raw int16 HU gives the same answer as float HU
    assert np.array_equal(refine.edge_grow(mask, hu.astype(np.int16), SP, max_mm=1, background_mm=2), out)


def test_edge_grow_against_muscle_needs_a_higher_rim():
    # the same bar against muscle (50 HU): the half-maximum is 90 HU, so a 70 HU rim stays out
    hu, mask = _bar_scene(50, rim_above=70, rim_below=95)
    out = refine.edge_grow(mask, hu, SP, max_mm=1, background_mm=2)
    assert not out[:, 7].any()
    assert out[:, 12, 6:24].all()


def test_edge_grow_max_mm_level_and_allowed():
    hu, mask = _bar_scene(-100, rim_above=60, rim_below=-100)
    hu[:, 6, 5:25] = 40  # a second, fainter rim layer beyond the first
    one = refine.edge_grow(mask, hu, SP, max_mm=1, background_mm=2)
    two = refine.edge_grow(mask, hu, SP, max_mm=2, background_mm=2)
    assert one[:, 7, 6:24].all() and not one[:, 6].any()  # one 1 mm layer only
    assert two[:, 6, 6:24].all()  # the second layer: 40 >= (-100 + 60) / 2
    strict = refine.edge_grow(mask, hu, SP, max_mm=1, background_mm=2, level=0.9)
    assert not strict[:, 7].any()  # 60 < -100 + 0.9 * 230
    allowed = np.ones(hu.shape, dtype=bool)
    allowed[:, 7, 15:] = False
    part = refine.edge_grow(mask, hu, SP, max_mm=1, background_mm=2, allowed=allowed)
    assert part[:, 7, 6:15].all() and not part[:, 7, 15:].any()
    # pixels coarser than max_mm: no layer fits, nothing changes
    assert np.array_equal(refine.edge_grow(mask, hu, (3.0, 3.0, 3.0), max_mm=1), mask)


def test_edge_grow_slice_mode_stays_in_plane():
    hu = np.full((5, 20, 30), -100, dtype=np.float32)
    hu[2, 8:12, 5:25] = 130
    hu[1, 8:12, 5:25] = 20  # partial volume in the neighbouring slices
    hu[3, 8:12, 5:25] = 20
    mask = np.zeros(hu.shape, dtype=bool)
    mask[2, 8:12, 5:25] = True
    flat = refine.edge_grow(mask, hu, (1.0, 1.0, 1.0), max_mm=1, background_mm=2, mode="slice")
    assert not flat[1].any() and not flat[3].any()
    deep = refine.edge_grow(mask, hu, (1.0, 1.0, 1.0), max_mm=1, background_mm=2, mode="3d")
    assert deep[1, 9:11, 6:24].all() and deep[3, 9:11, 6:24].all()
    assert not deep[0].any() and not deep[4].any()
    # slices thicker than max_mm: 3D growth does not cross them
    thick = refine.edge_grow(mask, hu, (1.0, 1.0, 2.0), max_mm=1, background_mm=2, mode="3d")
    assert not thick[1].any() and not thick[3].any()


def test_edge_grow_at_the_array_faces_matches_an_edge_padded_array():
    # a bar touching the array's faces: its windows are replicated from the faces, exactly
    # as they would be read from a larger array that repeats the edge voxels
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 60, (4, 12, 16)).astype(np.float32)
    hu[:, 0:3, 0:10] += 200
    mask = np.zeros(hu.shape, dtype=bool)
    mask[:, 0:2, 0:8] = True
    small = refine.edge_grow(mask, hu, SP, max_mm=2, background_mm=3, mode="3d")
    pad = ((3, 3), (6, 6), (6, 6))
    big = refine.edge_grow(np.pad(mask, pad), np.pad(hu, pad, mode="edge"), SP, max_mm=2, background_mm=3, mode="3d")
    core = big[3:-3, 6:-6, 6:-6]
    # inside the original array both agree; the big array may also grow into its padding
    assert np.array_equal(core, small)
    assert (small & ~mask).any()


def test_edge_grow_rejects_bad_arguments():
    hu, mask = _bar_scene(-100, 20, 0)
    with pytest.raises(ValueError, match="mode"):
        refine.edge_grow(mask, hu, SP, max_mm=1, mode="2d")
    with pytest.raises(ValueError, match="level"):
        refine.edge_grow(mask, hu, SP, max_mm=1, level=1.0)
    with pytest.raises(ValueError, match="shape"):
        refine.edge_grow(mask, hu[:2], SP, max_mm=1)
    assert not refine.edge_grow(np.zeros_like(mask), hu, SP, max_mm=1).any()


def test_schema_validates_edge_grow():
    p = parse_profile(_bones_dict(op="edge_grow", max_mm=1, background_mm=2, avoid=["cortical"]), "t.yaml")
    step = p.tissues[1].morphology[0]
    assert isinstance(step, EdgeGrow) and (step.level, step.floor_hu, step.mode) == (0.5, -150, "slice")
    with pytest.raises(ProfileError, match=r"refers to 'cartilage', which is not an earlier tissue"):
        parse_profile(_bones_dict(op="edge_grow", max_mm=1, avoid=["cartilage"]), "t.yaml")
    with pytest.raises(ProfileError, match=r"morphology\[0\]\.level"):
        parse_profile(_bones_dict(op="edge_grow", max_mm=1, level=1.5), "t.yaml")
    with pytest.raises(ProfileError, match=r"morphology\[0\]\.max_mm: required field missing"):
        parse_profile(_bones_dict(op="edge_grow"), "t.yaml")
    with pytest.raises(ProfileError, match=r"morphology\[0\]\.mode: '2d' is not allowed"):
        parse_profile(_bones_dict(op="edge_grow", max_mm=1, mode="2d"), "t.yaml")
    with pytest.raises(ProfileError, match="did you mean 'edge_grow'"):
        parse_profile(_bones_dict(op="edge_grwo", max_mm=1), "t.yaml")


def test_hu_backend_runs_edge_grow_and_keeps_out_of_avoided_tissues():
    """A profile's edge_grow step reaches the rim in fat but not an earlier tissue listed in ``avoid``."""
    hu = np.full((4, 40, 40), -100, dtype=np.int16)  # fat
    hu[:, 16:20, 8:32] = 130  # a cartilage-like bar
    hu[:, 15, 8:32] = 40  # its partial-volume rim above (>= the 15 HU half-maximum)
    hu[:, 20:24, 8:32] = 400  # bone right against its lower side
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    volume = Volume(hu, affine, SeriesInfo("2.25.1", "2.25.2", None, "CT"), [])
    cat = {"value": "91723000", "meaning": "Anatomical Structure"}
    tissues: list[dict[str, Any]] = [
        {"name": "bone", "description": "b", "color": [1, 2, 3], "hu": [300, 1500], "category": cat,
         "type": {"value": "272673000", "meaning": "Bone"}},
        {"name": "bar", "description": "c", "color": [4, 5, 6], "hu": [110, 300], "category": cat,
         "type": {"value": "50016007", "meaning": "Costal cartilage"},
         "morphology": [{"op": "edge_grow", "max_mm": 1, "background_mm": 2, "avoid": ["bone"]}]},
    ]
    doc = {"name": "edge", "description": "t", "body_mask": {"enabled": False}, "tissues": tissues}
    masks = HUBackend().segment(volume, parse_profile(doc, "edge.yaml"), phase="non_contrast")
    bar = masks["bar"]
    assert bar[:, 16:20, 9:31].all()
    assert bar[:, 15, 9:31].all(), "the rim in fat joins"
    assert not (bar & masks["bone"]).any(), "never into the avoided tissue"
    # without ``avoid`` the same step takes the first bone row (400 HU is above the edge)
    del tissues[1]["morphology"][0]["avoid"]
    grown = HUBackend().segment(volume, parse_profile(doc, "edge.yaml"), phase="non_contrast")["bar"]
    assert grown[:, 20, 9:31].all() and not grown[:, 21].any()


# --------------------------------------------------------------------------- slice_valleys and outside (discs)


def _spine(values: Sequence[float], shape=(40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A stack of disk-shaped parts, one per slice, with the given HU (a vertebral column seen
    slice by slice: bright bodies, dim discs); the mask is the disks."""
    k = len(values)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disk = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < 12 ** 2
    hu = np.zeros((k, *shape), dtype=np.int16)
    mask = np.zeros((k, *shape), dtype=bool)
    for z, v in enumerate(values):
        hu[z][disk] = v
        mask[z] = disk
    return hu, mask


SPINE_SP = (1.0, 1.0, 2.0)  # (i, j, k) mm


def test_slice_valleys_removes_the_dim_layers_between_bright_bodies():
    body, disc = 180, 100
    values = [body] * 8 + [disc] * 3 + [body] * 8
    hu, mask = _spine(values)
    out = M.slice_valleys(mask, hu, SPINE_SP, 10, 0.7, 100, core_mm=3)
    removed = [z for z in range(len(values)) if mask[z].any() and not out[z].any()]
    assert removed == [8, 9, 10]
    assert np.array_equal(out[:8], mask[:8]) and np.array_equal(out[11:], mask[11:])
    # no valley: a uniform stack, a gentle slope, or dim parts with brighter parts on one side only
    for vals in ([body] * 19, list(np.linspace(100, 200, 19).astype(int)), [body] * 6 + [disc] * 13):
        hu, mask = _spine(vals)
        assert np.array_equal(M.slice_valleys(mask, hu, SPINE_SP, 10, 0.7, 100), mask), vals


def test_slice_valleys_at_the_scan_edge_small_parts_and_the_core():
    body, disc = 180, 100
    # the scan starts inside a disc: the side cut by the first slice is not known, the other decides
    hu, mask = _spine([disc] * 2 + [body] * 10)
    out = M.slice_valleys(mask, hu, SPINE_SP, 10, 0.7, 100)
    assert not out[:2].any() and np.array_equal(out[2:], mask[2:])
    # parts below min_area_mm2 are neither removed nor references
    hu, mask = _spine([body] * 8 + [disc] * 3 + [body] * 8)
    assert np.array_equal(M.slice_valleys(mask, hu, SPINE_SP, 10, 0.7, 10000), mask)
    # a bright rim around a dim disc: its core decides (core_mm), not the rim
    yy, xx = np.mgrid[:40, :40]
    rim = ((yy - 20) ** 2 + (xx - 20) ** 2 >= 7 ** 2) & ((yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2)
    for z in (8, 9, 10):
        hu[z][rim] = 400  # two thirds of the part
    with_core = M.slice_valleys(mask, hu, SPINE_SP, 10, 0.7, 100, core_mm=4)
    whole = M.slice_valleys(mask, hu, SPINE_SP, 10, 0.7, 100, core_mm=0)
    assert not with_core[8:11].any()
    assert whole[8:11][mask[8:11]].all()  # the rim lifts the median of the whole part


def _valleys_by_window_scan(mask, hu, spacing, window_mm, ratio, min_area_mm2, core_mm=0):
    """slice_valleys as first written: each part's window maxima read slice by slice from the
    medians map (the reference for the running maxima that replaced it)."""
    box = bounding_box(mask)
    if box is None:
        return mask.copy()
    full, mask, hu = mask, mask[box], hu[box]
    half = max(0, int(round(window_mm / spacing[2])))
    kernel = M._core_kernel(core_mm, spacing) if core_mm > 0 else None
    none = np.iinfo(np.int16).min
    nz = mask.shape[0]
    medmap = np.full(mask.shape, none, dtype=np.int16)
    found = [M._large_parts(mask[z], hu[z], spacing[0] * spacing[1], min_area_mm2, kernel) for z in range(nz)]
    for z, mine in enumerate(found):
        for crop, part, med in mine:
            view = medmap[z][crop]
            view[part] = np.maximum(view[part], np.int16(np.clip(med, -32767, 32767)))
    w = max(1, 2 * ((half - 1) // 2) + 1)
    out = mask.copy()

    def brightest(lo, hi, crop, part):
        lo, hi = max(lo, 0), min(hi, nz)
        return float(none) if hi <= lo else float(medmap[lo:hi, crop[0], crop[1]].max(axis=0)[part].max())

    for z, mine in enumerate(found):
        above_ok, below_ok = z - w >= 0, z + w < nz
        for crop, part, med in mine:
            above, below = brightest(z - w, z, crop, part), brightest(z + 1, z + w + 1, crop, part)
            top = min(above, below) if above_ok and below_ok else (
                (above if above_ok else below) if above_ok or below_ok else max(above, below))
            if top > 0 and med < ratio * top:
                out[z][crop][part] = False
    result = np.zeros(full.shape, dtype=bool)
    result[box] = out
    return result


@pytest.mark.parametrize("seed", range(4))
def test_slice_valleys_running_maxima_equal_the_window_scan(seed):
    """Random stacks of overlapping blobs of random HU (scan edges, parts that overlap several
    others, windows of 1..9 slices): the running maxima give what scanning each window gives."""
    rng = np.random.default_rng(seed)
    nz = int(rng.integers(6, 30))
    yy, xx = np.mgrid[:48, :48]
    mask = np.zeros((nz, 48, 48), dtype=bool)
    hu = np.zeros((nz, 48, 48), dtype=np.int16)
    for z in range(nz):
        for _ in range(int(rng.integers(0, 4))):
            cy, cx, r = rng.integers(8, 40), rng.integers(8, 40), rng.integers(3, 10)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            mask[z] |= blob
            hu[z][blob] = rng.integers(-50, 300)
    hu += rng.integers(-20, 20, hu.shape).astype(np.int16)
    for window_mm in (2, 6, 10, 18):
        for core_mm in (0, 2):
            got = M.slice_valleys(mask, hu, SPINE_SP, window_mm, 0.7, 20, core_mm=core_mm)
            ref = _valleys_by_window_scan(mask, hu, SPINE_SP, window_mm, 0.7, 20, core_mm=core_mm)
            assert np.array_equal(got, ref), (window_mm, core_mm)


def test_hu_backend_slice_valleys_without_and_outside():
    """In a profile: ``without`` leaves another tissue's voxels out of the parts (and keeps them);
    ``outside`` removes a tissue from an earlier tissue's filled envelope, made once."""
    body, disc = 180, 100
    hu, inner = _spine([body] * 8 + [disc] * 3 + [body] * 8)
    yy, xx = np.mgrid[:40, :40]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 >= 12 ** 2) & ((yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2)
    hu[:, ring] = 500  # the cortical shell around every slice
    hu[:, 2:4, 2:8] = 150  # a small "cartilage" piece outside the shell
    volume = Volume(hu, np.diag([1.0, 1.0, 2.0, 1.0]), SeriesInfo("2.25.1", "2.25.2", None, "CT"), [])
    cat = {"value": "91723000", "meaning": "Anatomical Structure"}
    ty = {"value": "272673000", "meaning": "Bone"}
    tissues = [
        {"name": "shell", "description": "s", "color": [1, 2, 3], "hu": [300, 1500], "category": cat, "type": ty},
        {"name": "inner", "description": "i", "color": [1, 2, 3], "hu": [90, 1500], "category": cat, "type": ty,
         "inside": {"tissue": "shell", "closing_mm": 2, "fill": "slice"},
         "morphology": [{"op": "slice_valleys", "window_mm": 10, "ratio": 0.7, "without": ["shell"]}],
         "exclude": ["shell"]},
        {"name": "soft", "description": "c", "color": [1, 2, 3], "hu": [90, 300], "category": cat, "type": ty,
         "exclude": ["shell", "inner"], "outside": {"tissue": "shell", "closing_mm": 2, "fill": "slice"}},
    ]
    doc = {"name": "spine", "description": "t", "body_mask": {"enabled": False}, "tissues": tissues}
    calls = []
    real = M.closing
    try:
        def counting_closing(*a, **k):
            calls.append(1)
            return real(*a, **k)

        M.closing = counting_closing
        masks = HUBackend().segment(volume, parse_profile(doc, "spine.yaml"), phase="non_contrast")
    finally:
        M.closing = real
    assert len(calls) == 1, "one envelope for inside and outside"
    assert masks["inner"][:8].sum() == masks["inner"][11:].sum() > 0
    assert not masks["inner"][8:11].any(), "the disc slices are not cancellous bone"
    assert masks["shell"][:, ring].all()
    soft = masks["soft"]
    assert soft[:, 2:4, 2:8].all(), "outside the envelope stays"
    assert not soft[8:11][inner[8:11]].any(), "the dropped disc is inside the envelope: not taken"
    # without `outside`, the next tissue takes the disc slices the valley step left
    del tissues[2]["outside"]
    taken = HUBackend().segment(volume, parse_profile(doc, "spine.yaml"), phase="non_contrast")["soft"]
    assert taken[8:11][inner[8:11]].all()


def test_schema_validates_slice_valleys_and_outside():
    parse_profile(_bones_dict(op="slice_valleys", window_mm=15, ratio=0.7, without=["cortical"]), "t.yaml")
    with pytest.raises(ProfileError, match="not an earlier tissue"):
        parse_profile(_bones_dict(op="slice_valleys", without=["cartilage"]), "t.yaml")
    with pytest.raises(ProfileError, match="ratio"):
        parse_profile(_bones_dict(op="slice_valleys", ratio=1.5), "t.yaml")
    doc = _bones_dict(op="median", radius_mm=1)
    doc["tissues"][1]["outside"] = {"tissue": "cortical", "closing_mm": 5}
    parse_profile(doc, "t.yaml")
    doc["tissues"][1]["outside"] = {"tissue": "nothing"}
    with pytest.raises(ProfileError, match="not an earlier tissue"):
        parse_profile(doc, "t.yaml")
