"""Millimetre morphology on anisotropic grids, body mask, HU backend on synthetic phantoms."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import pytest

from node.pipeline.hu import morphology as M
from node.pipeline.hu.backend import HUBackend
from node.pipeline.hu.body import body_mask
from node.pipeline.box import bounding_box
from node.pipeline.volume import SeriesInfo, Volume
from node.profiles import parse_profile


def _ball(shape, centre_kji, radius_mm, spacing):
    k, j, i = np.indices(shape)
    si, sj, sk = spacing
    d2 = ((i - centre_kji[2]) * si) ** 2 + ((j - centre_kji[1]) * sj) ** 2 + ((k - centre_kji[0]) * sk) ** 2
    return d2 <= radius_mm**2


def test_radius_is_in_millimetres_per_axis():
    assert M.radius_voxels(3.0, (0.5, 1.0, 3.0)) == [6, 3, 1]
    assert M.radius_voxels(2.0, (0.7, 0.7, 5.0)) == [2, 2, 0]  # thick slices: no reach across


def test_dilation_and_erosion_grow_by_the_radius_in_mm():
    sp = (0.5, 0.8, 2.0)
    shape = (40, 80, 120)
    ball = _ball(shape, (20, 40, 60), 10.0, sp)
    grown = M.dilation(ball, 4.0, sp)
    expected = _ball(shape, (20, 40, 60), 14.0, sp)
    agree = (grown == expected).mean()
    assert agree > 0.995
    shrunk = M.erosion(ball, 4.0, sp)
    assert (shrunk == _ball(shape, (20, 40, 60), 6.0, sp)).mean() > 0.995


def test_erosion_treats_outside_as_background():
    m = np.ones((10, 10, 10), bool)
    e = M.erosion(m, 1.0, (1, 1, 1))
    assert not e[0].any() and not e[:, :, -1].any() and e[5, 5, 5]


def test_closing_fills_gap_and_keeps_edges():
    sp = (1.0, 1.0, 1.0)
    m = np.zeros((20, 30, 30), bool)
    m[:, 5:14, 5:25] = True
    m[:, 16:25, 5:25] = True  # 2 mm gap between two slabs that touch the array edges in k
    c = M.closing(m, 2.0, sp)
    assert c[:, 14:16, 10:20].all(), "gap not closed"
    assert c[0, 10, 10] and c[-1, 10, 10], "closing ate the mask at the array edge"


def test_opening_removes_thin_bridge():
    sp = (1.0, 1.0, 1.0)
    m = _ball((30, 30, 60), (15, 15, 12), 8, sp) | _ball((30, 30, 60), (15, 15, 48), 8, sp)
    m[15, 15, 12:48] = True  # 1-voxel bridge
    assert M.keep_largest(m, 1).sum() == m.sum()
    o = M.opening(m, 2.0, sp)
    assert not o[15, 15, 30]
    assert M.keep_largest(o, 1).sum() < o.sum()


def test_fill_holes_3d_versus_slice():
    m = np.zeros((10, 20, 20), bool)
    m[:, 5:15, 5:15] = True
    m[:, 8:12, 8:12] = False  # a tube open at the top and bottom
    assert not M.fill_holes(m, "3d")[5, 10, 10]  # connected to the k faces in 3D
    assert M.fill_holes(m, "slice")[5, 10, 10]  # a hole in every slice
    closed = m.copy()
    closed[0] = True
    closed[-1] = True
    assert M.fill_holes(closed, "3d")[5, 10, 10]
    with pytest.raises(ValueError):
        M.fill_holes(m, "2d")


def test_keep_largest_and_remove_small():
    sp = (1.0, 1.0, 1.0)
    shape = (30, 30, 90)
    a = _ball(shape, (15, 15, 15), 10, sp)  # ~4.2 mL
    b = _ball(shape, (15, 15, 45), 6, sp)  # ~0.9 mL
    c = _ball(shape, (15, 15, 75), 3, sp)  # ~0.1 mL
    m = a | b | c
    assert (M.keep_largest(m, 1) == a).all()
    assert (M.keep_largest(m, 2) == (a | b)).all()
    assert (M.remove_small(m, 0.5, sp) == (a | b)).all()
    # c holds 123 voxels: 0.12 mL at 1 mm slices, 0.25 mL at 2 mm slices; voxel volume counts
    assert (M.remove_small(m, 0.2, sp) == (a | b)).all()
    assert (M.remove_small(m, 0.2, (1.0, 1.0, 2.0)) == m).all()


def _phantom(spacing=(0.8, 0.8, 2.0)):
    """Body ellipse with a bone ring and a liver-like blob, a CT table below, air around."""
    shape = (30, 200, 200)
    hu = np.full(shape, -1000, np.int16)
    k, j, i = np.indices(shape)
    body = ((i - 100) / 80.0) ** 2 + ((j - 95) / 60.0) ** 2 <= 1
    hu[body] = 30
    r = np.hypot((i - 100) * spacing[0], (j - 120) * spacing[1])
    hu[body & (r < 12) & (r >= 8)] = 900  # cortical ring
    hu[body & (r < 8)] = 200  # marrow
    organ = (((i - 70) / 25.0) ** 2 + ((j - 80) / 20.0) ** 2 <= 1) & (k > 3) & (k < 26)
    hu[organ] = 80
    hu[:, 170:174, 20:180] = 600  # dense table, separate from the body
    vol = Volume(
        hu,
        np.diag([spacing[0], spacing[1], spacing[2], 1.0]),
        SeriesInfo("1.2.3", "1.2", "1.2.3.4", "CT"),
        frames=[],
    )
    return vol, body, organ


def test_body_mask_drops_table_and_keeps_interior():
    vol, body, _ = _phantom()
    b = body_mask(vol.array, vol.spacing)
    assert not b[:, 170:174, :].any(), "table in body mask"
    assert (b == body).mean() > 0.99
    box = bounding_box(b, margin=1)
    assert box is not None
    assert box[1].stop < 170


def test_hu_backend_thresholds_inside_body_only():
    vol, body, organ = _phantom()
    profile = parse_profile(
        {
            "name": "phantom",
            "description": "test",
            "tissues": [
                {"name": "bone", "description": "b", "color": [255, 255, 255], "hu": [300, 1500],
                 "category": {"value": "91723000", "meaning": "Anatomical Structure"},
                 "type": {"value": "272673000", "meaning": "Bone"}},
                {"name": "marrow", "description": "m", "color": [200, 100, 100], "hu": [100, 400],
                 "inside": {"tissue": "bone", "fill": "slice"}, "exclude": ["bone"],
                 "category": {"value": "91723000", "meaning": "Anatomical Structure"},
                 "type": {"value": "14016003", "meaning": "Bone marrow"}},
                {"name": "organ", "description": "o", "color": [200, 100, 50],
                 "hu": {"non_contrast": [60, 100], "contrast": [70, 90]},
                 "morphology": [{"op": "opening", "radius_mm": 2}, {"op": "keep_largest", "n": 1}],
                 "category": {"value": "91723000", "meaning": "Anatomical Structure"},
                 "type": {"value": "10200004", "meaning": "Liver"}},
            ],
        },
        "phantom.yaml",
    )
    streamed: list[tuple[str, np.ndarray]] = []
    masks = HUBackend().segment(vol, profile, phase="non_contrast", on_mask=lambda n, m: streamed.append((n, m)))
    # each tissue is handed on as soon as it is final, in profile order, as returned
    assert [n for n, _ in streamed] == ["bone", "marrow", "organ"]
    assert all(m is masks[n] for n, m in streamed)
    assert not masks["bone"][:, 170:174, :].any(), "the table became bone"
    assert masks["bone"].sum() > 0
    assert (masks["bone"] & masks["marrow"]).sum() == 0
    assert masks["marrow"].sum() == (vol.array == 200).sum()
    inter = (masks["organ"] & organ).sum()
    assert 2 * inter / (masks["organ"].sum() + organ.sum()) > 0.97


def _fill_reference(mask, mode, max_area_mm2=None, spacing=None):
    """Straightforward ndimage definition of fill_holes (whole array, no cropping)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1)
    if mode == "slice":
        structure[0] = False
        structure[2] = False
    labels, _ = ndimage.label(~mask, structure=structure)
    border = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    if mode == "3d":
        border += [labels[0], labels[-1]]
    hole = np.ones(labels.max() + 1, dtype=bool)
    hole[np.concatenate([b.ravel() for b in border])] = False
    hole[0] = False
    if max_area_mm2 is not None:
        area = np.bincount(labels.ravel(), minlength=len(hole)) * spacing[0] * spacing[1]
        hole &= area <= max_area_mm2
    return mask | hole[labels]


def _itk_dilate(mask, radius_mm, spacing):
    """ITK's ball dilation of the whole array: the reference for the OpenCV slice stack."""
    f = sitk.BinaryDilateImageFilter()
    f.SetKernelType(sitk.sitkBall)
    f.SetKernelRadius(M.radius_voxels(radius_mm, spacing))
    f.SetForegroundValue(1)
    f.SetBackgroundValue(0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask).view(np.uint8))
    return sitk.GetArrayFromImage(f.Execute(img)).astype(bool)


@pytest.mark.parametrize("seed", range(6))
def test_cropped_and_itk_ops_match_whole_array_definitions(seed):
    """Box cropping, slab threads, OpenCV slice stacks and ITK labelling give the whole-array (ITK) results exactly."""
    rng = np.random.default_rng(seed)
    shape = (70, 40, 45)
    m = np.zeros(shape, dtype=bool)
    # blobs somewhere inside (and sometimes touching the array edge)
    k0, j0, i0 = rng.integers(0, 20, 3)
    m[k0 : k0 + 45, j0 : j0 + 22, i0 : i0 + 25] = rng.random((45, 22, 25)) > 0.45
    sp = (0.7, 0.6, 0.9)
    old_min = M.MIN_SLAB_SLICES
    M.MIN_SLAB_SLICES = 8  # force slab threads on this small array
    try:
        # thin slices (ball across 1..5 slices each way) and thick ones (rk = 0: in-plane only)
        for r, spc in [(r, sp) for r in (1.0, 2.0, 3.0, 5.0)] + [(3.0, (0.7, 0.6, 4.0))]:
            full_d = _itk_dilate(m, r, spc)
            assert np.array_equal(M.dilation(m, r, spc), full_d)
            pad = [(x, x) for x in reversed(M.radius_voxels(r, spc))]
            sl = tuple(slice(p[0], p[0] + n) for p, n in zip(pad, shape))
            ref_e = ~_itk_dilate(~np.pad(m, pad), r, spc)[sl]
            assert np.array_equal(M.erosion(m, r, spc), ref_e)
            padded = np.pad(m, pad)
            ref_c = ~_itk_dilate(~np.pad(_itk_dilate(padded, r, spc), pad), r, spc)
            ref_c = ref_c[tuple(slice(2 * p[0], 2 * p[0] + n) for p, n in zip(pad, shape))]
            assert np.array_equal(M.closing(m, r, spc), ref_c)
        for r in (1.0, 1.5, 2.0):  # numpy box counts == ITK's binary median, edges included
            f = sitk.BinaryMedianImageFilter()
            f.SetRadius(M.radius_voxels(r, sp))
            ref_med = sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(m.astype(np.uint8)))).astype(bool)
            assert np.array_equal(M.median(m, r, sp), ref_med)
    finally:
        M.MIN_SLAB_SLICES = old_min
    for mode in ("slice", "3d"):
        assert np.array_equal(M.fill_holes(m, mode), _fill_reference(m, mode))
    assert np.array_equal(M.fill_holes(m, "slice", 2.0, sp), _fill_reference(m, "slice", 2.0, sp))
    other = np.zeros(shape, dtype=bool)
    other[k0 + 10, j0 + 5 : j0 + 9, i0 : i0 + 25] = True
    got = M.connected_to(m, other, 1.0, sp)
    from scipy import ndimage

    seed_m = M.dilation(other, 1.0, sp)
    labels, _ = ndimage.label(m | seed_m)
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[np.unique(labels[seed_m])] = True
    keep[0] = False
    assert np.array_equal(got, keep[labels] & m & ~seed_m)


def test_ball_footprint_is_itks_ball():
    for radius in ([1, 1, 1], [2, 1, 1], [1, 2, 0], [3, 2, 2], [7, 8, 6]):
        n = [2 * r + 3 for r in radius[::-1]]
        point = np.zeros(n, dtype=bool)
        point[tuple(x // 2 for x in n)] = True
        f = sitk.BinaryDilateImageFilter()
        f.SetKernelType(sitk.sitkBall)
        f.SetKernelRadius(radius)
        f.SetForegroundValue(1)
        itk_ball = sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(point.view(np.uint8)))).astype(bool)
        ours = np.zeros(n, dtype=bool)
        ours[1:-1, 1:-1, 1:-1] = M.ball_footprint(radius)
        assert np.array_equal(itk_ball, ours), radius


@pytest.mark.parametrize("seed", range(4))
def test_remove_small_matches_labelling_definition(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    m = rng.random((30, 40, 35)) > 0.7
    sp = (0.8, 0.7, 1.2)
    for min_ml in (0.0005, 0.002, 0.01):
        labels, _ = ndimage.label(m, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel())
        min_vox = int(np.ceil(min_ml / (0.8 * 0.7 * 1.2 / 1000.0)))
        keep = sizes >= min_vox
        keep[0] = False
        assert np.array_equal(M.remove_small(m, min_ml, sp), keep[labels])


def test_connected_to_counts_seed_just_outside_the_mask_box():
    # the mask's bounding box ends one voxel before the seed: a face contact across
    # the box edge still connects it; a diagonal one does not (6-connectivity)
    m = np.zeros((10, 10, 10), dtype=bool)
    m[2:5, 2:5, 2:5] = True
    m[7, 7, 2] = True
    other = np.zeros_like(m)
    other[2, 2, 5] = True  # face neighbour of m[2, 2, 4]
    other[8, 8, 2] = True  # only an edge neighbour of m[7, 7, 2]
    got = M.connected_to(m, other, 0.0, (1.0, 1.0, 1.0))
    assert got[2:5, 2:5, 2:5].all()
    assert not got[7, 7, 2]


@pytest.mark.parametrize("shape, sigma", [
    ((150, 60, 70), (1.3, 1.7, 1.4)),
    ((150, 60, 70), (2.5, 1.0, 1.0)),
    ((9, 40, 70000), (1.5, 1.0, 0.8)),  # more pixels per slice than one column block of the k pass
    ((1, 30, 30), (0.6, 1.2, 1.2)),     # one slice: the k pass reflects onto itself
    ((4, 6, 50), (2.0, 2.0, 2.0)),      # smaller than the kernel: scipy
])
def test_gaussian_matches_scipy(shape, sigma):
    """The OpenCV float32 gaussian gives scipy's gaussian_filter (same kernel, reflecting edges)
    to float32 rounding, on int16 CT values."""
    from scipy import ndimage

    from node.pipeline.hu.backend import _gaussian

    a = np.random.default_rng(0).integers(-1000, 1500, shape).astype(np.int16)
    got = _gaussian(a, sigma)
    assert got.dtype == np.float32 and got.shape == a.shape
    ref = ndimage.gaussian_filter(a.astype(np.float64), sigma)
    assert np.abs(got - ref).max() < 2e-3  # HU; values span 2500 HU


@pytest.mark.parametrize("steps", [(1, 1, 1), (2, 3, 2), (3, 1, 4)])
def test_upsample_nearest_is_the_index_map(steps):
    """Block upsampling (body mask, remove_thick) == indexing each voxel's coarse cell, edges cropped."""
    rng = np.random.default_rng(sum(steps))
    shape = (17, 22, 25)  # not a multiple of the steps
    small = rng.random(tuple(-(-n // f) for n, f in zip(shape, steps))) > 0.5
    idx = np.ix_(*(np.arange(n) // f for n, f in zip(shape, steps)))
    assert np.array_equal(M.upsample_nearest(small, steps, shape), small[idx])


def test_hu_backend_runs_independent_leading_steps_of_later_tissues_in_background(monkeypatch):
    """A later tissue's threshold and leading steps that read no other tissue run in the
    background thread while earlier tissues are segmented; the masks are the same."""
    import threading

    from node.pipeline.hu import backend as backend_hu

    vol, _, organ = _phantom()
    concept = {"category": {"value": "91723000", "meaning": "Anatomical Structure"},
               "type": {"value": "272673000", "meaning": "Bone"}}
    profile = parse_profile(
        {
            "name": "phantom",
            "description": "test",
            "tissues": [
                {"name": "bone", "description": "b", "color": [255, 255, 255], "hu": [300, 1500], **concept},
                {"name": "organ", "description": "o", "color": [200, 100, 50], "hu": [60, 100], "smooth_mm": 1,
                 "morphology": [{"op": "opening", "radius_mm": 2}, {"op": "keep_largest", "n": 1}], **concept},
                {"name": "dense", "description": "d", "color": [200, 200, 50], "hu": [150, 1500],
                 "morphology": [{"op": "remove_small", "min_ml": 0.01},
                                {"op": "connected_to", "tissue": "bone", "margin_mm": 1},
                                {"op": "median", "radius_mm": 1}], **concept},
            ],
        },
        "phantom.yaml",
    )
    calls: list[tuple[str, str]] = []
    real_apply = backend_hu.apply_step

    def spy(step, *a, **k):
        calls.append((step.op, threading.current_thread().name))
        return real_apply(step, *a, **k)

    monkeypatch.setattr(backend_hu, "apply_step", spy)
    masks = HUBackend().segment(vol, profile, phase="non_contrast")
    where = {op: name for op, name in calls}
    # leading, independent steps of the later tissues: background; the rest: the caller's thread
    for op in ("opening", "keep_largest", "remove_small"):
        assert where[op].startswith("hu-smooth"), (op, where[op])
    for op in ("connected_to", "median"):
        assert where[op] == threading.current_thread().name, (op, where[op])
    assert masks["organ"].sum() > 0.9 * organ.sum() and masks["dense"].any()

    # the same masks when every step runs in order on the caller's thread
    monkeypatch.setattr(HUBackend, "_independent_steps", classmethod(lambda cls, tissue: 0))
    calls.clear()
    sequential = HUBackend().segment(vol, profile, phase="non_contrast")
    assert all(name == threading.current_thread().name for _, name in calls)
    for name in masks:
        assert np.array_equal(masks[name], sequential[name]), name
