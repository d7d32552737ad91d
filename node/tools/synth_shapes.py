"""Synthetic CT-like volumes with known truth, for training and testing the AI backends.

A case is a box of air with a body (an ellipsoid of fat/soft tissue), one organ (~130 HU, label 1),
one bone (a cylinder with a cortical shell, ~700 HU, label 2) and an air pocket (-850 HU, label 3),
all from one integer seed, so the committed fixture's training data and the held-out test volumes
can be rebuilt bit for bit.  Arrays follow the node's ``[k, j, i]`` convention (:func:`case_volume`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the pipeline is not needed to make a case
    from node.pipeline.volume import Volume

#: label ids of the synthetic truth
LABELS = {"background": 0, "organ": 1, "bone": 2, "air": 3}


@dataclass
class Case:
    """One synthetic case."""

    hu: np.ndarray
    """int16 HU, ``[k, j, i]``."""
    labels: np.ndarray
    """uint8 truth, ``[k, j, i]``: 0 background, 1 organ, 2 bone, 3 air."""
    spacing: tuple[float, float, float]
    """(i, j, k) mm."""
    seed: int


def make_case(seed: int, shape: tuple[int, int, int] = (40, 48, 48),
              spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)) -> Case:
    """Build the case for ``seed``; sizes are in mm so another ``spacing`` gives the same anatomy."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    si, sj, sk = spacing
    k, j, i = np.meshgrid(np.arange(nk) * sk, np.arange(nj) * sj, np.arange(ni) * si, indexing="ij")
    ck, cj, ci = (nk - 1) * sk / 2, (nj - 1) * sj / 2, (ni - 1) * si / 2

    hu = np.full(shape, -1000.0, dtype=np.float32)
    # body: ellipsoid filling most of the field of view
    rb = np.array([ck * 0.95, cj * 0.8, ci * 0.9]) * rng.uniform(0.9, 1.0, 3)
    body = ((k - ck) / rb[0]) ** 2 + ((j - cj) / rb[1]) ** 2 + ((i - ci) / rb[2]) ** 2 <= 1
    hu[body] = -90.0  # fat
    inner = ((k - ck) / (rb[0] * 0.85)) ** 2 + ((j - cj) / (rb[1] * 0.8)) ** 2 + ((i - ci) / (rb[2] * 0.8)) ** 2 <= 1
    hu[inner] = 35.0  # muscle / soft tissue
    labels = np.zeros(shape, dtype=np.uint8)

    # organ: ellipsoid, random size/position inside the soft tissue
    ro = rng.uniform(14, 24, 3)
    co = np.array([ck, cj, ci]) + rng.uniform(-0.25, 0.25, 3) * np.array([ck, cj, ci])
    co[2] = ci + rng.choice([-1, 1]) * rng.uniform(0.25, 0.4) * ci
    organ = ((k - co[0]) / ro[0]) ** 2 + ((j - co[1]) / ro[1]) ** 2 + ((i - co[2]) / ro[2]) ** 2 <= 1
    organ &= inner
    hu[organ] = 130.0  # an enhancing organ (spleen-like in the portal phase)
    labels[organ] = 1

    # bone: cylinder along k on the other side, cortical shell + marrow
    rbone = rng.uniform(7, 11)
    cb = np.array([cj + rng.uniform(-0.2, 0.2) * cj, ci - np.sign(co[2] - ci) * rng.uniform(0.3, 0.45) * ci])
    rr = np.sqrt((j - cb[0]) ** 2 + (i - cb[1]) ** 2)
    length = rng.uniform(0.5, 0.8) * ck
    bone = (rr <= rbone) & (np.abs(k - ck) <= length) & inner & ~organ
    hu[bone] = 250.0
    hu[bone & (rr >= rbone - 3.5)] = 750.0
    labels[bone] = 2

    # air pocket (bowel gas / lung-like), label 3: besides being realistic it matters for
    # nnU-Net's CT normalisation, which clips intensities to the 0.5..99.5 percentiles of the
    # labelled voxels; with only organ and bone labelled, everything darker than the organ was
    # clipped to the organ's own lower tail and the organ was never learnt.
    ra = rng.uniform(8, 12, 3)
    ca = np.array([ck + rng.uniform(-0.3, 0.3) * ck, cj - 0.45 * cj, ci + rng.uniform(-0.2, 0.2) * ci])
    air = ((k - ca[0]) / ra[0]) ** 2 + ((j - ca[1]) / ra[1]) ** 2 + ((i - ca[2]) / ra[2]) ** 2 <= 1
    air &= inner & ~organ & ~bone
    hu[air] = -850.0
    labels[air] = 3

    hu += rng.normal(0, 10, shape).astype(np.float32)
    hu[~body] = -1000.0 + rng.normal(0, 5, int((~body).sum()))
    return Case(np.round(hu).astype(np.int16), labels, (float(si), float(sj), float(sk)), seed)


def case_affine(case: Case, origin: tuple[float, float, float] = (-70.0, -70.0, -60.0)) -> np.ndarray:
    """Identity-orientation affine (i, j, k, 1) -> LPS mm for ``case``."""
    a = np.diag([*case.spacing, 1.0])
    a[:3, 3] = origin
    return a


def case_volume(case: Case) -> Volume:
    """A :class:`~node.pipeline.volume.Volume` (in memory, no source frames) for ``case``."""
    from node.pipeline.volume import SeriesInfo, Volume

    info = SeriesInfo(series_instance_uid=f"2.25.{case.seed + 1}", study_instance_uid="2.25.1",
                      frame_of_reference_uid="2.25.2", modality="CT")
    return Volume(case.hu.astype(np.float32), case_affine(case), info, frames=[])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)
