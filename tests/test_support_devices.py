"""Patient support devices are not body (issue 16, part 2): a real CT volume with a table top,
a U-shaped holder following the skin and an ECG lead added synthetically, the table and the
holder touching the skin through a cushion as dense as soft tissue; the brain and bones
profiles must leave every device voxel out and segment the patient as without the devices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.pipeline.backends import get_backend
from node.pipeline.series.load import load_series
from node.pipeline.stages.segment import segment
from node.pipeline.volume import Volume
from node.profiles import load_profile
from node.tools.synth_series import write_series

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
BODY = DATA / "ct-body-3mm" / "ct.nii.gz"

pytestmark = pytest.mark.skipif(not BODY.exists(), reason=f"test data not found under {DATA}")

CUSHION_HU, DEVICE_HU, LEAD_HU = -60.0, 450.0, 1500.0


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r: r + 1, -r: r + 1]
    return x * x + y * y <= r * r


def add_devices(hu: np.ndarray, cushion: int = 2, shell: int = 2) -> np.ndarray:
    """Add, slice by slice (``[slice, row, column]``, rows toward posterior): a cushion
    ``cushion`` voxels thick along the skin of the back half (back and both sides), a holder
    shell ``shell`` voxels thick outside it (a U following the skin contour), a flat table top
    under it and a one-voxel ECG lead lying on the skin in front.  Returns the mask of the dense
    devices."""
    dev = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        body = ndimage.binary_fill_holes(hu[k] > -400)
        lab, n = ndimage.label(body)
        if n == 0:
            continue
        body = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
        rows = np.flatnonzero(body.any(1))
        top, bottom = int(rows[0]), int(rows[-1])
        back = np.zeros(body.shape, bool)
        back[(top + bottom) // 2:, :] = True
        inner = ndimage.binary_dilation(body, _disk(cushion))
        outer = ndimage.binary_dilation(body, _disk(cushion + shell))
        hu[k][(inner & ~body) & back] = CUSHION_HU
        holder = outer & ~inner & back
        t0 = int(np.flatnonzero(outer.any(1))[-1]) + 1
        holder[t0: t0 + 2, :] = True  # table top, full width
        hu[k][holder] = DEVICE_HU
        dev[k] |= holder
        c = int(np.flatnonzero(body[top])[0])  # ECG lead on the skin in front
        hu[k, max(0, top - 1), c: c + 3] = LEAD_HU
        dev[k, max(0, top - 1), c: c + 3] = True
    return dev


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(BODY)))
    arr = np.asarray(img.dataobj, dtype=np.float32)[:, :, 40:80]  # chest: ribs, spine, scapulae
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ [0, 0, 40] + img.affine[:3, 3]
    files = write_series(arr, tmp_path_factory.mktemp("body"), affine=aff)
    return load_series(files, decode_workers=1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("profile", ["brain", "bones"])
def test_devices_are_not_body(volume: Volume, profile: str) -> None:
    prof = load_profile(profile)
    if prof.body_mask.dense_hu is None:  # bones: off by default (tests/test_hu_quality.py's pelvis)
        prof = prof.model_copy(update={"body_mask": prof.body_mask.model_copy(update={"dense_hu": 120.0})})
    backend = get_backend("hu_based")
    clean = segment(backend, volume, prof, "non_contrast", lambda n, m: None)
    hu = volume.array.copy()
    dev = add_devices(hu)
    assert dev.sum() > 5000
    with_dev = Volume(hu, volume.affine, volume.info, volume.frames)
    got = segment(backend, with_dev, prof, "non_contrast", lambda n, m: None)
    for name, mask in got.items():
        on_dev = int((mask & dev).sum())
        assert on_dev == 0, (name, on_dev)
        if clean[name].sum() > 500:
            assert _dice(mask, clean[name]) >= 0.98, (name, _dice(mask, clean[name]))
    dense = [t.name for t in prof.tissues if (t.hu_range("non_contrast") or (0, 0))[1] >= DEVICE_HU]
    assert dense and sum(int(clean[n].sum()) for n in dense) > 1000  # bone was found


def test_devices_were_body_without_dense_rule(volume: Volume) -> None:
    """The control: without the dense rule the holder joins the bone (the defect)."""
    prof = load_profile("brain")
    prof = prof.model_copy(update={"body_mask": prof.body_mask.model_copy(update={"dense_hu": None})})
    hu = volume.array.copy()
    dev = add_devices(hu)
    got = segment(get_backend("hu_based"), Volume(hu, volume.affine, volume.info, volume.frames), prof,
                  "non_contrast", lambda n, m: None)
    assert int((got["shell"] & dev).sum()) > 1000
